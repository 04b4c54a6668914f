"""AdaLoRA (Zhang et al. 2023, eq. 3): an SVD-shaped update ``ΔW = P Λ Q``.

PEFT stores ``lora_A = Q: (r, K)``, ``lora_E = diag(Λ): (r, 1)``, ``lora_B = P: (N, r)`` and computes
(``AdaLoraLayer.forward``) ``y += x (A ⊙ E)ᵀ Bᵀ · σ / (ranknum + 10⁻⁵)``, with ``σ = lora_alpha``
(or the rank as loaded when lora_alpha ≤ 0; *not* divided by r) and ``ranknum = init_r``: PEFT creates every
layer at ``init_r`` and, when an allocated ``rank_pattern`` shrinks it to the kept rows on load
(``resize_modules_by_rank_pattern``), copies the old ``ranknum`` back ("the scaling is exactly as
the previous").  So, with r ≤ init_r the rows saved,

    b = P · σ / (init_r + 10⁻⁵)   (N, r),        a = diag(Λ) Q   (r, K),

a rank-r branch; pruned singular values (Λ_i = 0) give zero rows, kept for simplicity.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import BadInput, Unsupported
from .base import MatrixDelta, Tensors, number, register


@register("ADALORA", ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B"))
def read_adalora(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, MatrixDelta]:
    alpha = number(cfg, "lora_alpha", 8, folder)
    init_r = number(cfg, "init_r", 12, folder, int)
    out = {}
    for module, p in sorted(tensors.modules.items()):
        if "lora_embedding_A" in p or "lora_embedding_B" in p:
            raise Unsupported(f"{tensors.where}: AdaLoRA on the embedding {module} is not folded")
        a, b, e = tensors.need(module, "lora_A", 2), tensors.need(module, "lora_B", 2), tensors.need(module, "lora_E", 2)
        r = a.shape[0]
        if b.shape[1] != r or e.shape != (r, 1):
            raise BadInput(f"{tensors.where}: {module}: lora_A {list(a.shape)}, lora_E {list(e.shape)}, "
                           f"lora_B {list(b.shape)} are not an AdaLoRA triple (Q: (r, in), Λ: (r, 1), P: (out, r))")
        if r > init_r or (r != init_r and not cfg.get("rank_pattern")):
            raise BadInput(f"{tensors.where}: {module} has rank {r}, the config says init_r = {init_r}"
                           + ("" if cfg.get("rank_pattern") else " and has no rank_pattern"))
        sigma = alpha if alpha > 0 else float(r)  # update_layer at the kept rank; not restored
        s = sigma / (init_r + 1e-5)
        out[module] = MatrixDelta(module, (b.shape[0], a.shape[1]), "linear", s * b, a * e, s)
    return out
