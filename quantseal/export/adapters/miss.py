"""MiSS (Kang & Yin 2024, "Bone"/MiSS; PEFT ``tuners/miss``): one shared block per layer.

PEFT's forward (``MissLayer`` / ``Linear.forward``, ``init_weights`` True / False / ``"mini"``):
``x: (..., K)`` is zero-padded to a multiple of r, cut into K/r chunks of r that are *summed*, and
multiplied by the block ``D: (r, N)`` (``"mini"`` stores ``(r, mini_r)`` and tiles it N/mini_r times
along N):

    y += (Σ_c x[c·r : (c+1)·r]) D   ⇒   ΔW = Dᵀ S,   S: (r, K),  S[j, i] = 1 if i mod r = j,

a rank-r branch ``b = Dᵀ (N, r)``, ``a = S (r, K)``.  The ``"bat"`` variant (the delta depends on
the base weight itself) is refused by the allow-list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BadInput
from .base import MatrixDelta, Tensors, number, register


def chunk_sum(r: int, k: int) -> np.ndarray:
    """S (r, K): S[j, i] = 1 when i mod r = j (the padded-and-summed chunks of x)."""
    return (np.arange(k)[None, :] % r == np.arange(r)[:, None]).astype(np.float64)


@register("MISS", ("miss_block",))
def read_miss(folder: Path, cfg: dict, tensors: Tensors):
    """Returns ``(deltas, resolve)``: K (and, for ``"mini"``, N) come from the checkpoint."""
    r = number(cfg, "r", 64, folder, int)
    mini = cfg.get("init_weights") == "mini"
    blocks = {}
    for module in sorted(tensors.modules):
        blk = tensors.need(module, "miss_block", 2)
        if blk.shape[0] != r:
            raise BadInput(f"{tensors.where}: {module}: miss_block {list(blk.shape)}, the config says r = {r}")
        blocks[module] = blk
    out = {m: MatrixDelta(m, (-1 if mini else blk.shape[1], -1), "linear") for m, blk in blocks.items()}

    def resolve(shapes: dict[str, tuple[int, int]]) -> None:
        for module, d in out.items():
            n, k = shapes[module]
            blk = blocks[module]
            if mini:
                if n % blk.shape[1]:
                    raise BadInput(f"{tensors.where}: {module}: {n} outputs are not a multiple of mini_r = {blk.shape[1]}")
                blk = np.tile(blk, (1, n // blk.shape[1]))
            d.b, d.a, d.shape = blk.T.copy(), chunk_sum(r, k), (n, k)

    return out, resolve
