"""Checkpoint round trip: write → load → the same outputs as the in-memory plan."""

import json

import numpy as np
import pytest
import torch

from quantseal import checkpoint as ckpt
from quantseal.compress.pipeline import CompressConfig, build_candidate_table, compress, materialize, plan
from quantseal.compress.qlinear import CompressedLinear
from quantseal.errors import BadInput
from quantseal.models import encode
from quantseal.text import TextTokenizer, pydoc_sentences


@pytest.fixture(scope="module")
def tiny_ck(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    cfg = CompressConfig(output=out, model=tiny_bert_dir, budget_bits=3.5, workers=1, ranks=(0, 4))
    return out, compress(cfg), cfg


def test_round_trip_matches_in_memory_plan(tiny_ck, tiny_bert_dir):
    out, report, cfg = tiny_ck
    model, fam, manifest = ckpt.load_compressed(out)
    table = build_candidate_table(cfg)
    tensors, entries = materialize(table, plan(table, cfg.budget_bits))
    for name, e in entries.items():
        assert manifest.matrices[name].format == e.format and manifest.matrices[name].rank == e.rank
        mod = model.get_submodule(name)
        assert isinstance(mod, CompressedLinear)
        # the loaded weight equals the float64 numpy dequantisation of the stored codes
        qt = ckpt.stored_quantized(name, e, tensors) if e.spec.kind != "fp" else None
        if qt is not None:
            codes = qt.codes.numpy().astype(np.float64).reshape(e.shape[0], -1, e.spec.block)
            zeros = (qt.zeros.numpy().astype(np.float64) if qt.zeros is not None
                     else np.full(qt.scales.shape, 2.0 ** (e.spec.bits - 1)))
            if e.spec.kind == "int":
                ref = ((codes - zeros[..., None]) * qt.scales.numpy()[..., None]).reshape(e.shape[0], -1)[:, :e.shape[1]]
                np.testing.assert_allclose(mod.w_hat.numpy(), ref, atol=1e-7)
    tok = TextTokenizer(tiny_bert_dir)
    batch = {k: torch.from_numpy(v) for k, v in tok(pydoc_sentences("evaluation")[:4]).items()}
    with torch.no_grad():
        a = encode(model, batch)
        b = encode(ckpt.load_compressed(out)[0], batch)
    assert torch.equal(a, b)


def test_reported_bits_equal_stored_bytes(tiny_ck):
    out, report, cfg = tiny_ck
    manifest, tensors = ckpt.read_checkpoint(out)
    lin = [n for n, e in manifest.matrices.items() if e.kind == "linear"]
    stored = sum(ckpt.entry_bytes(n, tensors) for n in lin)
    params = sum(manifest.matrices[n].shape[0] * manifest.matrices[n].shape[1] for n in lin)
    assert stored == report["compressible_bytes"]
    assert report["bits_per_param"] == pytest.approx(stored * 8 / params, rel=1e-6)
    assert report["bits_per_param"] <= cfg.budget_bits


def test_manifest_damage_is_bad_input(tiny_ck, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_ck[0], out)
    (out / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(BadInput):
        ckpt.read_checkpoint(out)
    d = json.loads((tiny_ck[0] / ckpt.MANIFEST).read_text())
    d["schema_version"] = 99
    (out / ckpt.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BadInput, match="schema"):
        ckpt.read_checkpoint(out)
    shutil.copyfile(tiny_ck[0] / ckpt.MANIFEST, out / ckpt.MANIFEST)
    (out / ckpt.WEIGHTS).write_bytes(b"\x00" * 100)
    with pytest.raises(BadInput, match="corrupt"):
        ckpt.read_checkpoint(out)


@pytest.mark.parametrize("fmt,n,k", [("int4f_b32", 7, 96), ("int4f_b64", 5, 100), ("int4f_b128", 3, 300)])
def test_int4f_tensors_round_trip_exactly(fmt, n, k):
    """int4f's stored tensors (packed codes, float16 scales and offsets) give back the quantiser's
    codes, scales and offsets bit for bit, and the dequantised matrix."""
    from quantseal.compress.formats import Candidate, FormatSpec
    from quantseal.compress.quantizers import dequantize, quantize

    spec = FormatSpec.parse(fmt)
    qt = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 0.1 + 0.05, spec)
    tensors = ckpt.matrix_tensors("m", spec, qt, None, None, None)
    assert sorted(tensors) == ["m.offsets", "m.qweight", "m.scales"]
    assert {k_: (v.dtype, tuple(v.shape)) for k_, v in tensors.items()} == \
        {k_: (i.dtype, tuple(i.shape)) for k_, i in ckpt.matrix_specs("m", Candidate(spec), n, k).items()}
    entry = ckpt.MatrixEntry(fmt, 0, [n, k], 0.0, Candidate(spec).stored_bytes(n, k))
    back = ckpt.stored_quantized("m", entry, tensors)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales)
    assert torch.equal(back.offsets, qt.offsets) and back.zeros is None
    assert torch.equal(ckpt.dequantized_matrix("m", entry, tensors)[0], dequantize(qt))
    assert ckpt.entry_bytes("m", tensors) == entry.bytes
