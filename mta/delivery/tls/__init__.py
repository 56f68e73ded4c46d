"""Outbound TLS policy: modes, verified certificates, MTA-STS, DANE and TLS reporting.

The decision is plain code: `policy.decide` (a destination's plan from the configured
mode, DANE answers and the MTA-STS policy) and `policy.judge` (one session, from the
certificate the server showed), over the records of `model`, the checks of `certs`
and the parsers of `mtasts` and `report`. The I/O is at the edges: `service` (DNS
lookups, the MTA-STS cache and fetch, the checker of sessions), `http` (aiohttp),
`store` (LMDB), `reporter` (TLS-RPT out), `worker` (what mta/engine.py wires).
"""
