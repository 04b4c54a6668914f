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


def test_streamed_gptq_equals_in_memory_bytes_even_when_spilling(tiny_llama_dir, tmp_path, monkeypatch):
    kw = dict(model=tiny_llama_dir, method="gptq", calib_samples=24, batch_size=8, table="int4_b32", table_method="rtn")
    spilled, folders = [], []  # this run's spill folders only: other processes (pytest-xdist) make their own
    real_append, real_dir = SpillStore.append, SpillStore._dir

    def counting_append(self, t):
        real_append(self, t)
        spilled.append(self.spilled)

    def recorded_dir(self):
        folders.append(real_dir(self))
        return folders[-1]

    monkeypatch.setattr(SpillStore, "append", counting_append)
    monkeypatch.setattr(SpillStore, "_dir", recorded_dir)
    # a 0.01 MB cap: every batch but the first goes to disk and back
    a = calibrated_compress(CalibratedConfig(output=tmp_path / "stream", activation_mb=0.01, **kw))
    monkeypatch.undo()
    assert max(spilled) >= 2 and folders
    b = calibrated_compress(CalibratedConfig(output=tmp_path / "memory", **kw), stream=False)
    _same_folders(tmp_path / "stream", tmp_path / "memory")
    assert a["file_bytes"] == b["file_bytes"] == ckpt.tensor_files_bytes(tmp_path / "stream")
    assert not any(f.exists() for f in folders)  # every spill folder removed


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


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory):
    """The seeded 4- and 24-block synthetic LLaMAs (built once) compressed by each method of
    ``_METHODS``, the four runs side by side (separate processes: each reads its own peak):
    (root, {depth: float32 safetensors bytes}, {(method, depth): peak RSS bytes})."""
    root = tmp_path_factory.mktemp("depth")
    models = {n: make_synthetic("135M", root / f"l{n}", seed=0, num_hidden_layers=n, **_SHAPE) for n in (4, 24)}
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
    peak = {n: peaks[method, n] for n in (4, 24)}
    grew, more = peak[24] - peak[4], size[24] - size[4]  # 20 more blocks: 240 MB of float32 weights
    # loading the model (the pre-streaming path) grows the peak by more than the float32 bytes; a
    # streamed run holds one block, so its peak grows by a small fraction of them
    print(f"{method}: peak RSS {peak} bytes, float32 weights {size} bytes")
    assert grew < 0.25 * more, (peak, size)
    m, _ = ckpt.open_checkpoint(root / f"ck_{method}24")
    assert len(m.matrices) == 24 * 7
