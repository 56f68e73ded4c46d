"""The public tracking endpoints: ``/c/<token>`` (a click) and ``/o/<token>.gif`` (an open).

Served on the operators' listener next to /unsubscribe, without the admin token (only
/api/ needs one). A click answers 302 to the URL inside a genuine token and 404 to
anything else, so it is never an open redirect; the hidden link answers 204. The pixel
is a 43-byte transparent GIF for a genuine token, 404 otherwise. GET and HEAD both.
"""

from __future__ import annotations

import base64

from aiohttp import web

from mta.tracking.hits import Tracker

TRACKER = web.AppKey("tracker", Tracker)
GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
NO_CACHE = {"Cache-Control": "no-store, private", "Referrer-Policy": "no-referrer"}


def not_found() -> web.Response:
    return web.Response(status=404, text="not found\n", headers=NO_CACHE)


def _who(request: web.Request) -> tuple[str, str, str]:
    return request.method, request.headers.get("User-Agent", ""), request.remote or ""


async def get_click(request: web.Request) -> web.Response:
    url = request.app[TRACKER].click(request.match_info["token"], *_who(request))
    if url is None:
        return not_found()
    if not url:
        return web.Response(status=204, headers=NO_CACHE)
    return web.Response(status=302, headers={"Location": url, **NO_CACHE})


async def get_open(request: web.Request) -> web.Response:
    if not request.app[TRACKER].open(request.match_info["token"], *_who(request)):
        return not_found()
    return web.Response(body=GIF, content_type="image/gif", headers=NO_CACHE)


def add_tracking_routes(app: web.Application, tracker: Tracker, click_path: str,
                        open_path: str) -> None:
    app[TRACKER] = tracker
    app.router.add_get("/" + click_path.strip("/") + "/{token}", get_click)
    app.router.add_get("/" + open_path.strip("/") + "/{token}.gif", get_open)
