"""IA³ (Liu et al. 2022, §3.3): learned per-feature rescaling, ``ia3_l``.

PEFT (``IA3Layer``, ``Linear.forward``): on a layer named by ``feedforward_modules`` the *input*
is rescaled, ``y = W (l ⊙ x) + β`` with ``l: (1, K)``; on any other targeted layer the *output*
is, bias included, ``y = l ⊙ (W x + β)`` with ``l: (N, 1)``.  The first is edit 1 of :mod:`.base`
(exported as the layer's input divisor ``x / (1/l)``, so ``l`` must be positive), the second edit 5
(a Mul after the MatMul, and the stored bias multiplied by ``l``): no low-rank term at all.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import BadInput
from .base import MatrixDelta, Tensors, register


def is_feedforward(cfg: dict, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``: a full regex match when
    ``feedforward_modules`` is a string, else a suffix match against any of its entries."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(k) for k in ff)


@register("IA3", ("ia3_l",))
def read_ia3(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, MatrixDelta]:
    out = {}
    for module in sorted(tensors.modules):
        lvec = tensors.need(module, "ia3_l", 2)
        if is_feedforward(cfg, module):
            if lvec.shape[0] != 1:
                raise BadInput(f"{tensors.where}: {module} is a feed-forward module but ia3_l is {list(lvec.shape)}, not [1, in]")
            out[module] = MatrixDelta(module, (-1, lvec.shape[1]), input_scale=lvec[0].copy())
        else:
            if lvec.shape[1] != 1:
                raise BadInput(f"{tensors.where}: {module} is not a feed-forward module but ia3_l is {list(lvec.shape)}, "
                               "not [out, 1]")
            out[module] = MatrixDelta(module, (lvec.shape[0], -1), output_scale=lvec[:, 0].copy())
    return out
