"""The HTTP side: FastAPI (on Starlette) under uvicorn, serving one static page and a small JSON API.

Routes: ``GET /`` (the page), ``GET /static/<file>``, ``GET /api/info``, ``GET /api/scenes?start=&count=``,
``POST /api/upload`` (the raw file as the body), ``POST /api/reconstruct``, ``POST /api/generate`` and
``POST /api/models`` (JSON bodies, validated by the typed models below: a wrong type or an unknown field is a
422 that names the field). Every error, an unknown path or method included, is a JSON ``{"error": "one
line"}``; an unexpected exception is logged to the terminal with its traceback and reported to the page in
one line, and the server keeps serving. :mod:`.guard` checks Host, Origin and body size first.

Bounds: uploads of ``MAX_UPLOAD_BYTES``, JSON bodies of twice that (a reconstruction carries the working
image); a body must arrive within ``BODY_TIMEOUT`` s and a new connection must send its first request within
``HEADER_TIMEOUT`` s; idle keep-alive connections close after ``KEEP_ALIVE`` s; beyond ``MAX_CONNECTIONS``
open at once uvicorn answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import traceback
from importlib import resources
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import TextokError
from .app import MAX_UPLOAD_BYTES, ServeApp
from .generators import MAX_CAPTION_CHARS, MAX_SAMPLES
from .guard import Guard, is_loopback

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
MAX_JSON_BYTES = 2 * MAX_UPLOAD_BYTES  # a reconstruct request carries the working image as base64
BODY_TIMEOUT = 30.0
HEADER_TIMEOUT = 15.0
KEEP_ALIVE = 5
MAX_CONNECTIONS = 64
SHUTDOWN_GRACE = 5  # seconds requests in flight get on Ctrl-C / SIGTERM


# ---- request bodies ---------------------------------------------------------------------------------------
class Body(BaseModel):
    """JSON as sent: no coercion ("4" is not a number), no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ReconstructRequest(Body):
    scene: int | None = Field(None, ge=0)
    image: str | None = Field(None, max_length=MAX_JSON_BYTES)
    caption: str = Field("", max_length=MAX_CAPTION_CHARS)
    swap_caption: str = Field("", max_length=MAX_CAPTION_CHARS)


class GenerateRequest(Body):
    generator: int = Field(0, ge=0)
    label: int | None = Field(None, ge=0)
    prompt: str | None = Field(None, max_length=MAX_CAPTION_CHARS)
    n: int = Field(4, ge=1, le=MAX_SAMPLES)
    seed: int = Field(0, ge=0, lt=2**63)
    cfg: float | None = Field(None, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=1000)


class ModelRequest(Body):
    directory: str = Field(min_length=1, max_length=4096)


# ---- errors -------------------------------------------------------------------------------------------------
def error(status: int, text: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": text, **extra}, status_code=status)


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Pydantic's errors -> one line naming the field(s), and the field names."""
    fields, parts = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON", []
        if not loc:
            return "the request body must be a JSON object (sent as application/json)", []
        field = ".".join(loc)
        fields.append(field)
        msg = str(e.get("msg", "is invalid"))
        parts.append(f"{field!r}: {msg[:1].lower() + msg[1:]}")
    return "wrong request field " + "; ".join(parts[:3]), fields


def run_guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the app: a TextokError is a 400 with its line; anything else is a 500 with one line (traceback to
    the terminal)."""
    try:
        return fn(*args, **kwargs)
    except TextokError as err:
        return error(400, _first_line(str(err)) or "bad request")
    except Exception as err:  # noqa: BLE001 - the page gets one line; the terminal gets the traceback
        traceback.print_exc(file=sys.stderr)
        first = _first_line(str(err))
        return error(500, f"internal error ({type(err).__name__}{': ' + first if first else ''}); "
                          "the server is still running")


def static_file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def make_asgi(app: ServeApp) -> FastAPI:
    """The routes, without the guard (:class:`Server` wraps it)."""
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"nothing at {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}",
                         allowed=(exc.headers or {}).get("Allow", ""))
        return error(exc.status_code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        text, fields = validation_message(list(exc.errors()))
        return error(422 if fields else 400, text, fields=fields)

    def page_file(name: str) -> Response:
        return Response(static_file(name), media_type=STATIC[name])

    @api.api_route("/", methods=["GET", "HEAD"])
    @api.api_route("/index.html", methods=["GET", "HEAD"])
    def index() -> Response:
        return page_file("index.html")

    @api.api_route("/static/{name}", methods=["GET", "HEAD"])
    def static(name: str) -> Response:
        if name not in STATIC:
            return error(404, f"nothing at /static/{name}")
        return page_file(name)

    @api.api_route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon() -> Response:
        return Response(status_code=204)

    @api.get("/api/info")
    def info() -> Any:
        return run_guarded(app.info)

    @api.get("/api/scenes")
    def scenes(start: int = 0, count: int = 12) -> Any:
        return run_guarded(lambda: {"scenes": app.scenes(start, count)})

    @api.post("/api/upload")
    async def upload(request: Request) -> Any:
        return await run_in_threadpool(run_guarded, app.prepare_upload, await request.body())

    @api.post("/api/reconstruct")
    def reconstruct(req: ReconstructRequest) -> Any:
        return run_guarded(app.reconstruct, {"scene": req.scene, "image": req.image}, req.caption, req.swap_caption)

    @api.post("/api/generate")
    def generate(req: GenerateRequest) -> Any:
        return run_guarded(app.generate, **req.model_dump())

    @api.post("/api/models")
    def models(req: ModelRequest) -> Any:
        return run_guarded(app.add_model, req.directory)

    return api


# ---- the server ---------------------------------------------------------------------------------------------
class Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for a new connection's first request (uvicorn's own timeout only
    covers idle keep-alive connections, so a client that connects and says nothing would hold a socket)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._first_request = self.loop.call_later(HEADER_TIMEOUT, self._first_request_late)

    def _first_request_late(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._first_request.cancel()
        super().connection_lost(exc)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise TextokError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections made before uvicorn starts wait in the backlog instead of being refused
    except OSError as err:
        sock.close()
        raise TextokError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port") from None
    return sock


class Server:
    """A bound socket and the uvicorn server that will answer on it."""

    def __init__(self, app: ServeApp, host: str, port: int, verbose: bool = False) -> None:
        self.app, self.host = app, host
        self.socket = _bind(host, port)
        self.port = self.socket.getsockname()[1]
        self.asgi = Guard(make_asgi(app), host, self.port, body_limits={"/api/upload": MAX_UPLOAD_BYTES},
                          default_limit=MAX_JSON_BYTES, body_timeout=BODY_TIMEOUT)
        config = uvicorn.Config(self.asgi, http=Protocol, lifespan="off", ws="none", access_log=verbose,
                                log_config=uvicorn.config.LOGGING_CONFIG if verbose else None,
                                log_level="info" if verbose else "warning", timeout_keep_alive=KEEP_ALIVE,
                                limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                server_header=False)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()
        if not verbose:
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    @property
    def url(self) -> str:
        host = self.socket.getsockname()[0]
        return f"http://{host if ':' not in str(host) else f'[{host}]'}:{self.port}/"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`, Ctrl-C or SIGTERM (in the main thread, uvicorn finishes the requests in
        flight, then raises the signal again so the caller exits as the signal asks)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> Server:
    """Bind (port 0 = any free port); call ``serve_forever()`` on the result."""
    return Server(app, host, port, verbose)


__all__ = ["make_server", "make_asgi", "Server", "is_loopback", "ReconstructRequest", "GenerateRequest",
           "ModelRequest"]
