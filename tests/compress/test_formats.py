import pytest
import torch

from quantseal.checkpoint import matrix_tensors
from quantseal.compress.formats import Candidate, FormatSpec, expand_families, max_useful_rank
from quantseal.compress.quantizers import quantize
from quantseal.errors import BadInput


@pytest.mark.parametrize("name", ["int2_b16", "int3_b32", "int4s_b64", "int8_b128", "nf4_b64", "fp16", "fp32",
                                  "int4f_b32", "int4f_b128"])
def test_parse_round_trip(name):
    assert FormatSpec.parse(name).name == name


@pytest.mark.parametrize("bad", ["int5_b32", "int4_b48", "nf3_b64", "float8", "int4", "int3s_b32", "int8f_b32",
                                 "int4f_b48", "int4fs_b32"])
def test_bad_names_are_bad_input(bad):
    with pytest.raises(BadInput):
        FormatSpec.parse(bad)


def test_family_expansion():
    fmts = expand_families("int4,nf4")
    assert [f.name for f in fmts] == ["int4_b32", "int4_b64", "int4_b128", "nf4_b64"]
    with pytest.raises(BadInput):
        expand_families("int4,bogus")


def test_bits_per_param_by_hand():
    # 4-bit codes + fp16 scale per 32 + 4-bit zero point per 32 = 4 + 0.5 + 0.125
    assert FormatSpec.parse("int4_b32").stored_bytes(384, 384) * 8 / (384 * 384) == 4.625
    assert FormatSpec.parse("int4s_b32").stored_bytes(384, 384) * 8 / (384 * 384) == 4.5
    assert FormatSpec.parse("nf4_b64").stored_bytes(384, 384) * 8 / (384 * 384) == 4.25
    # float offsets: 4-bit codes + fp16 scale + fp16 offset per block = 4 + 16/B + 16/B
    assert FormatSpec.parse("int4f_b32").stored_bytes(384, 384) * 8 / (384 * 384) == 5.0
    assert FormatSpec.parse("int4f_b64").stored_bytes(384, 384) * 8 / (384 * 384) == 4.5
    assert FormatSpec.parse("int4f_b128").stored_bytes(384, 384) * 8 / (384 * 384) == 4.25
    assert [f.name for f in expand_families("int4f")] == ["int4f_b32", "int4f_b64", "int4f_b128"]
    # 3-bit codes live in 4-bit slots
    assert FormatSpec.parse("int3_b32").stored_bytes(8, 64) == FormatSpec.parse("int4_b32").stored_bytes(8, 64)


@pytest.mark.parametrize("name", ["int2_b16", "int2_b64", "int3_b32", "int4_b32", "int4s_b128", "int8_b64",
                                  "nf4_b64", "fp16", "fp32", "int4f_b32", "int4f_b128"])
@pytest.mark.parametrize("n,k", [(8, 64), (5, 100), (3, 129), (384, 1536)])
@pytest.mark.parametrize("rank", [0, 4])
def test_stored_bytes_equal_written_tensors(name, n, k, rank):
    """The ILP's byte count is exactly what the checkpoint writes."""
    spec = FormatSpec.parse(name)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    qt = None if spec.kind == "fp" else quantize(w, spec)
    l1, l2 = (torch.randn(n, rank), torch.randn(rank, k)) if rank else (None, None)
    tensors = matrix_tensors("m", spec, qt, w, l1, l2)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert written == Candidate(spec, rank).stored_bytes(n, k)


def test_max_useful_rank():
    # r (n + k) 16 bits ≤ 2 bits × n k
    assert max_useful_rank(384, 384) == 24
    assert max_useful_rank(1536, 384) == 38
