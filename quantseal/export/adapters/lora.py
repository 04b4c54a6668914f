"""LoRA, rsLoRA, DoRA and ``lora_bias``: PEFT's ``LORA`` kind.

**LoRA** (Hu et al. 2021, eq. 3): ``ΔW = s · B · A``, ``B: (N, r)``, ``A: (r, K)``, ``s = α / r``
(``α / √r`` with rsLoRA, Kalajdzievski 2023); ``rank_pattern`` / ``alpha_pattern`` override r and α
per module.  On an ``nn.Embedding`` PEFT stores ``lora_embedding_A: (r, V)``,
``lora_embedding_B: (H, r)`` and the table changes by ``ΔE = s · (B A)ᵀ = (s Aᵀ)(Bᵀ)``.

**lora_bias**: ``lora_B`` carries a bias ``b_B (N,)``; PEFT's forward adds ``s · (B A x + b_B)``,
so the layer's bias grows by ``s · b_B`` (an Add).

**DoRA** (Liu et al. 2024, eq. 5) with magnitude ``m (N,)``: PEFT computes (``DoraLinearLayer``,
dropout off) ``y = base(x) + (m/n − 1) ⊙ (x W₀ᵀ) + (m/n) ⊙ s·(B A x)`` with
``n = ‖W₀ + s B A‖₂`` over each output row, ``W₀`` the weight PEFT sees (here the *compressed*
``dequant(Q) + L1 L2``).  That is ``y = (m/n) ⊙ (x (W₀ + s B A)ᵀ) + β``: the low-rank term joins
the branch as for LoRA and the whole row, quantised part included, is scaled by ``m/n`` after the
MatMul (edits 2 and 3 of :mod:`.base`), the bias untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BadInput, Unsupported
from .base import CONFIG, MatrixDelta, Tensors, number, pattern_value, register

PARAMS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def lora_scale(cfg: dict, folder: Path, module: str, rank: int) -> float:
    """``α / r`` (``α / √r`` with rsLoRA), with the module's ``alpha_pattern`` entry."""
    alpha = number(cfg, "lora_alpha", 8, folder)
    al = float(pattern_value(cfg.get("alpha_pattern"), module, alpha))
    return al / (np.sqrt(rank) if cfg.get("use_rslora") else rank)


def check_rank(cfg: dict, folder: Path, module: str, got: int, key: str = "r") -> None:
    r = number(cfg, key, 8, folder, int)
    want = int(pattern_value(cfg.get("rank_pattern"), module, r))
    if got != want:
        raise BadInput(f"{folder}/adapter_model.safetensors: {module} has rank {got}, the config says r = {want}")


@register("LORA", PARAMS)
def read_lora(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, MatrixDelta]:
    """Every module's edit: ``b = s·B``, ``a = A`` (+ ``bias_add = s·b_B``, + DoRA's magnitude)."""
    dora = bool(cfg.get("use_dora"))
    if dora and cfg.get("lora_bias"):
        raise Unsupported(f"{folder / CONFIG}: use_dora together with lora_bias is not folded")
    out = {}
    for module, p in sorted(tensors.modules.items()):
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        a, b = tensors.need(module, ka, 2), tensors.need(module, kb, 2)
        if a.shape[0] != b.shape[1]:
            raise BadInput(f"{tensors.where}: {module}: {ka} {list(a.shape)} and {kb} {list(b.shape)} "
                           "are not a LoRA pair (A: (r, in), B: (out, r))")
        check_rank(cfg, folder, module, a.shape[0])
        s = lora_scale(cfg, folder, module, a.shape[0])
        extra = set(p) - {ka, kb, "lora_B.bias", "lora_magnitude_vector"}
        if extra:
            raise BadInput(f"{tensors.where}: {module}: unexpected tensors {sorted(extra)}")
        if emb:  # ΔE (V, H) = s · (B A)ᵀ = (s Aᵀ) (Bᵀ),  A: (r, V), B: (H, r)
            if dora or "lora_B.bias" in p:
                raise Unsupported(f"{folder / CONFIG}: DoRA or lora_bias on the embedding {module} is not folded")
            out[module] = MatrixDelta(module, (a.shape[1], b.shape[0]), "embedding", s * a.T, b.T.copy(), s)
            continue
        d = MatrixDelta(module, (b.shape[0], a.shape[1]), "linear", s * b, a, s)
        if "lora_B.bias" in p:
            if not cfg.get("lora_bias"):
                raise BadInput(f"{tensors.where}: {module} has a lora_B bias, but the config's lora_bias is false")
            d.bias_add = s * p["lora_B.bias"].reshape(-1)
        elif cfg.get("lora_bias"):
            raise BadInput(f"{tensors.where}: lora_bias is true, but {module} has no lora_B bias")
        if dora:
            m = tensors.need(module, "lora_magnitude_vector", 1)
            if m.shape != (d.shape[0],):
                raise BadInput(f"{tensors.where}: {module}: magnitude {list(m.shape)}, expected [{d.shape[0]}]")
            d.magnitude = m
        elif "lora_magnitude_vector" in p:
            raise BadInput(f"{tensors.where}: {module} has a DoRA magnitude, but the config's use_dora is false")
        out[module] = d
    return out
