"""The streaming decoder export reads the checkpoint lazily (quantseal/export/stored.py): each
stored tensor when the graph needs it, dropped once its bytes are written."""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from quantseal.checkpoint import open_checkpoint
from quantseal.export.decoder import build_decoder
from quantseal.export.external_data import TensorSink


class Tracked(Mapping):
    """A checkpoint's tensors as numpy copies whose lifetimes are counted (live now, peak, reads)."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.live: Counter = Counter()
        self.peak_layer = 0
        self.reads: Counter = Counter()

    def __getitem__(self, name):
        arr = self.tensors[name].numpy().copy()
        self.reads[name] += 1
        if ".layers." in name:
            self.live[name] += 1
            self.peak_layer = max(self.peak_layer, sum(self.live.values()))
            weakref.finalize(arr, self.live.subtract, [name])
        return arr

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def test_build_holds_one_projection_group_at_a_time(llama_lq_export, tmp_path):
    ck, _ = llama_lq_export
    manifest, lazy = open_checkpoint(ck)
    tracked = Tracked(lazy)
    sink = TensorSink(tmp_path / "m.onnx.data", "m.onnx.data")
    proto, _ = build_decoder(manifest, tracked, json.loads((ck / "config.json").read_text()), sink=sink)
    sink.close()
    layer_tensors = [n for n in lazy if ".layers." in n]
    per_layer = max(Counter(n.split(".layers.")[1].split(".")[0] for n in layer_tensors).values())
    assert set(tracked.reads) == set(lazy)  # every stored tensor was read (and checked)
    # q/k/v, read together to see whether they pack into one MatMulNBits, is the most held at once
    per_matrix = max(sum(n.startswith(m + ".") for n in layer_tensors) for m in manifest.matrices)
    assert 0 < tracked.peak_layer <= 3 * per_matrix < per_layer
    assert sum(tracked.live.values()) == 0  # nothing read is still held
    ext = [t for t in proto.graph.initializer if t.data_location == 1]
    assert sum(int({e.key: e.value for e in t.external_data}["length"]) for t in ext) > 0.99 * sum(
        int(np.prod(lazy.info(n).shape)) * lazy.info(n).element_size() for n in lazy)


def test_large_float_tensors_are_copied_in_chunks_to_the_same_bytes(llama_rtn_export, tmp_path, monkeypatch):
    """A token table over the chunk threshold is never held whole: its rows go to the data file a
    chunk at a time; the file is byte-identical to the one built from whole tensors."""
    from quantseal.export import stored
    from quantseal.export.onnx import export_onnx

    ck, report = llama_rtn_export
    reads = []
    real = stored.ChunkedTensor.chunks

    def counted(self):
        for part in real(self):
            reads.append((self.name, part.nbytes))
            yield part

    monkeypatch.setattr(stored, "CHUNKED_ABOVE", 1 << 20)  # the 7.8 MB table, nothing else
    monkeypatch.setattr(stored, "CHUNK_BYTES", 1 << 18)
    monkeypatch.setattr(stored.ChunkedTensor, "chunks", counted)
    export_onnx(ck, tmp_path / "m" / "model.onnx", accuracy_level=0)
    assert (tmp_path / "m" / "model.onnx").read_bytes() == Path(report["path"]).read_bytes()
    assert {n for n, _ in reads} == {"model.embed_tokens.weight"}
    assert len(reads) >= 30 and max(b for _, b in reads) <= 1 << 18


def test_a_nan_in_a_chunk_is_refused_naming_the_tensor(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from quantseal.errors import BadInput
    from quantseal.export.stored import ChunkedTensor

    t = torch.randn(100, 8)
    t[77, 3] = float("nan")
    save_file({"table": t}, str(tmp_path / "w.safetensors"))
    ct = ChunkedTensor(tmp_path / "w.safetensors", "table", np.float32, (100, 8))
    assert ct.nbytes == 3200 and ct.shape == (100, 8)
    with pytest.raises(BadInput, match="table holds NaN"):
        list(ct.chunks())
