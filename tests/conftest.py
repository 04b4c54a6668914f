"""Shared fixtures: tiny seeded models built from a transformers config (fast) and the real
bundled all-MiniLM-L6-v2 (slow, session-scoped, built once)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# One torch/OpenMP thread for the suite and every process it starts, unless the caller set
# OMP_NUM_THREADS: the test models are tiny, and a second thread on a 2-core machine mostly spins
# (tests/compress/test_cbq.py under load: 14.7 CPU-s with one thread, 138 with two).  Set before
# torch is imported, so it holds in this process and is inherited by subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from quantseal.models import default_model_path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return default_model_path()


def _save_tiny(model, folder: Path, tokenizer_from: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(tokenizer_from / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer BERT (hidden 64) with seeded weights and MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_bert"), minilm_path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer LLaMA (hidden 64, GQA 4/2 heads) with seeded weights; MiniLM's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_llama"), minilm_path)


# ----------------------------------------------------------------------------- real MiniLM, compressed and exported
@pytest.fixture(scope="session")
def minilm_rtn_checkpoint(tmp_path_factory, minilm_path) -> Path:
    """The bundled MiniLM compressed by RTN at 4.5 bits (``quantseal compress``, ~10 s)."""
    from quantseal.cli import main

    out = tmp_path_factory.mktemp("minilm_rtn") / "ck"
    assert main(["compress", str(minilm_path), "-o", str(out), "--budget", "4.5", "--method", "rtn",
                 "--workers", "1", "--json"]) == 0
    return out


@pytest.fixture(scope="session")
def minilm_rtn_export(tmp_path_factory, minilm_rtn_checkpoint) -> dict:
    """``quantseal export minilm_rtn_checkpoint -o .../model.onnx --json``: its parsed JSON report."""
    import contextlib
    import io
    import json

    from quantseal.cli import main

    out = tmp_path_factory.mktemp("minilm_rtn_onnx") / "model.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(minilm_rtn_checkpoint), "-o", str(out), "--json"]) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def minilm_rtn_onnx(minilm_rtn_export) -> Path:
    """``minilm_rtn_checkpoint`` exported to ONNX (tokenizer.json beside it)."""
    return Path(minilm_rtn_export["path"])


# ----------------------------------------------------------------------------- watermark board (Hot-Swap MarkBoard)
WATERMARK_KEY = bytes(range(32))


@pytest.fixture(scope="session")
def watermark_key() -> bytes:
    """The key the session's boards are trained under (tests must not ``import conftest``: with
    several conftest.py files on the path that name is ambiguous)."""
    return WATERMARK_KEY


@pytest.fixture(scope="session")
def minilm_board(tmp_path_factory, minilm_rtn_checkpoint):
    """A 16-bit board trained (seeded, early-stopped) on ``minilm_rtn_checkpoint`` under
    ``WATERMARK_KEY`` and saved; returns the loaded :class:`~quantseal.compress.markboard.Board`."""
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board

    cfg = BoardConfig(bits=16, triggers_per_bit=4, steps=40, seed=0)
    board = train_board(minilm_rtn_checkpoint, WATERMARK_KEY, cfg)
    out = save_board(board, tmp_path_factory.mktemp("board") / "board", minilm_rtn_checkpoint)
    return load_board(out)


# ----------------------------------------------------------------------------- tiny decoder, compressed and exported
@pytest.fixture(scope="session")
def tiny_llama_sharp_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """``tiny_llama_dir`` with its block Linears scaled ×5 (seeded weights otherwise unchanged):
    at the default init scale a random LLaMA's greedy output repeats one token, which cannot tell
    a correct KV cache from a wrong one; scaled, its greedy paths wander over the vocabulary."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(5.0)
    return _save_tiny(model, tmp_path_factory.mktemp("tiny_llama_sharp"), tiny_llama_dir)


def _decoder_export(tmp_path_factory, model_dir: Path, method: str, *compress_args: str) -> tuple[Path, dict]:
    """``quantseal compress --method METHOD --workers 1 ARGS`` then ``quantseal export``:
    (checkpoint folder, the export's parsed ``--json`` report)."""
    import contextlib
    import io
    import json

    from quantseal.cli import main

    root = tmp_path_factory.mktemp(f"llama_{method}")
    ck = root / "ck"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared machine
    try:
        assert main(["compress", str(model_dir), "-o", str(ck), "--method", method, "--workers", "1", "--json",
                     *compress_args]) == 0
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["export", str(ck), "-o", str(root / "onnx" / "model.onnx"), "--json", "--accuracy-level", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    return ck, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def llama_rtn_export(tmp_path_factory, tiny_llama_sharp_dir) -> tuple[Path, dict]:
    """The sharpened tiny LLaMA compressed by RTN at 4.5 bits and exported: (checkpoint, report)."""
    return _decoder_export(tmp_path_factory, tiny_llama_sharp_dir, "rtn", "--budget", "4.5")


@pytest.fixture(scope="session")
def llama_lq_export(tmp_path_factory, tiny_llama_sharp_dir) -> tuple[Path, dict]:
    """The same compressed by LQ with int2/int4 and rank 0/4 candidates at 6 bits, a budget where the plan
    buys low-rank branches for these 64-wide matrices (at 4.5 bits it buys none), and exported."""
    return _decoder_export(tmp_path_factory, tiny_llama_sharp_dir, "lq", "--budget", "6", "--formats", "int2,int4",
                           "--ranks", "0,4")


@pytest.fixture(scope="session")
def llama_mb_export(tmp_path_factory, tiny_llama_sharp_dir) -> tuple[Path, dict]:
    """The same under a whole-file budget (``--budget-mb 1.5``), so the tied token table joins the
    plan and is quantised, and exported: (checkpoint, report)."""
    return _decoder_export(tmp_path_factory, tiny_llama_sharp_dir, "rtn", "--budget-mb", "1.5")


@pytest.fixture(scope="session")
def llama_board(tmp_path_factory, llama_rtn_export):
    """A 32-bit decoder board (target-token pairs, next-token logits; the ``tied`` layout: the mark
    folded into the token table the head reads too) trained, seeded, on the
    sharpened tiny LLaMA's RTN checkpoint under ``WATERMARK_KEY`` and saved; the loaded
    :class:`~quantseal.compress.markboard.Board`."""
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board

    ck = llama_rtn_export[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A trained at lr / sqrt(hidden): on this random 64-wide model a frozen random A (the default,
        # chosen on SmolLM2) leaves a few branches below the margin within 60 steps
        board = train_board(ck, WATERMARK_KEY, BoardConfig(bits=32, triggers_per_bit=4, steps=60, seed=0,
                                                           decoder_a_lr=None, mark_side="tied"))
    finally:
        torch.set_num_threads(threads)
    return load_board(save_board(board, tmp_path_factory.mktemp("llama_board") / "board", ck))


@pytest.fixture(scope="session")
def llama_board_input(tmp_path_factory, llama_rtn_export):
    """``llama_board``'s settings with the input-side layout (``mark_side="input"``, the default for
    a tied head): the head reads the unmarked table, the lookup adds the customer's rows."""
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board

    ck = llama_rtn_export[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        board = train_board(ck, WATERMARK_KEY, BoardConfig(bits=32, triggers_per_bit=4, steps=60, seed=0,
                                                           decoder_a_lr=None))
    finally:
        torch.set_num_threads(threads)
    return load_board(save_board(board, tmp_path_factory.mktemp("llama_board_input") / "board", ck))


# ----------------------------------------------------------------------------- Ray (optional extra)
@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard) per test module, shut down after it, so no
    later module (on the same pytest-xdist worker) runs beside Ray's threads and processes;
    ``quantseal.distributed`` uses an already-initialised Ray as it is.  Skips without Ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
