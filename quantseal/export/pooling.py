"""Sentence pooling as sentence-transformers' ``Pooling`` + ``Normalize`` modules compute it, in
torch ops the ONNX exporter traces into the encoder graph (:mod:`quantseal.export.onnx`).

Modes (Reimers & Gurevych 2019, Sentence-BERT §3; sentence-transformers ``Pooling._forward_padded``),
for token states h: (B, T, H) and attention mask m: (B, T) ∈ {0, 1}:

* ``cls``:  h[b, t₀(b)], t₀ the first unmasked position (0 for right padding);
* ``max``:  max_t h[b, t] over unmasked t (masked positions are −∞);
* ``mean``: Σ_t m h / max(Σ_t m, 1e-9);
* ``mean_sqrt_len_tokens``: Σ_t m h / sqrt(max(Σ_t m, 1e-9)).

Several modes concatenate along H in the given order; ``normalize`` divides by max(‖·‖₂, 1e-12)
(``torch.nn.functional.normalize``, as ``Normalize`` does).
"""

from __future__ import annotations

import torch
from torch import nn

from ..sbert import Conventions


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...] = ("mean",),
         normalize: bool = True) -> torch.Tensor:
    """hidden: (B, T, H) float, mask: (B, T) int → (B, H·len(modes))."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    out = []
    for mode in modes:
        if mode == "cls":
            first = mask.to(torch.int32).argmax(dim=1)  # (B,)
            out.append(torch.gather(hidden, 1, first[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1))
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (hidden * m).sum(1)
            count = m.sum(1).clamp(min=1e-9)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    vec = out[0] if len(out) == 1 else torch.cat(out, dim=-1)
    return nn.functional.normalize(vec, p=2, dim=-1) if normalize else vec


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask, token_type_ids) → the pooled sentence embedding (B, D): an
    encoder returning ``last_hidden_state`` followed by :func:`pool` under ``conventions``."""

    def __init__(self, encoder: nn.Module, conventions: Conventions | None = None):
        super().__init__()
        self.encoder = encoder
        self.conventions = conventions or Conventions()

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        c = self.conventions
        return pool(out.last_hidden_state, attention_mask, c.pooling, c.normalize)
