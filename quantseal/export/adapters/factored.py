"""Exact arithmetic on factored low-rank products ``l1 (N, r) · l2 (r, K)``, never forming (N, K).

* :func:`balanced`: rescale each rank-1 component so both factors have equal norms (float16-safe).
* :func:`truncate_factored`: best rank-R approximation (Eckart–Young) via thin QR of both factors
  and an SVD of the small core ``R1 R2ᵀ = U Σ Vᵀ``: ``L1'' = Q1 U_R Σ_R^½``, ``L2'' = Σ_R^½ V_Rᵀ Q2ᵀ``;
  the Frobenius error is ``√(Σ_{j>R} σ_j²)`` exactly.
* :func:`product_distance`: ``‖p1 p2 − q1 q2‖_F`` from the factors.
"""

from __future__ import annotations

import numpy as np


def balanced(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each rank-1 component of ``b (N, r) · a (r, K)`` so that column j of b and row j
    of a have equal norms; the product is unchanged (float16-friendly magnitudes)."""
    nb = np.linalg.norm(b, axis=0)
    na = np.linalg.norm(a, axis=1)
    d = np.ones_like(nb)
    ok = (nb > 0) & (na > 0)
    d[ok] = np.sqrt(nb[ok] / na[ok])
    return b / d, a * d[:, None]


def truncate_factored(l1: np.ndarray, l2: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Best rank-``rank`` approximation of ``l1 (N, r) · l2 (r, K)`` without forming the product.

    Returns ``(l1'' (N, R), l2'' (R, K), error, norm)``: ``error = ‖l1 l2 − l1'' l2''‖_F``
    (the discarded singular values) and ``norm = ‖l1 l2‖_F``, both exact in float64."""
    q1, r1 = np.linalg.qr(l1)  # (N, p), (p, r)
    q2, r2 = np.linalg.qr(l2.T)  # (K, q), (q, r)
    u, sv, vt = np.linalg.svd(r1 @ r2.T)  # core (p, q)
    keep = min(rank, int(sv.size))
    root = np.sqrt(sv[:keep])
    new1 = (q1 @ u[:, :keep]) * root
    new2 = (root[:, None] * vt[:keep]) @ q2.T
    return new1, new2, float(np.sqrt(np.sum(sv[keep:] ** 2))), float(np.sqrt(np.sum(sv ** 2)))


def product_distance(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> float:
    """``‖p1 p2 − q1 q2‖_F`` from the factors, never forming an (N, K) matrix: with
    F = [p1 | −q1] = Q_F R_F and Gᵀ = [p2 ; q2]ᵀ = Q_G R_G (thin QR), ‖F G‖_F = ‖R_F R_Gᵀ‖_F."""
    f = np.concatenate([p1, -q1], 1)
    g = np.concatenate([p2, q2], 0)
    if f.shape[1] == 0:
        return 0.0
    return float(np.linalg.norm(np.linalg.qr(f, mode="r") @ np.linalg.qr(g.T, mode="r").T))
