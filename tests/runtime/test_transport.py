"""verify's HTTP client against hostile endpoints written here on raw sockets: a drip of one
header byte a second, an oversized body (declared and streamed), rate limits, headers; every
breach is a BadInput within its deadline, and the CLI turns it into one line and exit 2."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from quantseal.errors import BadInput
from quantseal.runtime.transport import Deadline, Transport, parse_header, read_api_key


class RawServer:
    """A loopback TCP server: ``behave(conn, request_bytes, n)`` answers the n-th request."""

    def __init__(self, behave):
        self.behave, self.requests, self.times = behave, [], []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                self.times.append(time.monotonic())
                self.behave(conn, head, len(self.requests))
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self.sock.close()
        self.thread.join(5)


def answer(conn, status=200, body=b'{"ok": true}', extra=""):
    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"{extra}Connection: close\r\n\r\n".encode() + body)


@pytest.fixture
def raw():
    servers = []

    def make(behave):
        s = RawServer(behave)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def drip(conn, head, n):
    """One byte of a status line and headers a second: each recv succeeds, none completes."""
    for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 100:
        conn.sendall(bytes([b]))
        time.sleep(1.0)


def test_drip_hits_the_query_timeout(raw):
    s = raw(drip)
    t0 = time.monotonic()
    with pytest.raises(BadInput, match=r"no complete answer within the query timeout of 2 s"):
        Transport(s.url, timeout=2.0).post("/embed", {"x": 1})
    assert 1.9 < time.monotonic() - t0 < 3.5


def test_drip_hits_the_whole_verification_deadline(raw):
    s = raw(drip)
    tr = Transport(s.url, timeout=60.0, deadline=Deadline(1.5))
    t0 = time.monotonic()
    with pytest.raises(BadInput, match=r"verification's deadline of 1.5 s"):
        tr.get("/health")
    assert time.monotonic() - t0 < 2.5
    with pytest.raises(BadInput, match="deadline"):  # spent: the next query does not even start
        tr.get("/health")


def test_response_size_cap_declared_and_streamed(raw):
    big = raw(lambda c, h, n: answer(c, body=b"[" + b"0," * 600_000 + b"0]"))
    with pytest.raises(BadInput, match=r"answer of 1200003 bytes exceeds the cap of 100000 bytes"):
        Transport(big.url, max_bytes=100_000).get("/x")

    def chunked(conn, head, n):  # no Content-Length: the cap applies as it streams
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for _ in range(50):
            conn.sendall(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    s = raw(chunked)
    with pytest.raises(BadInput, match="exceeds the cap of 100000 bytes"):
        Transport(s.url, max_bytes=100_000).get("/x")
    with pytest.raises(BadInput, match="not JSON"):  # under a larger cap the whole stream is read
        Transport(s.url, max_bytes=10**6).get("/x")


def test_rate_limits_are_retried_with_backoff(raw):
    def limited(conn, head, n):
        if n == 1:
            answer(conn, 429, b'{"error": "slow down"}', "Retry-After: 0.3\r\n")
        elif n == 2:
            answer(conn, 503, b'{"error": {"message": "busy"}}')
        else:
            answer(conn, 200, b'{"ok": 1}')

    s = raw(limited)
    tr = Transport(s.url, backoff=0.2)
    assert tr.post("/embed", {"a": 1}) == {"ok": 1}
    assert tr.queries == 3 and len(s.requests) == 3
    assert s.times[1] - s.times[0] >= 0.28  # Retry-After honoured
    assert s.times[2] - s.times[1] >= 0.38  # the second wait doubled the backoff (0.2 · 2)

    always = raw(lambda c, h, n: answer(c, 429, b'{"error": "no"}'))
    with pytest.raises(BadInput, match=r"HTTP 429 after 2 retries: no"):
        Transport(always.url, retries=2, backoff=0.05).get("/x")
    forever = raw(lambda c, h, n: answer(c, 429, b"{}", "Retry-After: 100\r\n"))
    with pytest.raises(BadInput, match="rate-limited"):
        Transport(forever.url, timeout=5).get("/x")


def test_qps_cap_and_headers(raw, tmp_path):
    s = raw(lambda c, h, n: answer(c))
    keyf = tmp_path / "api.key"
    keyf.write_text("sk-test-123\n")
    name, value = read_api_key(keyf)
    tr = Transport(s.url + "/prefix", qps=5.0, headers={name: value, **dict([parse_header("X-Team: red")])})
    for _ in range(4):
        tr.get("/health")
    gaps = [b - a for a, b in zip(s.times, s.times[1:])]
    assert min(gaps) >= 0.17, gaps  # 5 per second
    for req in s.requests:
        assert req.startswith(b"GET /prefix/health HTTP/1.1")
        assert b"\r\nAuthorization: Bearer sk-test-123\r\n" in req and b"\r\nX-Team: red\r\n" in req
    for bad in ("no colon", "X: a\r\nInjected: 1", ": empty"):
        with pytest.raises(BadInput, match="--header"):
            parse_header(bad)
    keyf.write_text("two words\n")
    with pytest.raises(BadInput, match="one printable token"):
        read_api_key(keyf)
    with pytest.raises(BadInput, match="cannot read"):
        read_api_key(tmp_path / "missing")


def test_not_json_and_dead_endpoint(raw):
    s = raw(lambda c, h, n: answer(c, body=b"<html>"))
    with pytest.raises(BadInput, match="not JSON"):
        Transport(s.url).get("/x")
    deep = raw(lambda c, h, n: answer(c, body=b"[" * 100_000))
    with pytest.raises(BadInput, match="not JSON"):
        Transport(deep.url).get("/x")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BadInput, match="does not answer"):
        Transport(f"http://127.0.0.1:{port}", timeout=2).get("/x")
    for bad in ("ftp://x", "http://", 3):
        with pytest.raises(BadInput):
            Transport(bad)


def test_cli_verify_breach_is_one_line_exit_2(raw, tmp_path):
    """``quantseal verify URL --deadline 2`` against a drip: exit 2, one line, within the deadline."""
    import contextlib
    import io

    from quantseal import keys as qk
    from quantseal.cli import main

    import shutil

    from quantseal.models import default_model_path
    from quantseal.text import TextTokenizer, pydoc_sentences

    secret = bytes(range(32))
    key, reg, board = tmp_path / "k", tmp_path / "r.json", tmp_path / "board"
    qk.write_key(key, secret)
    board.mkdir()
    shutil.copyfile(default_model_path() / "tokenizer.json", board / "tokenizer.json")
    tok = TextTokenizer(board)
    hosts = qk.host_sentence_pool(tok, pydoc_sentences("all"), 8, 20, limit=40)
    ts = qk.derive_triggers(secret, tok, 16, hosts, per_bit=2, tokens_per_bit=2, hidden=8)
    (board / qk.BOARD_MANIFEST).write_text(json.dumps({
        "format": qk.BOARD_FORMAT, "schema": qk.BOARD_SCHEMA, "bits": 16, "hosts": hosts, "triggers_per_bit": 2,
        "tokens_per_bit": 2, "hidden": 8, "trigger_digest": ts.digest(), "key_id": qk.key_id(secret)}))
    qk.Registry(secret, 16, path=reg).save()
    s = raw(drip)
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["verify", s.url, "--board", str(board), "--key", str(key), "--registry", str(reg),
                   "--deadline", "2"])
    assert rc == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert "deadline of 2 s" in err.getvalue() and time.monotonic() - t0 < 6
    for flags in (["--timeout", "0"], ["--qps", "nan"], ["--header", "bad"], ["--api", "openai-chat"]):
        with contextlib.redirect_stderr(io.StringIO()) as e, contextlib.redirect_stdout(io.StringIO()):
            rc = main(["verify", s.url, "--board", str(board), "--key", str(key), "--registry", str(reg), *flags])
        assert rc == 2 and len(e.getvalue().strip().splitlines()) == 1, (flags, e.getvalue())
