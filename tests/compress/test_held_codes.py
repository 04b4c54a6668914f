"""Held codes (quantseal.compress.held_codes): a solved Linear kept packed, exactly what was solved,
and its forward equal to a Linear holding the dequantised weight."""

import pytest
import torch
from torch.nn import functional as F

from quantseal.compress.formats import FormatSpec
from quantseal.compress.held_codes import (PackedCodes, _unpack, chunk_rows, held, hold_codes, hold_pending,
                                          unhold)
from quantseal.compress.packing import pack_weight, unpack_weight
from quantseal.compress.quantizers import dequantize, quantize_int, quantize_offset

SPECS = [FormatSpec("int", 4, 32), FormatSpec("int", 3, 16), FormatSpec("int", 2, 16), FormatSpec("int", 8, 32),
         FormatSpec("int", 4, 32, symmetric=True), FormatSpec("intf", 4, 32)]


def _quantized(spec: FormatSpec, n: int = 37, k: int = 80, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))  # k = 80: a padded last block
    return quantize_offset(w, spec) if spec.kind == "intf" else quantize_int(w, spec)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_equals_the_reference_unpacker(bits):
    codes = torch.randint(0, 2**bits, (9, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_weight(codes, bits, 32)
    assert torch.equal(_unpack(packed, bits), unpack_weight(packed, bits))
    assert torch.equal(_unpack(packed, bits), codes)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_packed_codes_give_back_the_solvers_result_exactly(spec):
    qt = _quantized(spec)
    p = PackedCodes.empty(*qt.shape, spec)
    for r0 in range(0, qt.shape[0], 10):  # put in row chunks, as the chunked solve does
        r1 = min(r0 + 10, qt.shape[0])
        p.put(r0, type(qt)(qt.codes[r0:r1], qt.scales[r0:r1], None if qt.zeros is None else qt.zeros[r0:r1],
                           (r1 - r0, qt.shape[1]), spec, None if qt.offsets is None else qt.offsets[r0:r1]))
    back = p.quantized()
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales)
    for a, b in ((back.zeros, qt.zeros), (back.offsets, qt.offsets)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(dequantize(back), dequantize(qt))
    assert torch.equal(dequantize(p.rows(5, 23)), dequantize(qt)[5:23])
    assert p.qweight.numel() == qt.codes.numel() * spec.stored_bits // 8  # packed: bits / 8 bytes per weight


def test_scales_off_the_float16_grid_are_refused():
    qt = _quantized(FormatSpec("int", 4, 32))
    qt.scales[0, 0] += 1e-7 * qt.scales[0, 0]
    with pytest.raises(ValueError, match="float16"):
        PackedCodes.empty(*qt.shape, qt.spec).put(0, qt)


@pytest.mark.parametrize("spec", [FormatSpec("int", 4, 32), FormatSpec("intf", 4, 32)], ids=lambda s: s.name)
def test_a_held_linear_computes_the_dequantised_linear(spec):
    qt = _quantized(spec, n=40, k=96, seed=3)
    p = PackedCodes.empty(*qt.shape, spec)
    p.put(0, qt)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(5))
    w = dequantize(qt)
    lin = torch.nn.Linear(96, 40)
    bias = lin.bias.detach()
    lin.weight.data = lin.weight.data.new_empty(0)  # no float weight while held
    hold_codes(lin, p, torch.float32)
    assert held(lin) is p
    assert torch.equal(lin(x), F.linear(x, w, bias))  # one chunk: bit for bit
    hold_codes(lin, p, torch.float32, chunk_bytes=7 * 96 * 4)  # 7 rows at a time
    assert chunk_rows(40, 96, 7 * 96 * 4) == 7
    ref = (x.double() @ w.double().T + bias.double()).float()  # float64 reference
    got = lin(x)
    assert got.shape == (3, 5, 40)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (got - ref).abs().max()
    unhold(lin, dequantised=True)  # its own forward back, holding the dequantised weight
    assert held(lin) is None and torch.equal(lin.weight, w) and torch.equal(lin(x), F.linear(x, w, bias))


def test_a_held_linear_keeps_its_pre_hooks():
    """An input smoothing x / s (a pre-hook of the Linear, quantseal.compress.smoothing) still
    applies while the Linear computes through its codes or is pending."""
    from quantseal.compress.smoothing import attach_input_smoothing

    qt = _quantized(FormatSpec("int", 4, 32), n=8, k=64, seed=6)
    p = PackedCodes.empty(*qt.shape, qt.spec)
    p.put(0, qt)
    lin = torch.nn.Linear(64, 8, bias=False)
    s = torch.rand(64, generator=torch.Generator().manual_seed(7)) + 0.5
    attach_input_smoothing(lin, s)
    seen = []
    lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    hold_pending(lin)
    out = lin(x)
    assert out.shape == (4, 8) and not out.any() and torch.equal(seen[-1], x / s)
    hold_codes(lin, p, torch.float32)
    assert torch.equal(lin(x), F.linear(x / s, dequantize(qt))) and torch.equal(seen[-1], x / s)
