"""The HTTP injection API: one request, many personalised messages, into the spool.

KumoMTA's `POST /api/inject/v1` request shape. An edge beside `mta.smtp`: it builds each
recipient's message and hands it to the same intake (`mta.smtp.intake.Intake`) as SMTP
mail, so nothing after intake knows how a message arrived.

- `request`: the JSON read and checked (400, 413);
- `render`: Jinja2 templates in the sandbox (422 naming the template and line);
- `mime`: each message's MIME, as the standard library's email package writes it;
- `build`: a recipient's message from the request (templates + MIME, or a raw message);
- `auth`: accounts by password or API key;
- `service`: a request through intake's checks and one spool transaction;
- `server`: the aiohttp listener every worker runs (`[inject] listen`).
"""
