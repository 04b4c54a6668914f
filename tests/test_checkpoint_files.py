"""Sharded checkpoints: the same tensors and manifest as one file, each shard hashed, read lazily."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quantseal import checkpoint as ckpt
from quantseal.checkpoint_files import WEIGHTS, CheckpointTensors, plan_shards, shard_names
from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import quantize
from quantseal.errors import BadInput
from quantseal.tensorfile import info_of


def _checkpoint_parts():
    gen = torch.Generator().manual_seed(0)
    spec = FormatSpec.parse("int4_b32")
    tensors, entries = {}, {}
    for i in range(5):
        name = f"layers.{i}.proj"
        w = torch.randn(48, 64, generator=gen)
        mt = ckpt.matrix_tensors(name, spec, quantize(w, spec), None, None, None)
        tensors.update(mt)
        tensors[f"{name}.bias"] = torch.randn(48, generator=gen)
        entries[name] = ckpt.MatrixEntry(spec.name, 0, [48, 64], 1.0, ckpt.entry_bytes(name, mt))
    tensors["norm.weight"] = torch.ones(64)
    manifest = ckpt.Manifest(source={"path": "x"}, method="rtn", budget={}, matrices=entries)
    return manifest, tensors


def test_plan_shards_cuts_sorted_names_at_the_cap():
    specs = {n: info_of(torch.zeros(s, dtype=torch.uint8)) for n, s in (("a", 5), ("b", 5), ("c", 12), ("d", 1))}
    plan = plan_shards(specs, 10)
    assert list(plan) == shard_names(3) == ["weights-00001-of-00003.safetensors", "weights-00002-of-00003.safetensors",
                                            "weights-00003-of-00003.safetensors"]
    assert [list(g) for g in plan.values()] == [["a", "b"], ["c"], ["d"]]  # c (12 > cap) alone
    assert list(plan_shards(specs, 100)) == [WEIGHTS]


def test_one_shard_is_the_old_single_file_byte_for_byte(tmp_path):
    manifest, tensors = _checkpoint_parts()
    out = ckpt.write_checkpoint(tmp_path / "ck", manifest, tensors, tmp_path)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    assert (out / WEIGHTS).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert list(json.loads((out / ckpt.MANIFEST).read_text())["files"]) == [WEIGHTS]


def test_sharded_round_trip_and_lazy_access(tmp_path):
    manifest, tensors = _checkpoint_parts()
    one = ckpt.write_checkpoint(tmp_path / "one", manifest, tensors, tmp_path)
    many = ckpt.write_checkpoint(tmp_path / "many", manifest, tensors, tmp_path, shard_bytes=3000)
    files = sorted(p.name for p in many.glob("weights*"))
    assert len(files) > 2 and files == shard_names(len(files))
    rec = json.loads((many / ckpt.MANIFEST).read_text())["files"]
    assert sorted(rec) == files and all(rec[f]["bytes"] == (many / f).stat().st_size for f in files)
    m1, t1 = ckpt.read_checkpoint(one)
    m2, t2 = ckpt.read_checkpoint(many)
    assert m1.matrices == m2.matrices and sorted(t1) == sorted(t2) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(t2[k], v) and t2[k].dtype == v.dtype
    _, lazy = ckpt.open_checkpoint(many)
    assert isinstance(lazy, CheckpointTensors) and sorted(lazy) == sorted(tensors) and len(lazy) == len(tensors)
    assert lazy.info("layers.3.proj.qweight").shape == tensors["layers.3.proj.qweight"].shape
    assert torch.equal(lazy["layers.3.proj.scales"], tensors["layers.3.proj.scales"])
    assert ckpt.tensor_files_bytes(many) == sum((many / f).stat().st_size for f in files)
    # the per-matrix checks run on the headers: a model loads from shards as from one file
    assert lazy.get("nope") is None and "norm.weight" in lazy


def test_damaged_or_missing_shard_is_refused(tmp_path):
    manifest, tensors = _checkpoint_parts()
    many = ckpt.write_checkpoint(tmp_path / "many", manifest, tensors, tmp_path, shard_bytes=3000)
    shard = sorted(many.glob("weights-*"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="sha256"):
        ckpt.open_checkpoint(many)
    shard.unlink()
    with pytest.raises(BadInput, match="missing"):
        ckpt.read_checkpoint(many)


def test_nan_is_refused_when_read_naming_the_tensor(tmp_path):
    manifest, tensors = _checkpoint_parts()
    tensors["norm.weight"][3] = float("nan")
    many = ckpt.write_checkpoint(tmp_path / "many", manifest, tensors, tmp_path, shard_bytes=3000)
    _, lazy = ckpt.open_checkpoint(many)
    assert torch.equal(lazy["layers.0.proj.bias"], tensors["layers.0.proj.bias"])
    with pytest.raises(BadInput, match="norm.weight holds 1 NaN"):
        lazy["norm.weight"]
    with pytest.raises(BadInput, match="norm.weight holds 1 NaN"):
        ckpt.read_checkpoint(many)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    manifest, tensors = _checkpoint_parts()
    specs = {k: info_of(v) for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with ckpt.CheckpointWriter(tmp_path / "ck", specs, tmp_path) as w:
            w.put("norm.weight", tensors["norm.weight"])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
