"""The hardened HTTP layer on a model-free app, over loopback sockets: deadlines, the bounded
worker pool, 405/411/413/431/408 JSON, malformed JSON, the bearer token, the loopback warning."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

from quantseal.runtime.http_server import HTTPServer, Limits, RequestError


class EchoApp:
    """``/echo`` returns its payload; ``/slow`` sleeps ``payload["s"]`` seconds in a worker."""

    def __init__(self):
        self.routes = {"/echo": self.echo, "/slow": self.slow}
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def echo(self, payload):
        if not isinstance(payload, dict):
            raise RequestError("the body must be a JSON object")
        return {"echo": payload}

    def slow(self, payload):
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(payload["s"])
        with self._lock:
            self.active -= 1
        return {"slept": payload["s"]}

    def health(self):
        return {"status": "ok", "model": "secret-model.onnx"}

    def public_health(self):
        return {"status": "ok"}


@pytest.fixture
def serve():
    started = []

    def make(app=None, **kw):
        app = app or EchoApp()
        token = kw.pop("token", None)
        server = HTTPServer(app, "127.0.0.1", 0, token=token, limits=Limits(**kw))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server.server_address[1], app

    yield make
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)


def call(port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None), dict(r.getheaders())
    finally:
        conn.close()


def raw_exchange(port, data: bytes, timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_round_trip_keep_alive_and_unknown_path(serve):
    port, _ = serve()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(3):  # one connection, three requests
        conn.request("POST", "/echo", body=json.dumps({"i": i}))
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"echo": {"i": i}}
    conn.close()
    status, body, _ = call(port, "POST", "/nowhere", b"{}")
    assert status == 404 and "POST /echo" in body["error"]
    assert call(port, "GET", "/echo")[0] == 405


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"])
def test_other_methods_are_405_json(serve, method):
    port, _ = serve()
    status, body, headers = call(port, method, "/echo", b"{}" if method != "HEAD" else None)
    assert status == 405 and headers["Allow"] == "GET, POST" and headers["Content-Type"] == "application/json"
    if method == "HEAD":
        assert body is None and int(headers["Content-Length"]) > 0  # a HEAD answer has no body
    else:
        assert body["status"] == 405 and method in body["error"]


@pytest.mark.parametrize("body,msg", [
    (b"{\"a\": [", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b"{\"a\": NaN}", "not valid JSON"),
    (b"{\"a\": -Infinity}", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_malformed_bodies_are_400(serve, body, msg):
    port, _ = serve()
    status, answer, _ = call(port, "POST", "/echo", body)
    assert status == 400 and msg in answer["error"], answer
    assert call(port, "POST", "/echo", b"{}")[0] == 200


def test_framing_errors(serve):
    port, _ = serve(max_body=1000, max_header_bytes=2048)
    status, body, _ = call(port, "POST", "/echo", b"{}", {"Content-Length": str(10**6)})
    assert status == 413 and "too large" in body["error"]
    out = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411") and b"Content-Length header is required" in out
    assert out.split(b"\r\n\r\n", 1)[1].startswith(b"{")
    out = raw_exchange(port, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411") and b"chunked" in out
    out = raw_exchange(port, b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    out = raw_exchange(port, b"NOT A REQUEST\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"bad request line" in out
    out = raw_exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"Content-Length" in out
    assert call(port, "POST", "/echo", b"{}")[0] == 200


def test_header_and_body_deadlines(serve):
    port, _ = serve(header_timeout=1.0, body_timeout=1.0)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\n")
        out = b""
        for _ in range(20):  # drip a header byte every 0.2 s: the head's deadline still ends it
            try:
                s.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
            s.settimeout(0.01)
            try:
                out += s.recv(4096)
                if out:
                    break
            except socket.timeout:
                pass
            s.settimeout(10)
    assert out.startswith(b"HTTP/1.1 408") and 0.9 < time.monotonic() - t0 < 2.5, out
    t0 = time.monotonic()
    out = raw_exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"")
    assert out.startswith(b"HTTP/1.1 408") and b"body" in out and time.monotonic() - t0 < 2.5


def test_bounded_pool_and_small_request_under_stalled_connections(serve):
    """300 connections that send nothing or half a head hold no worker; requests beyond the
    pool wait for it, never more than ``workers`` at once; a small request still answers fast."""
    port, app = serve(workers=2, header_timeout=30.0)
    stalled = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b"POST /echo HTTP/1.1\r\nContent-Le")
        stalled.append(s)
    try:
        results = []
        slow = [threading.Thread(target=lambda: results.append(call(port, "POST", "/slow", b'{"s": 0.3}')[0]))
                for _ in range(6)]
        for t in slow:
            t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        assert call(port, "POST", "/echo", b'{"hi": 1}')[0] == 200
        assert time.monotonic() - t0 < 1.0
        for t in slow:
            t.join(10)
        assert results == [200] * 6 and app.peak == 2
        assert threading.active_count() < 40  # no thread per connection
    finally:
        for s in stalled:
            s.close()


def test_busy_server_answers_503(serve):
    port, _ = serve(workers=1, max_pending=1)
    out = []
    threads = [threading.Thread(target=lambda: out.append(call(port, "POST", "/slow", b'{"s": 0.5}')))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    codes = sorted(r[0] for r in out)
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    assert all(r[2].get("Retry-After") == "1" for r in out if r[0] == 503)


def test_bearer_token(serve):
    port, _ = serve(token="s3cret-token")
    status, body, headers = call(port, "POST", "/echo", b"{}")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    for bad in ("Bearer wrong", "Basic s3cret-token", "Bearer s3cret-token-longer", "Bearer "):
        assert call(port, "POST", "/echo", b"{}", {"Authorization": bad})[0] == 401
    assert call(port, "POST", "/echo", b"{}", {"Authorization": "Bearer s3cret-token"})[0] == 200
    assert call(port, "GET", "/health")[1] == {"status": "ok"}  # no details without the token
    assert call(port, "GET", "/health", None, {"Authorization": "Bearer s3cret-token"})[1]["model"] == "secret-model.onnx"


def test_warning_beyond_loopback(caplog):
    with caplog.at_level(logging.WARNING, logger="quantseal.runtime.http_server"):
        HTTPServer(EchoApp(), "127.0.0.1", 0).server_close()
        assert not caplog.records
        HTTPServer(EchoApp(), "0.0.0.0", 0).server_close()  # bound, never served: no traffic
    assert any("beyond this machine" in r.getMessage() and "--token-file" in r.getMessage() for r in caplog.records)
