"""Coarse-to-fine pre-processing (CFP, CBQ §3.3: Ding et al. 2024, "CBQ: Cross-Block Quantization
for Large Language Models"): find outliers in weights and activations before reconstruction.

Detection (one rule for both), on a vector of magnitudes ``x`` (|w| of a matrix, or the per-
channel maxima max_t |x_tc| of an activation):

1. coarse: the quartile rule, candidates C = {x > T},  T = Q3 + 1.5·IQR;
2. fine: sort C; every split t of C into a reserved part R = {c ∈ C: c ≤ t} and an outlier part
   O = {c > t} scores

       M(t) = (min O − max R)² − λ · (|R| Var R + |O| Var O) / |C|

   (the squared distance between the sets minus λ times their pooled intra-set variance); the split with the
   largest M is kept if M > 0, else there are no outliers.  With λ = 16 a split needs a gap of
   more than four pooled standard deviations, which the tail of a Gaussian matrix essentially
   never shows, while a few planted outliers at many σ always do.  When all of C is one tight
   cluster far above T, the split "R = everything ≤ T" is scored as well.

Weights: outliers are truncated to ± the largest kept magnitude (:func:`truncate_weight_outliers`).
Activations: outlier channels are scaled down, x_c / s_c, and the inverse folded into the
consumers' input columns, W_{:,c} · s_c; the division itself is folded into the layer that
produces x (a LayerNorm / RMSNorm's weight and bias, or a Linear's rows), so the float model's
output is unchanged (:func:`fold_activation_scale`).  Only exact folds are used: in a post-LN
BERT block the LayerNorm output is also the residual stream, so there the only exact site is
value → attention.output.dense; pre-norm decoders also fold into their RMSNorms and up_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import Family

IQR_FACTOR = 1.5
LAMBDA = 16.0

# (producer, consumers) pairs, relative to a block, whose fold is exact (see the module doc)
FOLD_SITES = {
    "encoder": (("attention.self.value", ("attention.output.dense",)),),
    "decoder": (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp.up_proj", ("mlp.down_proj",)),
                ("input_layernorm", ("self_attn.qkv_proj",)),  # Phi-3's fused projections
                ("post_attention_layernorm", ("mlp.gate_up_proj",))),
}


def outlier_threshold(x: torch.Tensor, lam: float = LAMBDA, iqr_factor: float = IQR_FACTOR) -> float | None:
    """The largest kept magnitude t (values > t are outliers), or None if there are none.

    x: any shape, magnitudes ≥ 0 (flattened); computed on the CPU (a scalar threshold, whatever
    device ``x`` is on)."""
    x = x.detach().flatten().double().cpu()
    if x.numel() < 8:
        return None
    q1, q3 = torch.quantile(x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20]]
                            if x.numel() > (1 << 20) else x, torch.tensor([0.25, 0.75], dtype=x.dtype))
    coarse = float(q3 + iqr_factor * (q3 - q1))
    c = torch.sort(x[x > coarse]).values
    if c.numel() == 0:
        return None
    # R = c[:j] (j = 0: R is the inliers' top value alone), O = c[j:], for j = 0..len-1
    below = x[x <= coarse]
    r_top = below.max() if below.numel() else torch.tensor(0.0, dtype=x.dtype)
    vals = torch.cat([r_top.reshape(1), c])  # vals[0] stands for "everything up to T"
    n = vals.numel()
    cs, cs2 = torch.cumsum(vals, 0), torch.cumsum(vals * vals, 0)
    j = torch.arange(1, n, dtype=vals.dtype)  # R = vals[:j], O = vals[j:]
    jj = j.long()
    mr = cs[jj - 1] / j
    mo = (cs[-1] - cs[jj - 1]) / (n - j)
    vr = (cs2[jj - 1] / j - mr * mr).clamp(min=0)
    vo = ((cs2[-1] - cs2[jj - 1]) / (n - j) - mo * mo).clamp(min=0)
    m = (vals[jj] - vals[jj - 1]) ** 2 - lam * (j * vr + (n - j) * vo) / n
    k = int(torch.argmax(m))
    return float(vals[k]) if float(m[k]) > 0 else None


def truncate_weight_outliers(w: torch.Tensor, lam: float = LAMBDA) -> tuple[torch.Tensor, int]:
    """W: (N, K) → (W with |w| clipped to the kept range, number of truncated weights)."""
    t = outlier_threshold(w.abs(), lam)
    if t is None:
        return w.clone(), 0
    n = int((w.abs() > t).sum())
    return w.clamp(-t, t), n


def activation_channel_scales(channel_max: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """channel_max: (C,) max_t |x_tc| → s: (C,) ≥ 1; outlier channels get s_c = max_c / t so that
    they are brought down to the largest kept channel's range, the rest 1."""
    t = outlier_threshold(channel_max, lam)
    s = torch.ones_like(channel_max, dtype=torch.float32)
    if t is not None and t > 0:
        out = channel_max > t
        s[out] = (channel_max[out] / t).float()
    return s


@torch.no_grad()
def fold_activation_scale(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """x_c ↦ x_c / s_c at the producer's output, W_{:,c} ↦ W_{:,c} · s_c in every consumer.

    producer: a LayerNorm / RMSNorm (weight (C,), optional bias (C,)) or a Linear (rows = C)."""
    s = s.to(torch.float32)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s[:, None].to(producer.weight.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for lin in consumers:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def fold_sites(fam: Family, block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """The exact (producer, consumers) folds available in one block."""
    out = []
    for prod, cons in FOLD_SITES[fam.name]:
        try:
            p = block.get_submodule(prod)
            cs = [block.get_submodule(c) for c in cons]
        except AttributeError:
            continue
        if isinstance(p, nn.Linear) and any(c.in_features != p.out_features for c in cs):
            continue  # e.g. grouped-query attention: v_proj's channels are repeated across heads
        out.append((p, cs, cons[0]))
    return out
