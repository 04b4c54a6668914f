"""Fast start (issue 13, part 7): the runtime commands ``run``, ``serve`` and ``verify`` import
neither torch nor transformers.

Each command runs in a fresh interpreter under ``python -X importtime``, which writes one line per
module actually imported to stderr; the test reads those lines.  onnxruntime and tokenizers must be
among them, which shows that the commands did their work and that the check sees real imports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from quantseal import keys as qk
from quantseal.text import TextTokenizer, pydoc_sentences

HEAVY = ("torch", "transformers")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)\s*$")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-X", "importtime", "-m", "quantseal.cli", *args]


def imported_modules(stderr: str) -> set[str]:
    """Top-level package names of every module listed by ``-X importtime``."""
    names = set()
    for line in stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            names.add(m.group(2).split(".")[0])
    return names


def _assert_light(stderr: str) -> None:
    mods = imported_modules(stderr)
    assert {"onnxruntime", "tokenizers", "numpy"} <= mods, sorted(mods)
    assert not set(HEAVY) & mods, f"imported {sorted(set(HEAVY) & mods)}"


def test_imported_modules_parser_sees_nested_imports():
    err = ("import time: self [us] | cumulative | imported package\n"
           "import time:       120 |        120 |     torch._C\n"
           "import time:       500 |        900 |   torch\n"
           "quantseal: error: nothing\n")
    assert imported_modules(err) == {"torch"}


def test_run_imports_neither_torch_nor_transformers(minilm_rtn_onnx, tmp_path):
    out = tmp_path / "e.npy"
    p = subprocess.run(_cmd("run", str(minilm_rtn_onnx), "--text", "hi", "--provider", "cpu", "-o", str(out),
                            "--json"), capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["n"] == 1 and out.is_file()
    _assert_light(p.stderr)


def test_serve_imports_neither_torch_nor_transformers(minilm_rtn_onnx):
    proc = subprocess.Popen(_cmd("serve", str(minilm_rtn_onnx), "--port", "0", "--provider", "cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        import urllib.request

        req = urllib.request.Request(url + "/embed", data=json.dumps({"texts": ["hi"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert len(json.loads(r.read())["embeddings"][0]) == 384
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    _assert_light(err)


def test_verify_imports_neither_torch_nor_transformers(minilm_rtn_onnx, minilm_path, tmp_path):
    """A real verification of the (unmarked) export against an 8-bit board manifest derived from a
    key: it decodes the bits through onnxruntime and names no owner."""
    key = qk.write_key(tmp_path / "key")
    tok = TextTokenizer(minilm_path)
    hosts = qk.host_sentence_pool(tok, pydoc_sentences("all"), 8, 20)
    ts = qk.derive_triggers(key, tok, 8, hosts, per_bit=2, tokens_per_bit=2, hidden=384)
    board = tmp_path / "board"
    board.mkdir()
    (board / qk.BOARD_MANIFEST).write_text(json.dumps(
        {"format": qk.BOARD_FORMAT, "schema": qk.BOARD_SCHEMA, "bits": 8, "hosts": hosts, "triggers_per_bit": 2,
         "tokens_per_bit": 2, "hidden": 384, "trigger_digest": ts.digest(), "key_id": qk.key_id(key)}))
    shutil.copyfile(minilm_path / "tokenizer.json", board / "tokenizer.json")
    reg = qk.Registry.open(tmp_path / "reg.json", key, 8)
    reg.add("alice")
    reg.save()
    p = subprocess.run(_cmd("verify", str(minilm_rtn_onnx), "--board", str(board), "--key", str(tmp_path / "key"),
                            "--registry", str(tmp_path / "reg.json"), "--provider", "cpu", "--json"),
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["owner"] is None and res["n_bits"] == 8 and res["queries"] > 0
    _assert_light(p.stderr)


def test_commands_that_import_transformers_find_it_quiet():
    """Without importing transformers itself, the CLI still leaves it at error verbosity with no
    progress bars for the commands that do import it (compress, export, board train)."""
    code = ("import os; os.environ.pop('TRANSFORMERS_VERBOSITY', None); "
            "os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None); import sys, logging; "
            "from quantseal.cli import _quiet_libraries; _quiet_libraries(); "
            "assert 'transformers' not in sys.modules; "
            "from transformers.utils import logging as hl; "
            "print(hl.get_verbosity() == logging.ERROR, hl.is_progress_bar_enabled())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "False"]


def test_inspect_of_an_onnx_file_imports_neither(minilm_rtn_onnx):
    """``inspect model.onnx`` reads the graph with onnx alone (a checkpoint still needs torch)."""
    p = subprocess.run(_cmd("inspect", str(minilm_rtn_onnx), "--json"), capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["path"] == str(minilm_rtn_onnx)
    mods = imported_modules(p.stderr)
    assert "onnx" in mods and not set(HEAVY) & mods, sorted(set(HEAVY) & mods)
