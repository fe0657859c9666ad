"""Who may talk to ``textok serve``, and how much: checks run on every request before the app sees it.

* ``Host`` must name this machine's loopback (``localhost``, ``127.0.0.1``, ``[::1]``) or the address the
  server is bound to, so a DNS-rebound name (``evil.example`` resolving to 127.0.0.1) reads nothing. Bound to
  a wildcard address (``0.0.0.0``), any IP literal is accepted as well: rebinding always carries a name.
* State-changing requests (anything but GET/HEAD/OPTIONS) with an ``Origin`` must come from this server's
  own origin; ``Origin: null`` and cross-site ``Sec-Fetch-Site`` are refused, so another site's page can
  neither load models nor run the models. Clients that are not browsers send no ``Origin`` and are let in.
* Request bodies are refused beyond a size (before reading, from ``Content-Length``; while reading, when
  chunked) and when they trickle in slower than a deadline.

Every refusal is a JSON ``{"error": "one line"}``. Every answer carries headers that keep the page from
being framed, sniffed or cached, and a content policy that lets it load nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DISCARD_LIMIT = 256 * 1024 * 1024  # a larger refused body is not read: the connection is closed instead
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """``"[::1]:7860"`` -> ``("::1", 7860)``; ``"Example.org"`` -> ``("example.org", None)``; garbage -> ``("", None)``."""
    try:
        parts = urlsplit("//" + value.strip())
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


class Guard:
    """ASGI middleware: the Host / Origin checks, body limits and deadlines described in the module docstring."""

    def __init__(self, app: Callable, bound_host: str, port: int, body_limits: dict[str, int], default_limit: int,
                 body_timeout: float) -> None:
        self.app, self.port = app, int(port)
        self.bound = split_host(bound_host if ":" not in bound_host else f"[{bound_host}]")[0]
        self.wildcard = self.bound in ("0.0.0.0", "::", "")
        self.body_limits, self.default_limit, self.body_timeout = body_limits, default_limit, body_timeout

    def host_allowed(self, name: str) -> bool:
        if name in LOOPBACK_NAMES or name == self.bound or is_loopback(name):
            return True
        return self.wildcard and _is_ip(name)

    def origin_allowed(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
            port = parts.port or (80 if parts.scheme == "http" else 443)
        except ValueError:
            return False
        return parts.scheme == "http" and self.host_allowed((parts.hostname or "").lower()) and port == self.port

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """Why this request is refused (status, one line), or None."""
        name, _ = split_host(headers.get("host", ""))
        if not self.host_allowed(name):
            return 403, (f"this server answers only requests addressed to this machine (Host {headers.get('host', '')!r}"
                         " is not one of its names): open the address `textok serve` printed")
        fetch_site = headers.get("sec-fetch-site", "")
        if fetch_site == "cross-site" and scope["path"].startswith("/api/"):
            return 403, "another site's page may not use this server"
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not self.origin_allowed(origin):
                return 403, f"requests from {origin} may not change this server: use the page it serves"
            limit = self.body_limits.get(scope["path"], self.default_limit)
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return 400, "the request has no valid Content-Length"
                if int(length) > limit:
                    return 413, f"the request is larger than the {max(1, limit // 2**20)} MB this page accepts"
        return None

    async def _drain(self, receive: Receive) -> None:
        try:
            while True:
                message = await asyncio.wait_for(receive(), self.body_timeout)
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
        except asyncio.TimeoutError:
            return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self.refusal(scope, headers)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in have)]
            await send(message)

        if refused is not None:
            status, text = refused
            if status == 413 and int(headers["content-length"]) <= DISCARD_LIMIT:
                await self._drain(receive)  # so a browser reads the answer instead of a reset connection
            body = json.dumps({"error": text}).encode()
            await send_with_headers({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                *([(b"connection", b"close")] if status == 413 else [])]})
            await send({"type": "http.response.body", "body": body})
            return None
        limit = self.body_limits.get(scope["path"], self.default_limit)
        received = 0

        async def bounded_receive() -> dict[str, Any]:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the request is larger than the {max(1, limit // 2**20)} MB this page accepts")
            return message

        return await self.app(scope, bounded_receive, send_with_headers)


__all__ = ["Guard", "is_loopback", "split_host", "LOOPBACK_NAMES"]
