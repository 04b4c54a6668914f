"""LQ decomposition (LQ-LoRA Alg. 1) against plain quantisation and exact SVD."""

import pytest
import torch

from quantseal.compress.formats import Candidate, FormatSpec
from quantseal.compress.lowrank import lq_decompose, randomized_svd, truncated_svd, weighted_error
from quantseal.compress.quantizers import dequantize


def low_rank_plus_noise(n=96, k=160, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) * 0.3 + 0.05 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("fmt", ["int2_b32", "int4_b64", "nf4_b64"])
def test_lq_beats_plain_quantisation_and_is_monotone_in_rank(fmt):
    w = low_rank_plus_noise()
    spec = FormatSpec.parse(fmt)
    errs = [lq_decompose(w, Candidate(spec, r)).error for r in (0, 4, 8, 16)]
    assert errs[1] < errs[0]  # the low-rank branch absorbs the structured part
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:]))


def test_lq_result_is_consistent():
    w = low_rank_plus_noise(seed=1)
    res = lq_decompose(w, Candidate(FormatSpec.parse("int2_b32"), 8))
    recon = dequantize(res.qt) + res.l1 @ res.l2
    assert res.error == pytest.approx(float(((w.double() - recon.double()) ** 2).sum()), rel=1e-5)
    # factors are on the float16 grid (what the file stores)
    assert torch.equal(res.l1.half().float(), res.l1) and torch.equal(res.l2.half().float(), res.l2)
    assert res.l1.shape == (96, 8) and res.l2.shape == (8, 160)


def test_randomized_svd_matches_exact_on_low_rank():
    w = low_rank_plus_noise(n=300, k=400, r=5, seed=2).double()
    u, s, vh = randomized_svd(w, 5)
    s_exact = torch.linalg.svdvals(w)[:5]
    torch.testing.assert_close(s, s_exact, rtol=1e-6, atol=1e-8)
    assert torch.equal(randomized_svd(w, 5)[1], s)  # deterministic


def test_fisher_weighted_svd_lowers_weighted_error():
    """With a rank-1 Fisher F = d_r d_cᵀ the weighted SVD is optimal in the F-weighted norm."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(64, 80, generator=g)
    d_r = torch.rand(64, generator=g) * 5 + 0.1
    d_c = torch.rand(80, generator=g) * 5 + 0.1
    fisher = (d_r[:, None] * d_c[None, :]) ** 2
    plain = truncated_svd(m, 8)
    weighted = truncated_svd(m, 8, d_r, d_c)
    e_plain = weighted_error(m - plain[0] @ plain[1], fisher)
    e_weighted = weighted_error(m - weighted[0] @ weighted[1], fisher)
    assert e_weighted < 0.9 * e_plain


def test_data_aware_lq_lowers_fisher_weighted_error():
    w = low_rank_plus_noise(seed=4)
    g = torch.Generator().manual_seed(5)
    fisher = (torch.rand(96, 1, generator=g) * torch.rand(1, 160, generator=g)) ** 3 + 1e-4
    cand = Candidate(FormatSpec.parse("int2_b32"), 8)
    blind = lq_decompose(w, cand)
    aware = lq_decompose(w, cand, fisher)
    recon_blind = dequantize(blind.qt) + blind.l1 @ blind.l2
    assert aware.error < weighted_error(w - recon_blind, fisher)


def test_float_candidates():
    w = low_rank_plus_noise()
    assert lq_decompose(w, Candidate(FormatSpec.parse("fp32"))).error == 0.0
    assert 0 < lq_decompose(w, Candidate(FormatSpec.parse("fp16"))).error < 1e-3
