"""LoKr (Edalati et al. 2022; LyCORIS): a Kronecker product,

    ΔW = s · W1 ⊗ W2,   W1: (o1, i1),  W2: (o2, i2),  N = o1·o2,  K = i1·i2,  s = α / r,

each factor stored whole (``lokr_w1``) or as a low-rank product (``lokr_w1_a @ lokr_w1_b``; PEFT
``lokr.layer.make_kron``).  With ``W1 = U1 V1`` and ``W2 = U2 V2`` (a stored product, or a whole
factor written ``I · W`` or ``W · I``, whichever is thinner) the mixed-product rule gives exactly

    ΔW = (s · U1 ⊗ U2) (V1 ⊗ V2):   b = s · U1 ⊗ U2  (N, r1 r2),   a = V1 ⊗ V2  (r1 r2, K),

a rank-r1·r2 branch (stored at rank min(N, K) when that is smaller: a lossless SVD).

That branch is often large (MiniLM's 384×384 at r = 8: 384 = 16·24, W1 whole 16×16, W2 = rank 8,
so r1·r2 = 128 ranks, 2.4× the INT4 matrix).  So the fold stores ``K1 = s·W1``, ``K2 = W2`` as
they are when that is smaller and the layer has no output scale or input divisor yet; the graph
computes ``x (K1 ⊗ K2)ᵀ`` as Reshape → MatMul → MatMul → Reshape (:func:`~quantseal.export.lowbit.linear_nodes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BadInput, Unsupported
from .base import MatrixDelta, Tensors, register
from .loha import lycoris_scale

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def thin(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w = U V`` with the thinner of ``I · w`` and ``w · I``."""
    o, i = w.shape
    return (np.eye(o), w) if o <= i else (w, np.eye(i))


def kron_lowrank(w1: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W1 ⊗ W2 = b a`` (mixed product of the thin factorisations), b: (N, r1 r2), a: (r1 r2, K)."""
    (u1, v1), (u2, v2) = thin(w1), thin(w2)
    return np.kron(u1, u2), np.kron(v1, v2)


def factor(tensors: Tensors, module: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)`` with ``U V`` = the Kronecker factor ``which`` ("w1" / "w2")."""
    p = tensors.modules[module]
    if f"lokr_{which}" in p:
        return thin(tensors.need(module, f"lokr_{which}", 2))
    u, v = tensors.need(module, f"lokr_{which}_a", 2), tensors.need(module, f"lokr_{which}_b", 2)
    if u.shape[1] != v.shape[0]:
        raise BadInput(f"{tensors.where}: {module}: lokr_{which}_a {list(u.shape)} and lokr_{which}_b "
                       f"{list(v.shape)} do not multiply")
    return u, v


@register("LOKR", PARAMS)
def read_lokr(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, MatrixDelta]:
    out = {}
    for module, p in sorted(tensors.modules.items()):
        if "lokr_t2" in p:
            raise Unsupported(f"{tensors.where}: {module}: LoKr's CP tensor (convolutions) is not folded")
        u1, v1 = factor(tensors, module, "w1")
        u2, v2 = factor(tensors, module, "w2")
        _, s = lycoris_scale(cfg, folder, module)
        b, a = np.kron(u1, u2), np.kron(v1, v2)
        out[module] = MatrixDelta(module, (b.shape[0], a.shape[1]), "linear", s * b, a, s,
                                  kron=(s * (u1 @ v1), u2 @ v2))
    return out
