"""Streamed LQ+CBQ (issue #12): the in-memory path's bytes from a decoder read block by block."""

from __future__ import annotations

import filecmp

import pytest

from quantseal import checkpoint as ckpt
from quantseal.compress import cbq_stream, lqcbq_stream
from quantseal.compress.cbq import CBQConfig
from quantseal.compress.lqcbq import lq_cbq_compress
from quantseal.compress.pipeline import CompressConfig
from quantseal.compress.spill import SpillStore

CASES = {
    # NF4 matrices kept as planned (frozen in CBQ's loop, copied from the staged plan), int4 refined
    "kept-nf4": dict(budget_bits=4.5, formats=("int4", "int8", "nf4", "fp16")),
    # int4 matrices with a rank-4 branch frozen in the loop
    "lowrank": dict(budget_bits=6.0, formats=("int4", "nf4")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_lq_cbq_writes_the_in_memory_bytes(tiny_llamas, tmp_path, monkeypatch, case):
    src = tiny_llamas(3)  # windows [0, 1] and [1, 2]
    kw = dict(model=src, method="lq", ranks=(0, 4), workers=1, calib_samples=16, **CASES[case])
    cbq = CBQConfig(steps=3, rank=4, window=2, overlap=1)
    peaks, folders = [], []
    real_held, real_dir = cbq_stream.StreamedBlocks.release, SpillStore._dir

    def release(self, i):
        peaks.append(len(self.loaded))
        real_held(self, i)

    def recorded_dir(self):
        folders.append(real_dir(self))
        return folders[-1]

    monkeypatch.setattr(cbq_stream.StreamedBlocks, "release", release)
    monkeypatch.setattr(SpillStore, "_dir", recorded_dir)
    a = lq_cbq_compress(CompressConfig(output=tmp_path / "stream", **kw), cbq)
    assert peaks and max(peaks) == 2  # really streamed: at most a window of float blocks
    b = lq_cbq_compress(CompressConfig(output=tmp_path / "memory", **kw), cbq, stream=False)
    assert len(peaks) == 3  # the in-memory run did not stream
    names = sorted(str(p.relative_to(tmp_path / "stream")) for p in (tmp_path / "stream").rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "memory")) for p in (tmp_path / "memory").rglob("*")
                           if p.is_file())
    for n in names:
        assert filecmp.cmp(tmp_path / "stream" / n, tmp_path / "memory" / n, shallow=False), n
    assert (a["refined"], a["kept"], a["formats"]) == (b["refined"], b["kept"], b["formats"])
    m, _ = ckpt.read_checkpoint(tmp_path / "stream")
    assert m.method == "lq+cbq" and len(m.extra["cbq"]["window_losses"]) == 2
    if case == "kept-nf4":
        assert a["kept"] > 0 and a["refined"] > 0
    else:
        assert sum(e.rank > 0 and e.format.startswith("int") for e in m.matrices.values()) > 0
    assert folders and not any(f.exists() for f in folders)  # the staged plan's folder removed


def test_data_aware_lq_cbq_stays_in_memory(tiny_llamas, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(lqcbq_stream, "stream_lq_cbq", lambda *a, **k: called.append(1))
    cfg = CompressConfig(output=tmp_path / "ck", model=tiny_llamas(2), method="lq", ranks=(0,), workers=1,
                         budget_bits=4.5, formats=("int4", "int8"), data_aware=True, calib_samples=8)
    rep = lq_cbq_compress(cfg, CBQConfig(steps=1, rank=0, window=2, overlap=1))
    assert not called and rep["refined"] == 14  # the Fisher needs the whole model: loaded
