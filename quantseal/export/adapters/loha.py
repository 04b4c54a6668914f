"""LoHa (Hyeon-Woo et al. 2022, FedPara eq. 2): a Hadamard product of two low-rank products,

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (N, r),  W1b, W2b: (r, K),  s = α / r,

(PEFT ``loha.layer.make_weight``; ``rank_pattern`` / ``alpha_pattern`` per module).  By the
face-splitting identity ``(P1 Q1) ⊙ (P2 Q2) = (P1 • P2)(Q1ᵀ • Q2ᵀ)ᵀ`` (• the row-wise Kronecker
product) it is exactly a rank-r² branch:

    b[:, i·r + j] = s · W1a[:, i] ⊙ W2a[:, j]   (N, r²),     a[i·r + j, :] = W1b[i] ⊙ W2b[j]   (r², K).

When r² ≥ min(N, K) the fold stores the branch at rank min(N, K) instead (a lossless SVD of the
factored product: the rank cannot exceed it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BadInput, Unsupported
from .base import MatrixDelta, Tensors, number, pattern_value, register

PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def face_split(p1: np.ndarray, q1: np.ndarray, p2: np.ndarray, q2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p1 q1) ⊙ (p2 q2) = b a`` with ``b = p1 • p2 (N, r1 r2)``, ``a = (q1ᵀ • q2ᵀ)ᵀ (r1 r2, K)``."""
    n, k = p1.shape[0], q1.shape[1]
    b = (p1[:, :, None] * p2[:, None, :]).reshape(n, -1)
    a = (q1[:, None, :] * q2[None, :, :]).reshape(-1, k)
    return b, a


def lycoris_scale(cfg: dict, folder: Path, module: str) -> tuple[int, float]:
    """(r, α / r) of a LyCORIS-family module, with its rank/alpha pattern entries."""
    r = int(pattern_value(cfg.get("rank_pattern"), module, number(cfg, "r", 8, folder, int)))
    alpha = float(pattern_value(cfg.get("alpha_pattern"), module, number(cfg, "alpha", 8, folder)))
    return r, alpha / r


@register("LOHA", PARAMS)
def read_loha(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, MatrixDelta]:
    out = {}
    for module, p in sorted(tensors.modules.items()):
        if "hada_t1" in p or "hada_t2" in p:
            raise Unsupported(f"{tensors.where}: {module}: LoHa's CP tensors (convolutions) are not folded")
        w1a, w1b = tensors.need(module, "hada_w1_a", 2), tensors.need(module, "hada_w1_b", 2)
        w2a, w2b = tensors.need(module, "hada_w2_a", 2), tensors.need(module, "hada_w2_b", 2)
        r, s = lycoris_scale(cfg, folder, module)
        n, k = w1a.shape[0], w1b.shape[1]
        if not (w1a.shape == w2a.shape == (n, r) and w1b.shape == w2b.shape == (r, k)):
            raise BadInput(f"{tensors.where}: {module}: hada factors {[list(x.shape) for x in (w1a, w1b, w2a, w2b)]} "
                           f"are not (out, r) / (r, in) with r = {r}")
        b, a = face_split(w1a, w1b, w2a, w2b)
        out[module] = MatrixDelta(module, (n, k), "linear", s * b, a, s)
    return out
