"""The streaming safetensors writer equals ``save_file`` byte for byte; the reader equals ``load_file``."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantseal.errors import BadInput
from quantseal.tensorfile import DTYPES, SafetensorsReader, SafetensorsWriter, info_of


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    out = {}
    for i in range(12):
        dtype = rnd.choice(list(DTYPES.values()))
        shape = [rnd.randint(0, 5) for _ in range(rnd.randint(0, 3))]
        raw = torch.randint(0, 255, (max(1, torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()),),
                            generator=gen, dtype=torch.uint8)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        t = raw[:n].view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
        out[f"{rnd.choice('abcxyz')}.{i}.w"] = t
    return out


@pytest.mark.parametrize("seed", range(6))
def test_writer_equals_save_file_in_any_put_order(tmp_path, seed):
    tensors = _random_tensors(seed)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    w = SafetensorsWriter(tmp_path / "mine.safetensors", {k: info_of(v) for k, v in tensors.items()}, {"format": "pt"})
    names = list(tensors)
    random.Random(seed).shuffle(names)
    for k in names:
        w.put(k, tensors[k])
    w.close()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    ref = load_file(str(tmp_path / "ref.safetensors"))
    r = SafetensorsReader(tmp_path / "mine.safetensors")
    assert r.keys() == sorted(ref)
    for k, v in ref.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))  # NaN-safe


def test_writer_refuses_unannounced_wrong_and_missing(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", {"a": info_of(torch.zeros(2, 3)), "b": info_of(torch.zeros(1))})
    with pytest.raises(KeyError):
        w.put("c", torch.zeros(1))
    with pytest.raises(ValueError, match="announced"):
        w.put("a", torch.zeros(3, 2))
    w.put("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="twice"):
        w.put("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_reader_refuses_damaged_files(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4, 4)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-8])  # truncated: the data no longer fits the header's offsets
    with pytest.raises(BadInput, match="corrupt safetensors"):
        SafetensorsReader(p)
    p.write_bytes(b"\xff" * 16)
    with pytest.raises(BadInput, match="corrupt safetensors"):
        SafetensorsReader(p)
    p.write_bytes(data[:8] + b"}" + data[9:])  # not JSON
    with pytest.raises(BadInput, match="corrupt safetensors"):
        SafetensorsReader(p)


def test_rows_read_and_written_in_chunks_equal_whole_tensors(tmp_path):
    """``get_rows`` returns exactly ``load_file``'s rows; ``put_rows`` in any order and chunking
    gives the bytes of ``save_file``; a tensor counts as written only once every row was put."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"table": torch.randn(37, 5, generator=gen), "codes": torch.randint(0, 255, (11, 3, 2), generator=gen,
                                                                                    dtype=torch.uint8),
               "norm": torch.randn(5, generator=gen)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    r = SafetensorsReader(tmp_path / "ref.safetensors")
    for start, stop in ((0, 37), (0, 1), (36, 37), (5, 19), (7, 7)):
        assert torch.equal(r.get_rows("table", start, stop), tensors["table"][start:stop])
    assert torch.equal(r.get_rows("codes", 3, 9), tensors["codes"][3:9])
    for bad in ((-1, 3), (3, 38), (5, 4)):
        with pytest.raises(IndexError):
            r.get_rows("table", *bad)
    w = SafetensorsWriter(tmp_path / "mine.safetensors", {k: info_of(v) for k, v in tensors.items()})
    for start in (30, 0, 10, 20):  # chunks out of order
        w.put_rows("table", start, tensors["table"][start:start + 10])
    w.put_rows("codes", 0, tensors["codes"][:4])
    with pytest.raises(ValueError, match="announced"):
        w.put_rows("codes", 4, tensors["codes"][4:].float())  # wrong dtype
    with pytest.raises(ValueError, match="announced"):
        w.put_rows("codes", 8, tensors["codes"][4:])  # past the end
    assert "codes" in w.pending and "table" not in w.pending
    w.put_rows("codes", 4, tensors["codes"][4:])
    with pytest.raises(ValueError, match="twice"):
        w.put_rows("codes", 0, tensors["codes"][:1])
    w.put("norm", tensors["norm"])
    w.close()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
