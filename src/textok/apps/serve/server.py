"""The HTTP side: Python's own ``http.server`` serving one static page and a small JSON API.

Routes: ``GET /`` (the page), ``GET /static/<file>``, ``GET /api/info``, ``GET /api/scenes?start=&count=``,
``POST /api/upload`` (the raw file as the body), ``POST /api/reconstruct``, ``POST /api/generate`` and
``POST /api/models`` (JSON bodies). Every error is a JSON ``{"error": "one line"}`` with a 4xx/5xx status; an
unexpected exception is logged to the terminal with its traceback and reported to the page in one line, and
the server keeps serving.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from ...errors import TextokError
from .app import MAX_UPLOAD_BYTES, ServeApp

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
MAX_JSON_BYTES = 2 * MAX_UPLOAD_BYTES  # a reconstruct request carries the working image as base64
DISCARD_LIMIT = 256 * 1024 * 1024  # a larger refused body is not read: the connection is closed instead


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def static_file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    """One request; ``server.app`` is the :class:`ServeApp`."""

    server_version = "textok-serve"
    protocol_version = "HTTP/1.1"

    # ---- plumbing --------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"textok serve: {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _body(self, limit: int) -> bytes | None:
        """The request body, or None after answering 413 (the body is drained or the connection closed)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, "the request has no valid Content-Length")
            return None
        if length > limit:
            if length <= DISCARD_LIMIT:  # read and drop it, so the browser sees the answer, not a reset
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 20))
                    if not chunk:
                        break
                    length -= len(chunk)
            else:
                self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the file is larger than the {limit // 2**20} MB this page accepts")
            return None
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict[str, Any] | None:
        raw = self._body(MAX_JSON_BYTES)
        if raw is None:
            return None
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._error(HTTPStatus.BAD_REQUEST, "the request body is not valid JSON")
            return None
        if not isinstance(data, dict):
            self._error(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
            return None
        return data

    def _guarded(self, fn) -> None:
        try:
            fn()
        except TextokError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err).strip().splitlines()[0] if str(err).strip() else "bad request")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - the page gets one line; the terminal gets the traceback
            traceback.print_exc(file=sys.stderr)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"internal error ({type(err).__name__}{': ' + first if first else ''}); the server is still running")

    # ---- routes ------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlparse(self.path)
        app: ServeApp = self.server.app  # type: ignore[attr-defined]
        if url.path in ("/", "/index.html"):
            self._send(200, static_file("index.html"), STATIC["index.html"])
        elif url.path.startswith("/static/") and url.path[len("/static/"):] in STATIC:
            name = url.path[len("/static/"):]
            self._send(200, static_file(name), STATIC[name])
        elif url.path == "/api/info":
            self._json(app.info())
        elif url.path == "/api/scenes":
            q = parse_qs(url.query)
            try:
                start, count = int(q.get("start", ["0"])[0]), int(q.get("count", ["12"])[0])
            except ValueError:
                raise TextokError("start and count must be whole numbers") from None
            self._json({"scenes": app.scenes(start, count)})
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"nothing at {url.path}")

    def _post(self) -> None:
        path = urlparse(self.path).path
        app: ServeApp = self.server.app  # type: ignore[attr-defined]
        if path == "/api/upload":
            raw = self._body(MAX_UPLOAD_BYTES)
            if raw is not None:
                self._json(app.prepare_upload(raw))
            return
        if path not in ("/api/reconstruct", "/api/generate", "/api/models"):
            self._error(HTTPStatus.NOT_FOUND, f"nothing at {path}")
            return
        req = self._json_body()
        if req is None:
            return
        if path == "/api/reconstruct":
            source = {"scene": req.get("scene"), "image": req.get("image")}
            self._json(app.reconstruct(source, str(req.get("caption") or ""), str(req.get("swap_caption") or "")))
        elif path == "/api/generate":
            self._json(app.generate(req))
        else:
            self._json(app.add_model(str(req.get("directory") or "")))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ServeApp, host: str, port: int, verbose: bool = False) -> None:
        self.app, self.verbose = app, verbose
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in str(host) else f'[{host}]'}:{port}/"


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> Server:
    """Bind (port 0 = any free port); call ``serve_forever()`` on the result."""
    try:
        return Server(app, host, port, verbose)
    except OSError as err:
        raise TextokError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None


__all__ = ["make_server", "Server", "Handler", "is_loopback"]
