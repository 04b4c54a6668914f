"""The bad-input matrix (issue 11): every CLI command against every class of bad input.

Each case of tests/bad_input_cases.py runs the real command line in-process on the inputs of
tests/bad_input_world.py (built once, from the tiny seeded BERT) and must be refused with exit
code 2 and exactly one non-empty line on stderr (no traceback), leave nothing at its output
paths (nor temporary leftovers), and leave every input unchanged (around each case: the sha256 of
every input file up to 1 MB, size and mtime of the larger ones and of every entry beside them; the
whole input folder is hashed before and after the matrix); or, where marked, be a documented
success (exit 0, inputs unchanged).  ``serve`` cases stop where the server would
start serving (its start-up arguments are what is checked)."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bad_input_cases import CASES
from bad_input_world import build
from cli_run import run


SMALL = 1 << 20  # inputs up to this size are hashed around every case; larger ones by size and mtime


class _Serving(Exception):
    """Raised where ``quantseal serve`` would start serving: its start-up arguments were accepted."""


class _Suspect(http.server.BaseHTTPRequestHandler):
    """A misbehaving endpoint: the path prefix picks how it answers."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        p = self.path
        if p.startswith("/stall"):
            time.sleep(3)
            return
        if p.startswith("/huge"):
            body = b"[" + b"0.0," * 100_000 + b"0.0]"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        status, body, ctype = {"/notjson": (200, b"hello, not json", "text/plain"),
                               "/list": (200, b"[1, 2, 3]", "application/json"),
                               "/error": (500, b"<html>oops</html>", "text/html")}.get(
            "/" + p.split("/")[1], (404, b"{}", "application/json"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    """(placeholder → path, the world folder): the inputs, a misbehaving endpoint, a busy port and
    a closed one."""
    W = tmp_path_factory.mktemp("bad_inputs") / "w"
    names = build(W, tiny_bert_dir)
    ro = _read_only_folder(W / "ro")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Suspect)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    names.update(url=f"http://127.0.0.1:{server.server_address[1]}", busy_port=str(busy.getsockname()[1]),
                 closed_port=str(closed_port), ro=str(W / "ro") if ro else "")
    before, full = _listing(W), _digest(W)
    yield names, W
    server.shutdown()
    busy.close()
    after = _listing(W)
    if ro == "immutable":
        subprocess.run(["chattr", "-i", str(W / "ro")], check=True)
    assert after == before and _digest(W) == full, "the matrix changed its inputs"


def _read_only_folder(path: Path) -> str | None:
    """Make ``path`` a folder the test process cannot write in: mode 0555, or for root (whom modes
    do not stop) the immutable attribute; how, or None where neither works."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "mode"
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return "immutable" if not os.access(path, os.W_OK) else None


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: (kind, size, mtime) of files, kind of folders and links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = ("file", st.st_size, st.st_mtime_ns) if p.is_file() and not p.is_symlink() else (
                "link" if p.is_symlink() else "dir",)
    return out


def _digest(path: Path, limit: float = float("inf")) -> str:
    """sha256 over a file, or over a folder's relative names and file contents; files over
    ``limit`` bytes enter by size and modification time only (the module hashes them in full
    before and after the matrix)."""
    h = hashlib.sha256()
    for p in [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []:
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file():
            st = p.stat()
            h.update(p.read_bytes() if st.st_size <= limit else f"{st.st_size}/{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _inputs(argv: list[str], W: Path) -> list[Path]:
    """The world entries an argv names (each top-level entry under ``W`` once)."""
    out = set()
    for a in argv:
        if a.startswith(str(W) + "/"):
            out.add(W / Path(a).relative_to(W).parts[0])
    return sorted(out)


def _outputs(T: Path) -> dict[str, str]:
    return {"T": str(T), "o_ck": str(T / "ck"), "o_onnx": str(T / "out" / "model.onnx"), "o_dir": str(T / "batch"),
            "o_db": str(T / "new.db"), "o_key": str(T / "newkey"), "o_board": str(T / "board"),
            "o_npy": str(T / "out" / "e.npy")}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch):
    names, W = world
    if "{ro}" in "".join(case.argv) and not names["ro"]:
        pytest.skip("no read-only folder here (root without chattr +i)")
    T = tmp_path / "t"
    T.mkdir()
    argv = [a.format_map({**names, **_outputs(T)}) for a in case.argv]
    monkeypatch.setattr("quantseal.runtime.http_server.HTTPServer.serve_forever",
                        lambda self: (_ for _ in ()).throw(_Serving()))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # serve's SIGTERM handler: not in the test process
    used = _inputs(argv, W)
    digests = {p: _digest(p, SMALL) for p in used}
    listing = _listing(W)
    try:
        rc, out, err = run(argv)
    except _Serving:
        rc, out, err = 0, "", ""
    assert {p: _digest(p, SMALL) for p in used} == digests, "an input changed"
    assert _listing(W) == listing, "something was written beside the inputs"
    if case.ok:
        assert rc == 0, (case.ok, err)
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err, out[-300:])
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.needle.lower() in lines[0].lower(), (case.needle, lines[0])
    assert sorted(p.name for p in T.iterdir()) == [], "something was written at the output path"
    for a in argv:
        if a.startswith(("/proc/", "/sys/")):
            assert not os.path.lexists(a)


def test_the_matrix_is_large_and_documented():
    """≥ 255 cases; every documented success is listed with its reason in the README."""
    assert len(CASES) >= 255
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for c in CASES:
        if c.ok:
            assert c.id in readme, f"README does not list the documented success {c.id}"


@pytest.mark.parametrize("argv, word", [
    (["run", "{onnx_model}", "--text", b"caf\xe9"], "--text"),
    (["registry", "add", "{T}/r.db", "--key", "{key}", "--user", b"caf\xe9"], "customer id"),
    pytest.param(["export", "{ck}", "-o", "{T}/m.onnx", "--board", "{board}", "--key", "{key}", "--registry",
                  "{reg_db}", "--user", b"\xff\xfe"], "customer id", marks=pytest.mark.slow),  # imports torch
])
def test_non_utf8_argv_in_a_real_process(world, tmp_path, argv, word):
    """Bytes that are not UTF-8 on a real command line (Python passes them on as lone
    surrogates): one line on stderr, exit 2, nothing written."""
    names, _ = world
    T = tmp_path / "t"
    T.mkdir()
    args = [a if isinstance(a, bytes) else a.format_map({**names, "T": str(T)}).encode() for a in argv]
    r = subprocess.run([sys.executable.encode(), b"-m", b"quantseal", *args], capture_output=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and word in err, err
    assert list(T.iterdir()) == []
