"""Streamed CBQ (issue #12): the in-memory path's bytes, one window of blocks in memory."""

from __future__ import annotations

import filecmp
import json
import weakref
from pathlib import Path

import pytest
import torch

from quantseal import checkpoint as ckpt
from quantseal.compress import cbq, cbq_stream
from quantseal.compress.calibrated import CalibratedConfig, calibrated_compress
from quantseal.compress.spill import SpillStore
from quantseal.lazy_source import LazySource, open_source

FAST = dict(method="cbq", calib_samples=16, batch_size=8, steps=3, rank=4, window=2)


def _same_folders(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def _spied(monkeypatch) -> list[dict]:
    """Record every stream_cbq call's stats (calibrated_compress imports it when it streams)."""
    calls: list[dict] = []
    real = cbq_stream.stream_cbq

    def spy(*a, **kw):
        stats: dict = {}
        calls.append(stats)
        return real(*a, **kw, stats=stats)

    monkeypatch.setattr(cbq_stream, "stream_cbq", spy)
    return calls


# 3 blocks, window 2 overlap 1: windows [0, 1] and [1, 2], block 1 trained in both
CASES = {
    # GPTQ start; the tied table GPTQ-calibrated as the head on the streamed head inputs; 0.01 MB
    # of activations in memory: nearly every batch of every stream goes to disk and back
    "a16-gptq-table-spilled": dict(abits=16, init="gptq", table="int4_b32", activation_mb=0.01),
    # A8 from GPTQ's codes: CFP's pre-folds per block (a stream of its own) and explicit o_proj
    # input scales (input_smooth, known only once the block is calibrated: staged, then written)
    "a8-gptq": dict(abits=8, init="gptq"),
    # A4 from round-to-nearest: CBQ folds on first visit; a round-to-nearest table
    "a4-rtn-table-rtn": dict(abits=4, init="rtn", table="int4_b32", table_method="rtn"),
    # a --budget-mb plan: each Linear's format and the table's from the ILP (its candidate table's
    # Fisher streamed as well), GPTQ's start in those formats, the table head-calibrated
    "a16-gptq-budget-plan": dict(abits=16, init="gptq", budget_mb=1.6, formats=("int4", "int8"), workers=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_cbq_writes_the_in_memory_bytes(tiny_llamas, tmp_path, monkeypatch, spill_record, case):
    src = tiny_llamas(3)
    kw = dict(model=src, **FAST, **CASES[case])
    calls = _spied(monkeypatch)
    spilled, folders = spill_record.spilled, spill_record.folders
    a = calibrated_compress(CalibratedConfig(output=tmp_path / "stream", **kw))
    assert len(calls) == 1 and calls[0]["peak_loaded_blocks"] == 2  # really streamed, a window at a time
    b = calibrated_compress(CalibratedConfig(output=tmp_path / "memory", **kw), stream=False)
    assert len(calls) == 1
    _same_folders(tmp_path / "stream", tmp_path / "memory")
    assert a["file_bytes"] == b["file_bytes"] and a["matrices"] == b["matrices"]
    assert a["matrices"] in (3 * 7, 3 * 7 + 1) and (a["matrices"] == 3 * 7 + 1) == ("table" in kw or "budget_mb" in kw)
    m, tensors = ckpt.read_checkpoint(tmp_path / "stream")
    assert m.method == "cbq" and len(m.extra["window_losses"]) == 2
    if kw["abits"] < 16:
        assert len(m.extra["activations"]) == 3 * 7
    if case == "a8-gptq":
        smooth = [k for k in tensors if k.endswith(".input_smooth")]
        assert smooth and all(".self_attn.o_proj." in k for k in smooth)  # the staged path was taken
    if case == "a16-gptq-budget-plan":
        assert m.extra["plan"]["budget_mb"] == 1.6 and len({e.format for e in m.matrices.values()}) > 1
    if case == "a16-gptq-table-spilled":
        assert max(spilled) >= 2 and m.extra["table_method"] == "gptq"
        assert calls[0]["peak_activation_bytes"] <= 0.01e6
    assert (folders or case == "a16-gptq-budget-plan") and not any(f.exists() for f in folders)  # all removed


def _live_block_params(source: LazySource) -> tuple[int, int]:
    """(float blocks with any parameter off the meta device, their parameter bytes)."""
    n = size = 0
    for block in source.model.get_submodule(source.fam.blocks_attr):
        held = [p for p in block.parameters() if not p.is_meta]
        n += bool(held)
        size += sum(p.numel() * p.element_size() for p in held)
    return n, size


def _streamed_peaks(src: Path, out: Path, monkeypatch) -> dict:
    """stream_cbq of ``src``: the most float blocks and float block bytes held, the most CBQ
    block copies alive (each checked whenever a block is loaded or copied), its own stats."""
    peaks = {"blocks": 0, "bytes": 0, "cbq_copies": 0}
    copies = weakref.WeakSet()
    source = open_source(src)
    real_load, real_quant = LazySource.load_module, cbq._quant_block

    def load(self, *a, **kw):
        mod = real_load(self, *a, **kw)
        n, size = _live_block_params(source)
        peaks["blocks"], peaks["bytes"] = max(peaks["blocks"], n), max(peaks["bytes"], size)
        return mod

    def quant(*a, **kw):
        qb = real_quant(*a, **kw)
        copies.add(qb)
        peaks["cbq_copies"] = max(peaks["cbq_copies"], len(copies))
        return qb

    monkeypatch.setattr(LazySource, "load_module", load)
    monkeypatch.setattr(cbq, "_quant_block", quant)
    stats: dict = {}
    cfg = CalibratedConfig(output=out, model=src, **{**FAST, "steps": 1, "calib_samples": 8})
    cbq_stream.stream_cbq(cfg, source, lambda *a: None, stats=stats)
    monkeypatch.undo()
    m, _ = ckpt.open_checkpoint(out)
    assert len(m.matrices) == len(source.model.get_submodule(source.fam.blocks_attr)) * 7
    return {**peaks, **stats}


def test_streamed_cbq_memory_is_flat_in_depth(tiny_llamas, tmp_path, monkeypatch):
    shallow = _streamed_peaks(tiny_llamas(4), tmp_path / "ck4", monkeypatch)
    deep = _streamed_peaks(tiny_llamas(6), tmp_path / "ck6", monkeypatch)
    stored = open_source(tiny_llamas(6)).stored
    one_block = sum(i.nbytes for k, i in stored.items() if k.startswith("model.layers.0."))
    # a window of 2 float blocks and 2 CBQ copies at most, whether 4 or 6 blocks deep (the
    # in-memory path holds every block: 3x the float bytes at 6 blocks)
    assert shallow["blocks"] == deep["blocks"] == shallow["peak_loaded_blocks"] == deep["peak_loaded_blocks"] == 2
    assert shallow["bytes"] == deep["bytes"] == 2 * one_block
    assert shallow["cbq_copies"] == deep["cbq_copies"] == 2
    assert shallow["peak_activation_bytes"] == deep["peak_activation_bytes"] > 0


def test_cli_compress_cbq_streams_a8_and_refuses_a_bad_cap(tiny_llamas, tmp_path, monkeypatch, capsys):
    from quantseal.cli import main

    src = tiny_llamas(2)
    calls = _spied(monkeypatch)
    out = tmp_path / "ck"
    assert main(["compress", str(src), "-o", str(out), "--method", "cbq", "--abits", "8", "--steps", "2",
                 "--rank", "4", "--calib-samples", "8", "--activation-mb", "0.02", "--json"]) == 0
    assert len(calls) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "cbq" and report["abits"] == 8 and report["matrices"] == 14
    model, fam, manifest = ckpt.load_compressed(out)  # loads, with the A8 quantisers attached
    assert len(manifest.extra["activations"]) == 14
    ids = torch.tensor([[101, 2054, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 6, 30522) and torch.isfinite(logits).all()
    assert main(["compress", str(src), "-o", str(tmp_path / "bad"), "--method", "cbq", "--activation-mb", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--activation-mb" in err[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("abits", ["16", "8"])  # the checkpoint written directly / staged first
def test_a_nan_in_a_later_block_is_named_and_nothing_is_written(tiny_llamas, tmp_path, monkeypatch, capsys, abits):
    from safetensors.torch import load_file, save_file

    from quantseal.cli import main

    src = tmp_path / "m"
    src.mkdir()
    for f in tiny_llamas(3).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")  # read only once blocks 0-1 are trained
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    folders = []
    real_dir = SpillStore._dir
    monkeypatch.setattr(SpillStore, "_dir", lambda self: folders.append(real_dir(self)) or folders[-1])
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()  # what building the fixture printed
    assert main(["compress", str(src), "-o", str(out / "ck"), "--method", "cbq", "--abits", abits, "--steps", "1",
                 "--rank", "2", "--calib-samples", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.2.mlp.up_proj.weight" in err[0] and "NaN" in err[0]
    assert not list(out.iterdir())  # no checkpoint, no temporary folder beside it
    assert not any(f.exists() for f in folders)
