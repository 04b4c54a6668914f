"""Quantise / dequantise against slow float64 numpy references."""

import numpy as np
import pytest
import torch

from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import NF4_LEVELS, dequantize, fake_quantize, quantize


def reference_int(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Round-to-nearest, no clipping, one block at a time, float64 (scales on the fp16 grid)."""
    n, k = w.shape
    out = np.zeros_like(w, dtype=np.float64)
    qmax = 2**bits - 1
    for i in range(n):
        for s in range(0, k, block):
            blk = w[i, s:s + block].astype(np.float64)
            lo, hi = min(blk.min(), 0.0), max(blk.max(), 0.0)
            if symmetric:
                half = 2 ** (bits - 1)
                scale = float(np.float16(max(hi, -lo) / max(half - 1, 1)))
                zero = half
            else:
                scale = float(np.float16((hi - lo) / qmax))
                scale = scale if scale > 0 else 1.0
                zero = min(max(np.round(-lo / scale), 0), qmax)
            scale = scale if scale > 0 else 1.0
            q = np.clip(np.round(blk / scale) + zero, 0, qmax)
            out[i, s:s + block] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_matches_float64_reference(bits, block, symmetric):
    if bits == 3 and symmetric:
        pytest.skip("int3 is affine only")
    gen = torch.Generator().manual_seed(bits * 100 + block)
    w = torch.randn(6, 100, generator=gen) * 0.1  # K = 100: a padded last block
    spec = FormatSpec("int", bits, block, symmetric)
    qt = quantize(w, spec, clip_search=False)
    assert qt.codes.shape == (6, -(-100 // block) * block)
    assert int(qt.codes.max()) <= 2**bits - 1
    ref = reference_int(w.numpy(), bits, block, symmetric)
    np.testing.assert_allclose(dequantize(qt).numpy(), ref, rtol=0, atol=1e-6)
    # scales are exactly representable in float16
    assert torch.equal(qt.scales.half().float(), qt.scales)


@pytest.mark.parametrize("name", ["int2_b32", "int4_b64", "nf4_b64"])
def test_clip_search_never_hurts(name):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    spec = FormatSpec.parse(name)
    plain = ((fake_quantize(w, spec, clip_search=False) - w) ** 2).sum()
    clipped = ((fake_quantize(w, spec, clip_search=True) - w) ** 2).sum()
    assert clipped <= plain
    assert clipped < 0.99 * plain  # and on heavy tails it helps


def test_weighted_clip_search_lowers_weighted_error():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 128, generator=gen) ** 3
    f = torch.rand(16, 128, generator=gen) ** 4
    spec = FormatSpec.parse("int2_b32")
    e_plain = (f * (fake_quantize(w, spec) - w) ** 2).sum()
    e_weighted = (f * (fake_quantize(w, spec, weight=f) - w) ** 2).sum()
    assert e_weighted <= e_plain


def test_nf4_levels_and_reference():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    spec = FormatSpec.parse("nf4_b64")
    qt = quantize(w, spec, clip_search=False)
    w64 = w.double().numpy()
    absmax = np.float16(np.abs(w64).max(1)).astype(np.float64)
    levels = NF4_LEVELS.numpy()
    idx = np.abs(w64[:, :, None] / absmax[:, None, None] - levels[None, None, :]).argmin(-1)
    np.testing.assert_allclose(dequantize(qt).numpy(), levels[idx] * absmax[:, None], atol=1e-6)


def test_zero_blocks_exact_constant_blocks_within_fp16_scale():
    w = torch.zeros(2, 64)
    w[1, :32] = 0.25
    for name in ["int4_b32", "int2_b32", "int8_b32", "int4s_b32", "nf4_b32"]:
        out = fake_quantize(w, FormatSpec.parse(name)).numpy()
        assert (out[0] == 0).all() and (out[1, 32:] == 0).all()
        np.testing.assert_allclose(out[1, :32], 0.25, rtol=1e-3)


def reference_offset(w: np.ndarray, block: int) -> np.ndarray:
    """int4f round-to-nearest, float64, block by block: s = fp16((max − min)/15), m = fp16(min),
    q = clip(round((w − m)/s), 0, 15), ŵ = s·q + m (the padded tail ignored)."""
    out = np.zeros_like(w, dtype=np.float64)
    for i in range(w.shape[0]):
        for s0 in range(0, w.shape[1], block):
            blk = w[i, s0:s0 + block].astype(np.float64)
            scale = float(np.float16((blk.max() - blk.min()) / 15))
            scale = scale if scale > 0 else 1.0
            m = float(np.float16(blk.min()))
            out[i, s0:s0 + block] = np.clip(np.round((blk - m) / scale), 0, 15) * scale + m
    return out


@pytest.mark.parametrize("block", [32, 128])
def test_int4f_matches_float64_reference(block):
    w = torch.randn(5, 200, generator=torch.Generator().manual_seed(block)) * 0.1 + 0.03  # K = 200: padded tail
    qt = quantize(w, FormatSpec("intf", 4, block), clip_search=False)
    assert qt.zeros is None and qt.offsets.shape == (5, -(-200 // block)) and int(qt.codes.max()) <= 15
    np.testing.assert_allclose(dequantize(qt).numpy(), reference_offset(w.numpy(), block), rtol=0, atol=1e-6)
    assert torch.equal(qt.offsets.half().float(), qt.offsets) and torch.equal(qt.scales.half().float(), qt.scales)


def test_int4f_is_exact_on_a_q4_1_source_and_beats_int4_on_shifted_blocks():
    """A matrix dequantised from llama.cpp's Q4_1 (w = d·q + m, d and m float16, every block using
    codes 0 and 15, as Q4_1's min/max quantiser makes them) comes back bit for bit; a block whose
    values sit away from 0 is stored better with a float offset than with int4's integer zero
    point (whose range must contain 0)."""
    gen = torch.Generator().manual_seed(7)
    n, k, b = 16, 256, 32
    q = torch.randint(0, 16, (n, k // b, b), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // b, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (torch.randn(n, k // b, 1, generator=gen) * 0.05).half().float()
    w = (d * q + m).reshape(n, k)
    for clip in (False, True):
        assert torch.equal(fake_quantize(w, FormatSpec.parse("int4f_b32"), clip_search=clip), w)
    shifted = torch.randn(n, k, generator=gen) * 0.01 + 0.2
    err = {f: float(((fake_quantize(shifted, FormatSpec.parse(f)) - shifted) ** 2).sum()) for f in ("int4f_b32", "int4_b32")}
    assert err["int4f_b32"] < 0.1 * err["int4_b32"]
