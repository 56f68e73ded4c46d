"""Open and click tracking of campaign mail.

`tokens` signs what a tracked link or pixel names, `rewrite` is the delivery transform
that rewrites links and adds the pixel (after the policy footer, before DKIM),
`classify` tells a person's open or click from a proxy's or a scanner's, and `hits`
turns requests on the public endpoints (served by mta/http/tracking.py) into events.
"""
