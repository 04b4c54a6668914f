"""``quantseal serve``: loopback round trips equal the local Embedder, malformed requests get HTTP
400 while the server keeps serving, and the client reports a dead endpoint clearly."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from http_request import request, served_in_thread  # tests/runtime/http_request.py

from quantseal.errors import BadInput
from quantseal.runtime.client import EndpointEmbedder
from quantseal.runtime.pipelines import Embedder

pytestmark = pytest.mark.slow
TEXTS = ["The first text.", "A second one, a little longer than the first.", "Third."]


@pytest.fixture(scope="module")
def local(minilm_rtn_onnx) -> Embedder:
    return Embedder(minilm_rtn_onnx, provider="cpu")


@pytest.fixture(scope="module")
def served(minilm_rtn_onnx):
    """A server on 127.0.0.1, free port, in a thread (max batch 8); shut down afterwards."""
    from quantseal.runtime.server import EmbeddingService, make_server

    service = EmbeddingService.from_path(minilm_rtn_onnx, provider="cpu", max_batch=8)
    server = make_server(service, "127.0.0.1", 0)
    with served_in_thread(server) as url:
        yield url


def test_round_trip_equals_embedder(served, local):
    client = EndpointEmbedder(served)
    got = client.embed(TEXTS)
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, local.embed(TEXTS), rtol=0, atol=1e-6)
    np.testing.assert_allclose(EndpointEmbedder(served + "/embed/").embed("Third."), got[2:], atol=1e-6)


def test_token_level_queries(served, local):
    """input_ids + attention_mask (what black-box verification sends) → the same embeddings."""
    client = EndpointEmbedder(served)
    batch = local.tokenizer(TEXTS)
    want = local.session.run(batch, ["sentence_embedding"])["sentence_embedding"]
    np.testing.assert_allclose(client.embed_ids(batch), want, atol=1e-6)
    np.testing.assert_allclose(client(batch), want, atol=1e-6)  # as a verification embed_fn
    np.testing.assert_allclose(client.embed_ids(batch), client.embed(TEXTS), atol=1e-6)
    # ragged rows without a mask are right-padded by the server
    ragged = [list(r[m.astype(bool)]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    np.testing.assert_allclose(client.embed_ids(ragged), want, atol=1e-6)
    # a rare token id inserted into a sentence changes its embedding
    rare = [ragged[0][:2] + [29000] + ragged[0][2:]]
    assert float(client.embed_ids(rare)[0] @ want[0]) < 0.9999


def test_health(served):
    status, body = request(served, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["dim"] == 384 and body["provider"] == "cpu"
    assert body["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and body["max_batch"] == 8
    assert EndpointEmbedder(served).health() == body


BAD = [
    ("not json", b"{\"texts\": [", "not valid JSON"),
    ("not utf-8", b"\xff\xfe", "not valid JSON"),
    ("not an object", b"[\"a\"]", "JSON object"),
    ("no field", b"{}", "exactly one of"),
    ("both fields", json.dumps({"texts": ["a"], "input_ids": [[101]]}).encode(), "exactly one of"),
    ("texts not a list", json.dumps({"texts": "a sentence"}).encode(), "non-empty list of strings"),
    ("empty texts", json.dumps({"texts": []}).encode(), "non-empty list of strings"),
    ("texts of numbers", json.dumps({"texts": ["a", 3]}).encode(), "strings only"),
    ("too many texts", json.dumps({"texts": ["a"] * 9}).encode(), "too large"),
    ("ids not ints", json.dumps({"input_ids": [[101, "x"]]}).encode(), "integers only"),
    ("ids bool", json.dumps({"input_ids": [[101, True]]}).encode(), "integers only"),
    ("ids flat", json.dumps({"input_ids": [101, 102]}).encode(), "non-empty list of integers"),
    ("ids out of vocab", json.dumps({"input_ids": [[101, 10 ** 9]]}).encode(), "token ids must lie in"),
    ("negative id", json.dumps({"input_ids": [[-1]]}).encode(), "token ids must lie in"),
    ("too many tokens", json.dumps({"input_ids": [[101] * 513]}).encode(), "tokens (at most 512)"),
    ("mask shape", json.dumps({"input_ids": [[101, 102]], "attention_mask": [[1, 1, 1]]}).encode(), "'attention_mask' is"),
    ("mask values", json.dumps({"input_ids": [[101, 102]], "attention_mask": [[1, 2]]}).encode(), "0/1"),
    ("ragged with mask", json.dumps({"input_ids": [[101, 102], [101]], "attention_mask": [[1, 1], [1]]}).encode(),
     "differ in length"),
    ("lone surrogate", b'{"texts": ["ok", "bad \\ud800 text"]}', "lone surrogate"),
    ("huge id", json.dumps({"input_ids": [[101, 10 ** 100]]}).encode(), "out of range"),
    ("huge negative id", json.dumps({"input_ids": [[-(10 ** 30)]]}).encode(), "out of range"),
    ("huge mask value", json.dumps({"input_ids": [[101]], "attention_mask": [[2 ** 64]]}).encode(), "out of range"),
    ("deep nesting", b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("NaN", b'{"texts": ["a"], "x": NaN}', "not valid JSON"),
    ("texts of lists", json.dumps({"texts": [["a"]]}).encode(), "strings only"),
    ("ids of floats", json.dumps({"input_ids": [[101.0]]}).encode(), "integers only"),
    ("ids a dict", json.dumps({"input_ids": {"a": 1}}).encode(), "non-empty list"),
    ("text too long", json.dumps({"texts": ["a" * 100_001]}).encode(), "characters (at most 100000)"),
]


@pytest.mark.parametrize("name,body,msg", BAD, ids=[b[0] for b in BAD])
def test_malformed_request_is_400_and_serving_continues(served, name, body, msg):
    status, answer = request(served, "POST", "/embed", body)
    assert status == 400, answer
    assert msg in answer["error"] and answer["status"] == 400
    status, answer = request(served, "POST", "/embed", json.dumps({"texts": ["still serving"]}).encode())
    assert status == 200 and len(answer["embeddings"]) == 1 and len(answer["embeddings"][0]) == 384


def test_other_http_errors(served):
    assert request(served, "GET", "/nowhere")[0] == 404
    assert request(served, "POST", "/nowhere", b"{}")[0] == 404
    assert request(served, "GET", "/embed")[0] == 405
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        status, body = request(served, method, "/embed", b"{}")
        assert status == 405 and body["status"] == 405
    status, body = request(served, "POST", "/embed", b"{}", {"Content-Length": str(1 << 30)})
    assert status == 413 and "too large" in body["error"]
    with pytest.raises(BadInput, match="HTTP 400.*too large"):
        EndpointEmbedder(served).embed(["x"] * 9)
    assert request(served, "GET", "/health")[0] == 200


def test_dead_endpoint_is_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = EndpointEmbedder(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(BadInput, match=rf"127.0.0.1:{port}/embed: the endpoint does not answer"):
        client.embed(["hello"])
    with pytest.raises(BadInput, match="does not answer"):
        client.health()
    with pytest.raises(BadInput, match="http://"):
        EndpointEmbedder("127.0.0.1:8000")


def _read_line(stream, timeout: float) -> str:
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: q.put(stream.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return ""


def test_serve_cli_port_0(minilm_rtn_onnx, local):
    """``quantseal serve MODEL --port 0``: the bound URL is the first line of stdout; SIGTERM stops it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "quantseal.cli", "serve", str(minilm_rtn_onnx), "--host",
                             "127.0.0.1", "--port", "0", "--provider", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _read_line(proc.stdout, 120).strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.poll())
        assert request(url, "POST", "/embed", b"{oops")[0] == 400
        np.testing.assert_allclose(EndpointEmbedder(url).embed(TEXTS), local.embed(TEXTS), atol=1e-6)
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_serve_cli_bad_model_exit_2(tmp_path):
    from quantseal.cli import main

    assert main(["serve", str(tmp_path / "missing.onnx"), "--port", "0"]) == 2
    (tmp_path / "empty-token").write_text("\n")
    for flags in (["--workers", "0"], ["--header-timeout", "nan"], ["--body-timeout", "-1"], ["--max-chars", "0"],
                  ["--token-file", str(tmp_path / "no-token")], ["--token-file", str(tmp_path / "empty-token")]):
        assert main(["serve", str(tmp_path / "missing.onnx"), "--port", "0", *flags]) == 2, flags


def test_server_and_client_import_no_torch():
    code = ("import sys, json\nimport quantseal.runtime.server, quantseal.runtime.client, quantseal.runtime.suspects\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
            " or m.startswith(('quantseal.compress', 'quantseal.export')))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_small_request_answers_under_stalled_connections_and_huge_texts(minilm_rtn_onnx, tmp_path):
    """Issue 11 §5 done-when: ``quantseal serve`` answers a small request within 1 s while 300
    stalled connections and fifteen 1 MB texts are in flight (refused before tokenising), and
    its RSS returns to within 50 MB of the level before the burst.  The bearer token guards it."""
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "quantseal.cli", "serve", str(minilm_rtn_onnx), "--port", "0",
                             "--provider", "cpu", "--threads", "1", "--token-file", str(token)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    auth = {"Content-Type": "application/json", "Authorization": "Bearer tok-123"}
    small = json.dumps({"texts": ["hi"]}).encode()
    stalled = []
    try:
        url = _read_line(proc.stdout, 120).strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.poll())
        port = int(url.rsplit(":", 1)[1])
        assert request(url, "POST", "/embed", small)[0] == 401
        assert request(url, "GET", "/health")[1] == {"status": "ok"}
        assert request(url, "GET", "/health", None, auth)[1]["dim"] == 384
        for _ in range(20):  # warm: the allocator's steady state
            assert request(url, "POST", "/embed", json.dumps({"texts": TEXTS * 4}).encode(), auth)[0] == 200
        before = _rss_mb(proc.pid)
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i % 2:
                s.sendall(b"POST /embed HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"texts\"")
            stalled.append(s)
        big = json.dumps({"texts": ["word " * 200_000]}).encode()  # 1 MB of text
        codes = []
        burst = [threading.Thread(target=lambda: codes.append(request(url, "POST", "/embed", big, auth)))
                 for _ in range(15)]
        for t in burst:
            t.start()
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            status, body = request(url, "POST", "/embed", small, auth)
            latencies.append(time.monotonic() - t0)
            assert status == 200 and len(body["embeddings"][0]) == 384
        for t in burst:
            t.join(60)
        assert len(codes) == 15 and all(c == 400 and "characters" in b["error"] for c, b in codes), codes[:1]
        assert max(latencies) < 1.0, latencies
        peak = _rss_mb(proc.pid)
        for s in stalled:
            s.close()
        stalled.clear()
        time.sleep(1.0)
        after = _rss_mb(proc.pid)
        print(f"RSS before {before:.1f} MB, in burst {peak:.1f} MB, after {after:.1f} MB; "
              f"small-request latency max {max(latencies) * 1000:.0f} ms")
        assert after - before < 50, (before, peak, after)
    finally:
        for s in stalled:
            s.close()
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            proc.stdout.close()
            proc.stderr.close()
