"""JSON over HTTP to a suspect endpoint, with every bound a hostile endpoint could stretch.

One :class:`Transport` per endpoint, standard library only (``http.client``; no torch):

- **deadlines**: each query (connect, send, headers, body, retries included) ends by
  ``timeout`` seconds after it starts, and every query ends by the whole verification's
  ``deadline`` (a :class:`Deadline` shared by all queries).  ``http.client`` only bounds each
  ``recv``, so an endpoint dripping one byte a second would never time out; a watchdog timer shuts
  the socket down at the query's deadline instead.
- **size cap**: an answer larger than ``max_bytes`` (by its ``Content-Length`` or as it streams)
  is refused without reading the rest.
- **rate limits**: HTTP 429 / 503 are retried up to ``retries`` times after ``Retry-After`` seconds
  when the endpoint gives them, else after an exponential backoff (0.5 s, 1 s, 2 s, ...), never
  past a deadline; ``qps`` caps the rate at which queries start.
- **authentication**: extra ``headers`` (``Authorization: Bearer ...``) go with every query.

Every failure is a :class:`~quantseal.errors.BadInput` naming the URL: the CLI prints one line and
exits with code 2.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from ..errors import BadInput

MAX_RESPONSE_BYTES = 64 << 20
RETRY_STATUSES = (429, 503)
_CHUNK = 1 << 16


class Deadline:
    """An absolute end time on the monotonic clock (``seconds=None``: none)."""

    def __init__(self, seconds: float | None = None):
        if seconds is not None and not seconds > 0:
            raise BadInput(f"a deadline must be a positive number of seconds, not {seconds}")
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + float(seconds)

    def remaining(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` → (name, value); a header that would split the request is refused."""
    name, sep, value = str(text).partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n\0"):
        raise BadInput(f"--header {text!r}: expected 'Name: value' on one line")
    if not (name + value).isascii() or not all(c.isprintable() for c in name + value):
        raise BadInput(f"--header {ascii(text)}: use printable ASCII (HTTP headers are bytes)")
    return name, value


def read_api_key(path) -> tuple[str, str]:
    """The ``Authorization: Bearer <token>`` header from a file holding the token (an API key;
    surrounding whitespace stripped): verify's ``--api-key-file`` and serve's ``--token-file``."""
    from pathlib import Path

    p = Path(path)
    try:
        key = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: cannot read the bearer token ({getattr(exc, 'strerror', None) or exc})") from exc
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise BadInput(f"{p}: a bearer token file holds one printable token")
    return "Authorization", f"Bearer {key}"


@dataclass
class Transport:
    """JSON requests to one endpoint.  ``base``: ``http(s)://host[:port][/prefix]``."""

    base: str
    timeout: float = 60.0
    deadline: Deadline = field(default_factory=Deadline)
    max_bytes: int = MAX_RESPONSE_BYTES
    qps: float | None = None
    headers: dict = field(default_factory=dict)
    retries: int = 5
    backoff: float = 0.5
    queries: int = 0  # HTTP requests sent, retries included

    def __post_init__(self):
        if not isinstance(self.base, str) or not self.base.startswith(("http://", "https://")):
            raise BadInput(f"{self.base!r}: an endpoint URL starts with http:// or https://")
        u = urllib.parse.urlsplit(self.base)
        if not u.hostname:
            raise BadInput(f"{self.base!r}: no host in the URL")
        try:
            self._port = u.port
        except ValueError as exc:
            raise BadInput(f"{self.base!r}: bad port") from exc
        self._https, self._host, self._prefix = u.scheme == "https", u.hostname, u.path.rstrip("/")
        self.base = self.base.rstrip("/")
        if not self.timeout > 0:
            raise BadInput(f"--timeout must be positive, not {self.timeout}")
        if self.qps is not None and not self.qps > 0:
            raise BadInput(f"--qps must be positive, not {self.qps}")
        if self.max_bytes < 1 or self.retries < 0:
            raise BadInput("the response cap must be positive and retries non-negative")
        self._next_start = 0.0
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    # ------------------------------------------------------------------ pacing
    def _pace(self, end: float) -> None:
        """Sleep until the next query may start under ``qps``."""
        if self.qps is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.qps
        if start > end:
            raise BadInput(f"{self.base}: --qps {self.qps} leaves no time before the deadline")
        if start > now:
            time.sleep(start - now)

    def _end_of_query(self) -> tuple[float, str]:
        per_query = time.monotonic() + self.timeout
        if self.deadline.end is not None and self.deadline.end < per_query:
            return self.deadline.end, f"the verification's deadline of {self.deadline.seconds:g} s"
        return per_query, f"the query timeout of {self.timeout:g} s"

    # ------------------------------------------------------------------ one request
    def _once(self, method: str, path: str, body: bytes | None, end: float, why: str) -> tuple[int, dict, bytes]:
        """(status, headers lower-cased, body) of one HTTP exchange, all of it before ``end``."""
        left = end - time.monotonic()
        if left <= 0:
            raise BadInput(f"{self.url(path)}: no answer within {why}")
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if self._https else {}
        conn = cls(self._host, self._port, timeout=min(left, self.timeout), **kw)
        fired = threading.Event()

        def _cut():  # the watchdog: unblock any recv/send at the deadline
            fired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(left, _cut)
        timer.daemon = True
        timer.start()
        try:
            hdrs = {"Accept": "application/json", **self.headers}
            if body is not None:
                hdrs["Content-Type"] = "application/json"
            conn.request(method, self._prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            length = headers.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                raise BadInput(f"{self.url(path)}: the answer of {int(length)} bytes exceeds the cap of "
                               f"{self.max_bytes} bytes")
            chunks, total = [], 0
            while True:
                piece = resp.read1(_CHUNK) if hasattr(resp, "read1") else resp.read(_CHUNK)
                if not piece:
                    break
                total += len(piece)
                if total > self.max_bytes:
                    raise BadInput(f"{self.url(path)}: the answer exceeds the cap of {self.max_bytes} bytes")
                chunks.append(piece)
            if fired.is_set():
                raise BadInput(f"{self.url(path)}: no complete answer within {why}")
            return resp.status, headers, b"".join(chunks)
        except BadInput:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if fired.is_set() or time.monotonic() >= end:
                raise BadInput(f"{self.url(path)}: no complete answer within {why}") from None
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc or type(exc).__name__
            raise BadInput(f"{self.url(path)}: the endpoint does not answer ({reason})") from None
        finally:
            timer.cancel()
            conn.close()

    # ------------------------------------------------------------------ JSON with retries
    def request(self, method: str, path: str, payload=None) -> dict:
        """The decoded JSON object the endpoint answers to ``method path`` (``payload`` as the JSON
        body); retries 429/503 within the deadlines."""
        body = None if payload is None else json.dumps(payload).encode()
        end, why = self._end_of_query()
        attempt = 0
        while True:
            self._pace(end)
            self.queries += 1
            status, headers, raw = self._once(method, path, body, end, why)
            if status not in RETRY_STATUSES or attempt >= self.retries:
                break
            wait = self.backoff * (2 ** attempt)
            ra = headers.get("retry-after", "").strip()
            if ra.replace(".", "", 1).isdigit():
                wait = float(ra)
            if time.monotonic() + wait >= end:
                raise BadInput(f"{self.url(path)}: rate-limited (HTTP {status}) until past {why}")
            time.sleep(wait)
            attempt += 1
        if status >= 400:
            detail = raw[:2000].decode("utf-8", "replace")
            try:
                err = json.loads(detail).get("error", detail)
                detail = err.get("message", err) if isinstance(err, dict) else err
            except (json.JSONDecodeError, AttributeError):
                pass
            tail = f" after {attempt} retries" if attempt else ""
            raise BadInput(f"{self.url(path)}: the endpoint refused the request (HTTP {status}{tail}: "
                           f"{' '.join(str(detail).split())[:300]})")
        try:
            out = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BadInput(f"{self.url(path)}: the answer is not JSON") from None
        if not isinstance(out, dict):
            raise BadInput(f"{self.url(path)}: the answer is not a JSON object")
        return out

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, payload) -> dict:
        return self.request("POST", path, payload)
