"""Helpers for the outbound TLS tests: certificates from a test CA (trustme), server
contexts for the sinks, and an HTTPS server on loopback that serves MTA-STS policies
(by Host) and takes TLS-RPT reports (POST), on its own thread and event loop."""

from __future__ import annotations

import datetime
import hashlib
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bench.rig.loop_thread import LoopThread


def server_cert(ca: trustme.CA, *names: str, expired: bool = False,
                with_ca: bool = False) -> tuple[ssl.SSLContext, bytes]:
    """A STARTTLS/HTTPS server context with a certificate for `names` from `ca`, and that
    certificate (DER). expired: valid in 2020 only; with_ca: the CA sent in the chain."""
    kwargs = {}
    if expired:
        kwargs = {"not_before": datetime.datetime(2020, 1, 1),
                  "not_after": datetime.datetime(2020, 12, 31)}
    leaf = ca.issue_cert(*names, **kwargs)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    if with_ca:
        chain = b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "chain.pem").write_bytes(chain)
            (Path(tmp) / "key.pem").write_bytes(leaf.private_key_pem.bytes())
            context.load_cert_chain(Path(tmp) / "chain.pem", Path(tmp) / "key.pem")
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
        Encoding.DER)
    return context, der


def server_context(ca: trustme.CA, *names: str, **kwargs: bool) -> ssl.SSLContext:
    return server_cert(ca, *names, **kwargs)[0]


def spki_sha256(der: bytes) -> bytes:
    """The data of a `3 1 1` TLSA record for this certificate."""
    key = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER,
                                           PublicFormat.SubjectPublicKeyInfo)).digest()


def write_ca(ca: trustme.CA, directory: Path) -> str:
    path = directory / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@dataclass
class Served:
    """What the server answers for a host name's GET."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Posted:
    path: str
    content_type: str
    body: bytes


class HttpsServer:
    """aiohttp over TLS at host:port with a certificate (from `ca`) for `names`.

    `serve[name]` is the answer to a GET whose Host is `name` (404 when absent);
    `requests` lists (method, host, path) of every request, `posts` every POST."""

    def __init__(self, ca: trustme.CA, names: list[str], host: str, port: int) -> None:
        self.context = server_context(ca, *names)
        self.host = host
        self.port = port
        self.serve: dict[str, Served] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.posts: list[Posted] = []
        self._thread = LoopThread(f"https-{host}")
        self._runner: web.AppRunner | None = None

    def fetches(self, name: str) -> int:
        return sum(1 for method, host, _ in self.requests if method == "GET" and host == name)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = (request.host or "").rsplit(":", 1)[0].lower()
        self.requests.append((request.method, host, request.path))
        if request.method == "POST":
            self.posts.append(Posted(request.path, request.headers.get("Content-Type", ""),
                                     await request.read()))
            return web.Response(status=201)
        served = self.serve.get(host)
        if served is None:
            return web.Response(status=404, text="not found")
        response = web.Response(status=served.status, body=served.body, headers=served.headers)
        response.headers["Content-Type"] = served.content_type
        return response

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context).start()

    def start(self) -> HttpsServer:
        self._thread.start(self._start, self._cleanup)
        return self

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        self._thread.stop()
