"""Streaming compress (issue #12): the same bytes as the in-memory path, a peak RSS flat in depth."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantseal import checkpoint as ckpt
from quantseal.compress.calibrated import CalibratedConfig, calibrated_compress
from quantseal.compress.pipeline import (CompressConfig, build_candidate_table, compress, make_manifest, materialize,
                                         plan)
from quantseal.compress.spill import SpillStore
from quantseal.lazy_source import open_source
from quantseal.models import source_files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic_llama import make_synthetic  # noqa: E402


def _same_folders(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def _in_memory_compress(cfg: CompressConfig) -> Path:
    """The pre-streaming path: the whole model loaded, every tensor built in memory, then written."""
    table = build_candidate_table(cfg, stream=False)
    assert table.source is None
    choice = plan(table, cfg.budget_bits, cfg.budget_mb, ",".join(cfg.formats), cfg.max_decode_ms)
    tensors, entries = materialize(table, choice)
    return ckpt.write_checkpoint(cfg.output, make_manifest(table, cfg, entries, tensors), tensors, cfg.model,
                                 source_files(cfg.model, table.model))


@pytest.mark.parametrize("method,budget", [("rtn", dict(budget_bits=4.5)), ("lq", dict(budget_mb=5.0))])
def test_streamed_plan_equals_in_memory_bytes_on_tiny_llama(tiny_llama_dir, tmp_path, method, budget):
    kw = dict(model=tiny_llama_dir, method=method, workers=1, ranks=(0, 4), **budget)
    assert build_candidate_table(CompressConfig(output=tmp_path / "x", **kw)).source is not None  # really streamed
    compress(CompressConfig(output=tmp_path / "stream", **kw))
    _in_memory_compress(CompressConfig(output=tmp_path / "memory", **kw))
    _same_folders(tmp_path / "stream", tmp_path / "memory")


def test_data_aware_plan_streams_and_matches_the_loaded_model(tiny_llama_dir, tmp_path):
    """--data-aware on a decoder keeps the model on disk (the Fisher block by block,
    compress/fisher_stream.py) and plans what the loaded model plans: the same format and rank per
    matrix, the same stored bytes, errors equal to the Fisher's float32 summation order."""
    kw = dict(model=tiny_llama_dir, method="lq", workers=1, ranks=(0,), budget_mb=1.6, data_aware=True, formats=("int4", "int8"),
              calib_samples=12)
    table = build_candidate_table(CompressConfig(output=tmp_path / "x", **kw))
    assert table.source is not None and all(p.is_meta for p in table.model.model.layers.parameters())
    compress(CompressConfig(output=tmp_path / "stream", **kw))
    _in_memory_compress(CompressConfig(output=tmp_path / "memory", **kw))
    a, b = (ckpt.Manifest.from_json((tmp_path / d / ckpt.MANIFEST).read_text()).matrices for d in ("stream", "memory"))
    assert sorted(a) == sorted(b)
    assert len({(e.format, e.rank) for e in a.values()}) > 1  # the plan really chose between candidates
    for n in a:
        assert (a[n].format, a[n].rank, a[n].bytes) == (b[n].format, b[n].rank, b[n].bytes), n
        assert a[n].error == pytest.approx(b[n].error, rel=1e-3), n
    scratch = Path(table.scratch.name)
    assert (scratch / "fisher.safetensors").is_file() and not (scratch / "fisher.safetensors.table-raw").exists()
    del table
    assert not scratch.exists()  # the streamed Fishers go with their table


def test_streamed_gptq_equals_in_memory_bytes_even_when_spilling(tiny_llama_dir, tmp_path, monkeypatch, spill_record):
    kw = dict(model=tiny_llama_dir, method="gptq", calib_samples=24, batch_size=8, table="int4_b32", table_method="rtn")
    spilled, folders = spill_record.spilled, spill_record.folders  # this run's own spill folders
    # a 0.01 MB cap: every batch but the first goes to disk and back
    a = calibrated_compress(CalibratedConfig(output=tmp_path / "stream", activation_mb=0.01, **kw))
    monkeypatch.undo()
    assert max(spilled) >= 2 and folders
    b = calibrated_compress(CalibratedConfig(output=tmp_path / "memory", **kw), stream=False)
    _same_folders(tmp_path / "stream", tmp_path / "memory")
    assert a["file_bytes"] == b["file_bytes"] == ckpt.tensor_files_bytes(tmp_path / "stream")
    assert not any(f.exists() for f in folders)  # every spill folder removed


@pytest.mark.parametrize("extra", [dict(table="int4_b32", table_method="gptq"),
                                   dict(budget_mb=1.6, formats=("int4", "int8"), table_method="gptq")],
                         ids=["head-calibrated-table", "budget-mb-plan"])
def test_streamed_gptq_with_a_calibrated_table_or_a_plan_equals_in_memory(tiny_llama_dir, tmp_path, extra):
    """A head-calibrated tied table (--table-method gptq, the default) and a --budget-mb plan (each
    Linear's and the table's format from the ILP) no longer load the model: the streamed run reads
    the last block's outputs for the head's inputs and writes the in-memory run's bytes."""
    from quantseal.compress import streaming

    kw = dict(model=tiny_llama_dir, method="gptq", calib_samples=16, batch_size=8, workers=1, **extra)
    calls = []
    real = streaming.stream_gptq
    streaming.stream_gptq = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        a = calibrated_compress(CalibratedConfig(output=tmp_path / "stream", activation_mb=0.01, **kw))
    finally:
        streaming.stream_gptq = real
    assert calls == [1]  # really streamed
    b = calibrated_compress(CalibratedConfig(output=tmp_path / "memory", **kw), stream=False)
    _same_folders(tmp_path / "stream", tmp_path / "memory")
    m = ckpt.Manifest.from_json((tmp_path / "stream" / ckpt.MANIFEST).read_text())
    assert m.extra["table_method"] == "gptq" and a["file_bytes"] == b["file_bytes"]
    if "budget_mb" in extra:
        assert m.extra["plan"]["budget_mb"] == 1.6 and len({e.format for e in m.matrices.values()}) > 1


def test_hugging_face_shards_read_like_one_file(tmp_path):
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048)
    one = make_synthetic("135M", tmp_path / "one", seed=3, **small)
    many = make_synthetic("135M", tmp_path / "many", seed=3, shard_bytes=100_000, **small)
    assert len(list(many.glob("model-*.safetensors"))) > 3 and (many / "model.safetensors.index.json").is_file()
    a, b = open_source(one), open_source(many)
    assert a.stored == b.stored
    for k in a.stored:
        assert torch.equal(a.get(k), b.get(k))
    kw = dict(method="rtn", budget_bits=4.5, workers=1)
    compress(CompressConfig(output=tmp_path / "ck_one", model=one, **kw))
    compress(CompressConfig(output=tmp_path / "ck_many", model=many, **kw))
    ma, ta = ckpt.read_checkpoint(tmp_path / "ck_one")
    mb, tb = ckpt.read_checkpoint(tmp_path / "ck_many")
    assert ma.matrices == mb.matrices and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_nan_in_the_source_is_named_and_nothing_is_written(tmp_path):
    src = make_synthetic("135M", tmp_path / "m", seed=1, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)
    from safetensors.torch import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    from quantseal.cli import main

    assert main(["compress", str(src), "-o", str(tmp_path / "ck"), "--method", "rtn", "--budget", "4.5",
                 "--workers", "1"]) == 2
    assert not (tmp_path / "ck").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_spill_store_round_trips_and_removes_its_folder():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(2, 3, 5, generator=gen) for _ in range(4)]
    store = SpillStore(cap_bytes=2 * 2 * 3 * 5 * 4)  # two in memory, two spilled
    for t in ts:
        store.append(t)
    assert store.spilled == 2 and len(store) == 4
    folder = store._folder
    assert folder.is_dir() and len(list(folder.iterdir())) == 2
    assert all(torch.equal(a, b) for a, b in zip(store, ts))
    store.close()
    assert not folder.exists()


def test_spill_store_drops_items_from_memory_and_disk():
    gen = torch.Generator().manual_seed(1)
    ts = [torch.randn(2, 3, 5, generator=gen) for _ in range(4)]
    store = SpillStore(cap_bytes=2 * 2 * 3 * 5 * 4)
    for t in ts:
        store.append(t)
    folder = store._folder
    store.drop(0)  # in memory
    assert store.memory_bytes == 2 * 3 * 5 * 4
    store.drop(3)  # on disk
    assert len(list(folder.iterdir())) == 1 and len(store) == 4  # places kept
    assert torch.equal(store[1], ts[1]) and torch.equal(store[2], ts[2])
    for i in (0, 3):
        with pytest.raises(LookupError, match="dropped"):
            store[i]
    store.drop(0)  # twice: nothing more to free
    assert store.memory_bytes == 2 * 3 * 5 * 4
    store.close()
    assert not folder.exists()


@pytest.mark.parametrize("cap", [1e9, 700.0])  # all in memory; most batches spilled
def test_a_consumed_window_gives_the_same_next_inputs_and_is_emptied(tiny_llama_dir, cap):
    """run_block_spilled(consume=True): the same outputs, bit for bit, and every input dropped
    as soon as its output is made (the inputs' store holds none by the end)."""
    from transformers import LlamaForCausalLM

    from quantseal.compress.calibration import capture_block_inputs
    from quantseal.compress.streaming import run_block_spilled
    from quantseal.models import DECODER, blocks

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, local_files_only=True).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(1, 30522, (3, 7), generator=gen),
                "attention_mask": torch.ones(3, 7, dtype=torch.long)} for _ in range(4)]
    block = blocks(model, DECODER)[0]
    outs = {}
    for consume in (False, True):
        x = capture_block_inputs(model, DECODER, batches, torch.float32, store=SpillStore(cap))
        sizes = []
        orig_drop = x.hidden.drop
        x.hidden.drop = lambda i: orig_drop(i) or sizes.append(x.hidden.memory_bytes)
        nxt = run_block_spilled(block, x, cap, consume=consume)
        outs[consume] = list(nxt.hidden)
        if consume:
            assert len(sizes) == 4 and sizes[-1] == 0 and (cap < 1e9 or sizes == sorted(sizes, reverse=True))
            if x.hidden._folder is not None:
                assert not list(x.hidden._folder.iterdir())  # spilled inputs deleted too
        else:
            assert not sizes and all(t is not None for t in x.hidden)
        x.hidden.close()
        nxt.hidden.close()
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))


@pytest.mark.slow
def test_minilm_rtn_streamed_equals_in_memory_bytes(minilm_path, tmp_path):
    kw = dict(model=minilm_path, method="rtn", budget_bits=4.5, workers=1)
    compress(CompressConfig(output=tmp_path / "stream", **kw))
    _in_memory_compress(CompressConfig(output=tmp_path / "memory", **kw))
    _same_folders(tmp_path / "stream", tmp_path / "memory")


# ----------------------------------------------------------------------------- memory, flat in depth
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if r.returncode == 0 else -1)")
_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2, vocab_size=30522)


def _start_peak(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m quantseal ARGS`` under a wrapper that prints its peak RSS in bytes (a fresh
    process: its own maximum, whatever else runs beside it); its stderr goes to ``log`` (no pipe
    to fill while the others are waited for)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", _PEAK, sys.executable, "-m", "quantseal", *args],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)


def _peak_rss(proc: subprocess.Popen, log: Path) -> int:
    """The peak RSS a :func:`_start_peak` process reports, once it has finished."""
    out, _ = proc.communicate()
    peak = int(out.strip().splitlines()[-1])
    assert proc.returncode == 0 and peak > 0, log.read_text()[-2000:]
    return peak


_METHODS = {"rtn": ["--budget", "4.5", "--formats", "int4", "--workers", "1"], "gptq": ["--calib-samples", "16"]}


DEEP = 16  # blocks of the deep model (the shallow one has 4)


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """The seeded 4- and 16-block synthetic LLaMAs (built once) compressed by each method of
    ``_METHODS``, the four runs side by side (separate processes: each reads its own peak):
    (root, {depth: float32 safetensors bytes}, {(method, depth): peak RSS bytes})."""
    root = tmp_path_factory.mktemp("depth")
    models = {n: make_synthetic("135M", root / f"l{n}", seed=0, num_hidden_layers=n, **_SHAPE) for n in (4, DEEP)}
    size = {n: sum(p.stat().st_size for p in m.glob("*.safetensors")) for n, m in models.items()}
    procs = {(method, n): _start_peak(["compress", str(m), "-o", str(root / f"ck_{method}{n}"), "--method", method,
                                       *extra], root / f"{method}{n}.log")
             for method, extra in _METHODS.items() for n, m in models.items()}
    try:
        peak = {(method, n): _peak_rss(p, root / f"{method}{n}.log") for (method, n), p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return root, size, peak


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_peak_rss_is_flat_in_depth(depth_runs, method):
    root, size, peaks = depth_runs
    peak = {n: peaks[method, n] for n in (4, DEEP)}
    grew, more = peak[DEEP] - peak[4], size[DEEP] - size[4]  # 12 more blocks: 163 MB of float32 weights
    # loading the model (the pre-streaming path) grows the peak by more than the float32 bytes; a
    # streamed run holds one block, so its peak grows by a small fraction of them
    print(f"{method}: peak RSS {peak} bytes, float32 weights {size} bytes")
    assert grew < 0.25 * more, (peak, size)
    m, _ = ckpt.open_checkpoint(root / f"ck_{method}{DEEP}")
    assert len(m.matrices) == DEEP * 7


# ----------------------------------------------------------------------------- the token table, by rows
def test_block0_inputs_from_the_calibration_rows_equal_the_full_tables(tiny_llama_dir, monkeypatch):
    """Streamed gptq's capture never reads the whole table (``get`` of its key), reads fewer rows
    than the vocabulary, and gives block 0 the same float32 inputs, bit for bit, as the model
    with its whole table loaded; the meta table is put back."""
    from transformers import LlamaForCausalLM

    from quantseal.compress.calibration import calibration_batches, capture_block_inputs
    from quantseal.compress.streaming import capture_rows
    from quantseal.lazy_source import LazySource
    from quantseal.models import DECODER, embedding
    from quantseal.tensorfile import SafetensorsReader
    from quantseal.text import calibration_texts

    batches = calibration_batches(tiny_llama_dir, calibration_texts(None, 12), 4)
    src = LazySource(tiny_llama_dir)
    key = "model.embed_tokens.weight"
    got, rows_read = [], []
    orig_get, orig_rows = LazySource.get, SafetensorsReader.get_rows
    monkeypatch.setattr(LazySource, "get", lambda self, name: got.append(name) or orig_get(self, name))
    monkeypatch.setattr(SafetensorsReader, "get_rows",
                        lambda self, name, a, b: rows_read.append(b - a) or orig_rows(self, name, a, b))
    model = src.load_outside_blocks(skip=frozenset({DECODER.embedding_attr}))
    assert embedding(model, DECODER).weight.is_meta
    x = capture_rows(src, model, batches, torch.device("cpu"), 1e9)
    assert key not in got and 0 < sum(rows_read) < src.stored[key].shape[0]
    assert embedding(model, DECODER).weight.is_meta  # put back
    full = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, local_files_only=True).eval()
    ref = capture_block_inputs(full, DECODER, batches, torch.float32)
    assert len(x.hidden) == len(ref.hidden) == len(batches)
    for a, b in zip(x.hidden, ref.hidden):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    x.hidden.close()


def test_copy_through_in_row_chunks_writes_the_same_bytes(tiny_llama_dir, tmp_path):
    from quantseal.checkpoint_files import ShardedWriter
    from quantseal.compress.streaming import copy_through
    from quantseal.lazy_source import LazySource

    src = LazySource(tiny_llama_dir)
    keys = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"]
    specs = {k: src.stored[k] for k in keys}
    for out, chunk in (("whole", 1 << 30), ("chunks", 100_000)):  # 100 kB: the 7.8 MB table in 79 chunks
        (tmp_path / out).mkdir()
        w = ShardedWriter(tmp_path / out, specs)
        for k in keys:
            copy_through(src, w, k, chunk_bytes=chunk)
        assert w.close()  # every announced tensor written
    _same_folders(tmp_path / "whole", tmp_path / "chunks")


def test_a_streamed_block_never_holds_its_float_linears(tiny_llama_dir, tmp_path, monkeypatch):
    """Streamed gptq with 2 KB chunks (2–8 rows of a matrix): each Linear's float32 weight is read
    from the source a chunk of rows at a time, once, each chunk gone before the next is read; no
    block ever holds a float nn.Linear weight while its stand-ins compute; the bytes equal the
    in-memory run's at the same chunks."""
    import weakref

    from quantseal.compress import held_codes
    from quantseal.lazy_source import LazySource

    monkeypatch.setattr(held_codes, "LINEAR_CHUNK_BYTES", 2048)
    reads: dict[str, list[tuple[int, int]]] = {}
    alive: list = []
    checks = [0]

    def no_float_linears(model) -> None:
        checks[0] += 1
        held = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"
                and not m.weight.is_meta]
        assert not held, held

    real_rows, real_forward = LazySource.get_rows, held_codes.codes_forward

    def get_rows(self, name, start, stop):
        t = real_rows(self, name, start, stop)
        if name.endswith("_proj.weight"):
            assert all(r() is None for r in alive), "a previous chunk of float rows is still alive"
            assert t.shape[0] * t.shape[1] * 4 <= 2048 and t.shape[0] < self.stored[name].shape[0]
            reads.setdefault(name, []).append((start, stop))
            alive.append(weakref.ref(t))
            no_float_linears(self.model)
        return t

    def forward(layer, x):
        no_float_linears(sources[-1].model)
        return real_forward(layer, x)

    sources = []
    real_init = LazySource.__init__
    monkeypatch.setattr(LazySource, "__init__", lambda self, *a, **k: real_init(self, *a, **k) or sources.append(self))
    monkeypatch.setattr(LazySource, "get_rows", get_rows)
    monkeypatch.setattr(held_codes, "codes_forward", forward)
    kw = dict(model=tiny_llama_dir, method="gptq", calib_samples=16, batch_size=8)
    calibrated_compress(CalibratedConfig(output=tmp_path / "stream", **kw))
    monkeypatch.setattr(LazySource, "get_rows", real_rows)
    monkeypatch.setattr(held_codes, "codes_forward", real_forward)
    src = sources[0]
    linear_keys = [k for k in src.stored if k.endswith("_proj.weight")]
    assert sorted(reads) == sorted(linear_keys) and checks[0] > len(linear_keys)
    for name, spans in reads.items():  # every row read exactly once, in order
        assert spans[0][0] == 0 and spans[-1][1] == src.stored[name].shape[0], name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name
    calibrated_compress(CalibratedConfig(output=tmp_path / "memory", **kw), stream=False)
    _same_folders(tmp_path / "stream", tmp_path / "memory")


def test_cli_refuses_a_bad_hessian_tokens(tiny_llama_dir, tmp_path, capsys):
    from quantseal.cli import main

    for extra in (["--method", "gptq", "--hessian-tokens", "0"], ["--method", "rtn", "--budget", "4.5",
                                                                   "--hessian-tokens", "64"],
                  ["--method", "cbq", "--hessian-tokens", "64"]):
        assert main(["compress", str(tiny_llama_dir), "-o", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--hessian-tokens" in err[0], err
        assert not (tmp_path / "bad").exists()


def test_gptq_order_is_a_flag_recorded_in_the_manifest(tiny_llama_dir, tmp_path, capsys):
    """``--gptq-order act`` (the default) and ``natural`` give different codes, each recorded in the
    manifest; an unknown order is one line, exit 2."""
    from quantseal.cli import main

    base = ["compress", str(tiny_llama_dir), "--method", "gptq", "--calib-samples", "16", "--json"]
    assert main([*base, "-o", str(tmp_path / "act")]) == 0
    assert main([*base, "-o", str(tmp_path / "natural"), "--gptq-order", "natural"]) == 0
    capsys.readouterr()
    act, nat = (ckpt.Manifest.from_json((tmp_path / d / ckpt.MANIFEST).read_text()) for d in ("act", "natural"))
    assert act.extra["gptq_order"] == "act" and nat.extra["gptq_order"] == "natural"
    assert (tmp_path / "act" / "weights.safetensors").read_bytes() != (tmp_path / "natural" / "weights.safetensors").read_bytes()
    with pytest.raises(SystemExit) as stop:  # argparse's choices: the CLI's one line and exit 2
        main([*base, "-o", str(tmp_path / "bad"), "--gptq-order", "sideways"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gptq-order" in err[0], err
    assert not (tmp_path / "bad").exists()
