"""A small hardened HTTP/1.1 server for JSON routes: asyncio reads, a bounded worker pool computes.

Why not ``http.server.ThreadingHTTPServer``: it gives every connection a thread that blocks on
``recv`` with no deadline, so 300 stalled connections held 304 threads and a request dripping its
body held one forever.  Why not uvicorn + starlette: uvicorn has no deadline on a request's
headers either (its ``timeout_keep_alive`` covers idle keep-alive only) and no body cap, so the
same guards would still be written by hand, plus two dependencies.  Here every connection is a
coroutine of the event loop (a stalled one costs a few kB, no thread) and

- the request line and headers must arrive within ``header_timeout`` s and ``max_header_bytes``,
  the body within ``body_timeout`` s; an idle keep-alive connection is closed after
  ``idle_timeout`` s; at most ``max_connections`` are open (more are answered 503 and closed);
- a complete request goes to a pool of ``workers`` threads (JSON decoding, validation,
  tokenisation and inference run there, never on the loop); more than ``max_pending`` requests
  waiting for it are answered 503 with ``Retry-After``;
- only ``GET`` and ``POST`` exist: any other method gets 405 JSON with ``Allow``; bodies need a
  ``Content-Length`` (411) of at most ``max_body`` bytes (413, not read);
- with a ``token``, every route but ``GET /health`` needs ``Authorization: Bearer <token>``
  (compared with :func:`hmac.compare_digest`; else 401), and ``/health`` shows details only to
  it.

Every answer is JSON ``{"error", "status"}`` on failure (or the body a :class:`RequestError`
carries).  The application is an object with ``routes`` (path → ``fn(payload) -> dict``, POST),
optionally ``get_routes`` (path → ``fn() -> dict``, GET, behind the token like POST routes),
``health()`` and ``public_health()``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

from ..errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_header_bytes: int = 16 << 10
    max_body: int = 16 << 20
    max_connections: int = 1024
    workers: int = 4
    max_pending: int = 64


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a message for the client."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, body: dict | None = None):
        super().__init__(message)
        self.status = int(status)
        self.body = body  # the JSON answer when not {"error": message, "status": status} (OpenAI's shape)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes):
    """The JSON value of a request body; :class:`RequestError` (400) for anything else, deep
    nesting and NaN/Infinity included."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise RequestError(f"the body is not valid JSON ({exc})") from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HTTPServer:
    """Bound at construction (``port=0``: a free port); ``serve_forever()`` in one thread,
    ``shutdown()`` from another, then ``server_close()`` (the ``socketserver`` protocol)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 limits: Limits | None = None):
        self.app, self.limits = app, limits or Limits()
        self._token = None if token is None else token.encode()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            self.socket = socket.socket(family, socket.SOCK_STREAM)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(addr)
            self.socket.listen(512)
        except (OSError, IndexError) as exc:
            raise BadInput(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from exc
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        if not is_loopback(self.server_address[0]):
            log.warning("listening on %s, beyond this machine%s", self.server_address[0],
                        "" if token else " with no --token-file: anyone who can reach it can query the model")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopped = threading.Event()
        self._open = 0
        self._pending = 0

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self) -> None:
        self._stopped.clear()
        loop = asyncio.new_event_loop()
        self._loop = loop
        pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="quantseal-worker")
        try:
            loop.run_until_complete(self._main(pool))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            loop.close()
            self._loop = None
            self._stopped.set()

    async def _main(self, pool) -> None:
        self._stop = asyncio.Event()
        self._pool = pool
        server = await asyncio.start_server(self._connection, sock=self.socket,
                                            limit=self.limits.max_header_bytes)
        async with server:
            await self._stop.wait()
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()

    def shutdown(self) -> None:
        loop = self._loop
        if loop is not None and self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
            self._stopped.wait(30)

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ one connection
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self.limits.max_connections:
                await self._send(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"error": "too many open connections", "status": 503}, close=True)
                return
            first = True
            while True:
                keep = await self._one_request(reader, writer, first)
                first = False
                if not keep:
                    break
        except (ConnectionError, asyncio.CancelledError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._open -= 1
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

    async def _one_request(self, reader, writer, first: bool) -> bool:
        """Read, answer; True to keep the connection for another request."""
        lim = self.limits
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:  # the first byte: an idle keep-alive connection may wait longer than a request head
            byte = await asyncio.wait_for(reader.readexactly(1), lim.header_timeout if first else lim.idle_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        try:
            left = lim.header_timeout - (loop.time() - t0 if first else 0.0)
            head = byte + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(left, 0.001))
        except asyncio.TimeoutError:
            await self._send(writer, HTTPStatus.REQUEST_TIMEOUT,
                             {"error": f"the request head did not arrive within {lim.header_timeout:g} s",
                              "status": 408}, close=True)
            return False
        except asyncio.IncompleteReadError:
            return False
        except (asyncio.LimitOverrunError, ValueError):
            await self._send(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             {"error": f"the request head exceeds {lim.max_header_bytes} bytes", "status": 431},
                             close=True)
            return False
        try:
            method, path, version, headers = _parse_head(head)
        except RequestError as exc:
            await self._send(writer, exc.status, {"error": str(exc), "status": exc.status}, close=True)
            return False
        close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
        head_only = method == "HEAD"
        if method not in ("GET", "POST"):  # a body it may carry is not read: close after answering
            close = True
        try:
            status, body = await self._answer(reader, method, path, headers)
        except RequestError as exc:  # the body was not read: the connection cannot be reused
            status, body, close = exc.status, {"error": str(exc), "status": exc.status}, True
        extra = {}
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            extra["Allow"] = "GET" if path == "/health" or path in getattr(self.app, "get_routes", {}) else "GET, POST"
        elif status == HTTPStatus.UNAUTHORIZED:
            extra["WWW-Authenticate"] = 'Bearer realm="quantseal"'
        elif status == HTTPStatus.SERVICE_UNAVAILABLE:
            extra["Retry-After"] = "1"
        await self._send(writer, status, body, close=close, extra=extra, head_only=head_only)
        return not close

    async def _answer(self, reader, method: str, path: str, headers: dict) -> tuple[int, dict]:
        lim = self.limits
        routes = self.app.routes
        authorised = self._token is None or self._authorised(headers.get("authorization", ""))
        if method not in ("GET", "POST"):
            known = path == "/health" or path in routes or path in getattr(self.app, "get_routes", {})
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {method} is not allowed"
                                                   + (f" on {path}" if known else ""), "status": 405}
        raw = b""
        if method == "POST" or headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            if "transfer-encoding" in headers:
                raise RequestError("chunked bodies are not accepted: send a Content-Length",
                                   HTTPStatus.LENGTH_REQUIRED)
            length = headers.get("content-length")
            if length is None:
                raise RequestError("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
            if not length.isdigit() or len(length) > 18:
                raise RequestError("bad Content-Length")
            n = int(length)
            if n > lim.max_body:
                raise RequestError(f"body of {n} bytes is too large (at most {lim.max_body})",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            try:
                raw = await asyncio.wait_for(reader.readexactly(n), lim.body_timeout)
            except asyncio.TimeoutError:
                raise RequestError(f"the body did not arrive within {lim.body_timeout:g} s",
                                   HTTPStatus.REQUEST_TIMEOUT) from None
        if path == "/health":
            if method != "GET":
                return HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET /health", "status": 405}
            return HTTPStatus.OK, (self.app.health() if authorised else self.app.public_health())
        gets = getattr(self.app, "get_routes", {})
        if path in gets:
            if method != "GET":
                return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"use GET {path}", "status": 405}
            if not authorised:
                return HTTPStatus.UNAUTHORIZED, {"error": "a valid 'Authorization: Bearer <token>' header is required",
                                                 "status": 401}
            return HTTPStatus.OK, gets[path]()
        if path not in routes:
            return HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r} ({describe_routes(self.app)})",
                                          "status": 404}
        if method != "POST":
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"use POST {path} with a JSON body", "status": 405}
        if not authorised:
            return HTTPStatus.UNAUTHORIZED, {"error": "a valid 'Authorization: Bearer <token>' header is required",
                                             "status": 401}
        if self._pending >= lim.workers + lim.max_pending:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the server is busy; retry later", "status": 503}
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _call, routes[path], raw, path)
        finally:
            self._pending -= 1

    def _authorised(self, value: str) -> bool:
        scheme, _, cred = value.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), self._token)

    @staticmethod
    async def _send(writer, status: int, body: dict, close: bool = False, extra: dict | None = None,
                    head_only: bool = False) -> None:
        data = json.dumps(body).encode()
        phrase = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {int(status)} {phrase}", "Server: quantseal", "Content-Type: application/json",
                 f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (extra or {}).items())]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else data))
        await writer.drain()


def _parse_head(head: bytes) -> tuple[str, str, str, dict]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise RequestError("the request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[0].isalpha():
        raise RequestError(f"bad request line {lines[0][:80]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise RequestError(f"bad header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and name in ("content-length", "authorization", "transfer-encoding"):
            raise RequestError(f"repeated {name} header")
        headers[name] = value
    return method.upper(), target.split("?", 1)[0], version, headers


def _call(fn, raw: bytes, path: str) -> tuple[int, dict]:
    """A worker: decode, validate, compute; the status and JSON answer."""
    try:
        return HTTPStatus.OK, fn(decode_json(raw))
    except RequestError as exc:
        return exc.status, (exc.body or {"error": str(exc), "status": exc.status})
    except BadInput as exc:
        return HTTPStatus.BAD_REQUEST, {"error": str(exc), "status": 400}
    except RecursionError:
        return HTTPStatus.BAD_REQUEST, {"error": "the body is nested too deeply", "status": 400}
    except Exception as exc:  # a bug or a runtime failure: answer, log, keep serving
        log.exception("error while answering %s", path)
        return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(exc).__name__})", "status": 500}


def describe_routes(app) -> str:
    """``POST /embed, GET /health`` (or the decoder's routes) for messages."""
    return ", ".join([*(f"POST {p}" for p in app.routes), *(f"GET {p}" for p in getattr(app, "get_routes", {})),
                      "GET /health"])
