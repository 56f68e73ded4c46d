"""The operators' surface over HTTP: /metrics, the admin API, the dashboard, unsubscribe.

Wiring (mta/engine.py): `start_operators(ctx, policy, live)` in every worker (audit log,
metrics, and the HTTP listener in worker 0); `check_http(cfg)` among the startup checks.
"""

from mta.http.server import check_http, start_http, start_operators

__all__ = ["check_http", "start_http", "start_operators"]
