"""A MiniLM checkpoint that exercises every export path: each storage format, low-rank branches
and a quantised token embedding with its own low-rank branch (built directly, ~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantseal import checkpoint as ckpt
from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import quantize, round_float

MIXED_FORMATS = ["int4_b32", "nf4_b64", "int8_b128", "int2_b16", "int4s_b64", "fp16",
                 "int8s_b64", "int3_b32", "int4_b128", "nf4_b32", "int2s_b32", "fp32"]
EMBEDDING_FORMAT = ("int4_b64", 4)


def _store(name: str, w: torch.Tensor, fmt: str, rank: int, kind: str):
    spec = FormatSpec.parse(fmt)
    if spec.kind == "fp":
        qt, w_hat, weight = None, round_float(w, spec), round_float(w, spec)
    else:
        qt = quantize(w, spec, clip_search=False)
        w_hat, weight = None, None
    l1 = l2 = None
    if rank:
        from quantseal.compress.quantizers import dequantize

        resid = w - (w_hat if w_hat is not None else dequantize(qt))
        u, s, vh = torch.linalg.svd(resid, full_matrices=False)
        l1, l2 = u[:, :rank] * s[:rank], vh[:rank]
    tensors = ckpt.matrix_tensors(name, spec, qt, weight, l1, l2)
    entry = ckpt.MatrixEntry(fmt, rank, list(w.shape), 0.0, ckpt.entry_bytes(name, tensors), kind)
    return tensors, entry


@pytest.fixture(scope="session")
def minilm_mixed_checkpoint(tmp_path_factory, minilm_path) -> Path:
    from quantseal.models import compressible_linears, embedding, load_model

    model, fam = load_model(minilm_path)
    tensors, entries = {}, {}
    for i, (name, lin) in enumerate(compressible_linears(model, fam).items()):
        fmt = MIXED_FORMATS[i % len(MIXED_FORMATS)]
        rank = 8 if i % 3 == 1 else (16 if i % 5 == 0 else 0)
        t, entries[name] = _store(name, lin.weight.detach().float(), fmt, rank, "linear")
        tensors.update(t)
    emb = fam.embedding_attr
    t, entries[emb] = _store(emb, embedding(model, fam).weight.detach().float(), *EMBEDDING_FORMAT, "embedding")
    tensors.update(t)
    planned = {n + ".weight" for n in entries}
    for k, v in model.state_dict().items():
        if k not in planned and "position_ids" not in k:
            tensors[k] = v.detach().clone().contiguous()
    manifest = ckpt.Manifest(source={"family": "encoder", "model_type": "bert", "path": str(minilm_path), "sha256": None},
                             method="test-mixed", budget={"kind": "bits", "asked": None}, matrices=entries)
    return ckpt.write_checkpoint(tmp_path_factory.mktemp("minilm_mixed") / "ck", manifest, tensors, minilm_path)
