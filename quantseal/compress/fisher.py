"""Diagonal empirical Fisher of the model's *output*, from calibration batches.

LQ-LoRA (Guo et al. 2024, §3.2) weights the decomposition by the diagonal Fisher
F_ij = E_x[(∂ℓ(x)/∂W_ij)²].  What ℓ is matters: it must measure the sensitivity of the model's
output, not of a layer alone.

* Decoders: ℓ = next-token cross-entropy (the empirical Fisher of the LM).
* Encoders with no task head: the Gauss-Newton diagonal of the sentence embedding e(x),
  F = E_x E_u[(∂⟨e(x), u⟩/∂W)²] with u ~ N(0, I), since E_u[(Jᵀu)²] = diag(JᵀJ).
  A batch draws an independent u_b for every sentence and back-propagates Σ_b ⟨e(x_b), u_b⟩:
  the cross terms 2·g_b·g_c have zero mean over independent u_b, u_c, so the squared batch
  gradient is an unbiased estimate of Σ_b diag(J_bᵀJ_b) at the cost of one backward pass.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..models import Family, encode


def output_fisher(model: nn.Module, fam: Family, batches: Iterable[dict[str, torch.Tensor]],
                  params: dict[str, torch.Tensor], seed: int = 0, directions: int = 1,
                  progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """``{name: F (same shape as params[name])}``, the mean over calibration sequences.

    ``params`` maps a name to a parameter tensor of ``model`` (e.g. a Linear's weight).  The
    model and the batches may live on any one device (``--device``); the random directions are
    drawn on the CPU (the same on every device) and the result is on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    count = 0
    try:
        for batch in batches:
            n_seq = batch["input_ids"].shape[0]
            for _ in range(directions if fam.name == "encoder" else 1):
                model.zero_grad(set_to_none=True)
                if fam.name == "encoder":
                    emb = encode(model, batch)
                    u = torch.randn(emb.shape, generator=gen).to(emb.device)
                    (emb * u).sum().backward()
                else:
                    ids = batch["input_ids"]
                    labels = ids.masked_fill(batch["attention_mask"] == 0, -100)
                    out = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
                    (out.loss * n_seq).backward()
                for k, p in params.items():
                    acc[k] += p.grad.double() ** 2
                count += n_seq
            if progress:
                progress(n_seq)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {k: (v / max(count, 1)).float().cpu() for k, v in acc.items()}


def scale_vectors(fisher: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ-LoRA's rank-1 approximation of the Fisher weighting: D_r = sqrt(row means of F),
    D_c = sqrt(column means of F), each floored at ``eps`` × its mean so no row is ignored."""
    r = fisher.mean(1)
    c = fisher.mean(0)
    r = r.clamp(min=eps * r.mean().clamp(min=1e-30))
    c = c.clamp(min=eps * c.mean().clamp(min=1e-30))
    return r.sqrt(), c.sqrt()


def floor_fisher(fisher: torch.Tensor, frac: float = 1e-2) -> torch.Tensor:
    """F + frac·mean(F): no weight is free, not even one the calibration text never touched."""
    return fisher + frac * fisher.mean()
