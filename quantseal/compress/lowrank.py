"""LQ decomposition: W ≈ dequant(Q) + L1 L2  (LQ-LoRA, Guo et al. 2024, Algorithm 1).

    Q ← 0
    repeat:   L1 L2 ← SVD_r(W − Q)            (eq. 3, weighted: SVD_r(D_r (W − Q) D_c), then undo)
              Q     ← quant(W − L1 L2)
    until the error stops falling.

The error of a candidate is ‖W − (Q + L1 L2)‖²_F, or the Fisher-weighted Σ F ⊙ (W − Ŵ)² when
data-aware.  Factors are rounded to float16 (what the file stores) before the error is taken.
W: (N, K), L1: (N, r), L2: (r, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fisher import scale_vectors
from .formats import Candidate
from .quantizers import QuantizedTensor, dequantize, quantize, round_float


@dataclass
class LQResult:
    """Outcome of one candidate: codes (None for float formats), factors, the stored float
    weight for float formats, the error and the iterations used."""

    qt: QuantizedTensor | None
    w_hat: torch.Tensor
    l1: torch.Tensor | None
    l2: torch.Tensor | None
    error: float
    iterations: int

    def cpu(self) -> "LQResult":
        """The result on the CPU (what is written)."""
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return LQResult(None if self.qt is None else self.qt.cpu(), cpu(self.w_hat), cpu(self.l1), cpu(self.l2),
                        self.error, self.iterations)


def weighted_error(residual: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """Σ F ⊙ R² (or Σ R² without a Fisher), accumulated in float64."""
    r2 = residual.double() ** 2
    return float((r2 * fisher.double()).sum() if fisher is not None else r2.sum())


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 3,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD by subspace iteration (Halko et al. 2011, Alg. 4.4) with a private seeded
    generator, so results are deterministic.  a: (N, K) → U (N, r), S (r,), Vh (r, K)."""
    n, k = a.shape
    q_dim = min(rank + oversample, n, k)
    if q_dim >= min(n, k) // 2:  # small problem: the exact SVD is as cheap
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(k, q_dim, generator=gen, dtype=a.dtype).to(a.device)  # drawn on the CPU: any device, same Ω
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def truncated_svd(m: torch.Tensor, rank: int, d_r: torch.Tensor | None = None,
                  d_c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of ``m`` in the (optionally) D_r, D_c-weighted Frobenius norm:
    SVD of D_r m D_c, √S split between the factors, then D_r⁻¹, D_c⁻¹ undone (LQ-LoRA eq. 5).
    Both factors are rounded to float16, as stored."""
    a = m.float()
    if d_r is not None:
        a = d_r[:, None] * a * d_c[None, :]
    u, s, vh = randomized_svd(a, rank)
    root = s.sqrt()
    l1 = u * root
    l2 = root[:, None] * vh
    if d_r is not None:
        l1 = l1 / d_r[:, None]
        l2 = l2 / d_c[None, :]
    return l1.to(torch.float16).float(), l2.to(torch.float16).float()


def lq_decompose(w: torch.Tensor, cand: Candidate, fisher: torch.Tensor | None = None,
                 max_iter: int = 6, tol: float = 1e-3, clip_search: bool = True) -> LQResult:
    """Algorithm 1 for one (format, rank) candidate; ``fisher`` (N, K) makes it data-aware."""
    w = w.float()
    fmt = cand.fmt
    if fmt.kind == "fp":
        w_hat = round_float(w, fmt)
        return LQResult(None, w_hat, None, None, weighted_error(w - w_hat, fisher), 0)
    if cand.rank == 0:
        qt = quantize(w, fmt, fisher, clip_search)
        w_hat = dequantize(qt)
        return LQResult(qt, w_hat, None, None, weighted_error(w - w_hat, fisher), 1)

    d_r, d_c = scale_vectors(fisher) if fisher is not None else (None, None)
    # The loop starts from Q = 0 as in the paper (its first SVD sees W's own structure), but
    # the state (Q = quant(W), L1 L2 = 0) competes for "best": an LQ candidate is never worse
    # than its rank-0 twin.
    qt = quantize(w, fmt, fisher, clip_search)
    zeros = (torch.zeros(w.shape[0], cand.rank, device=w.device), torch.zeros(cand.rank, w.shape[1], device=w.device))
    best = LQResult(qt, dequantize(qt), *zeros, weighted_error(w - dequantize(qt), fisher), 0)
    q_deq = torch.zeros_like(w)
    prev = float("inf")
    for it in range(1, max_iter + 1):
        l1, l2 = truncated_svd(w - q_deq, cand.rank, d_r, d_c)
        low = l1 @ l2
        qt = quantize(w - low, fmt, fisher, clip_search)
        q_deq = dequantize(qt)
        err = weighted_error(w - q_deq - low, fisher)
        if err < best.error:
            best = LQResult(qt, q_deq, l1, l2, err, it)
        if err >= prev * (1 - tol):  # stopped falling
            break
        prev = err
    return best
