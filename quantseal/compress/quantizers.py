"""Blockwise quantise / dequantise: pure tensor math, no I/O.

The contract (after HQQ): ``quantize(W, spec) -> QuantizedTensor`` and ``dequantize(qt) -> W``.
Blocks run along the input dimension K of ``W: (N, K)``; K is zero-padded to whole blocks.

Affine INT-k (MatMulNBits semantics, with zero point z and scale s per block):
    q = clamp(round(w / s) + z, 0, 2^k - 1),     ŵ = (q - z) · s
Symmetric INT-k has the implicit zero point z = 2^(k-1).
NF4 (QLoRA, Dettmers et al. 2023, §3): ŵ = absmax · NF[q], NF the 16 normal-quantile levels.
Float-offset INT4 (``int4f``; llama.cpp's Q4_1, HQQ's float zero point), per block [lo, hi]:
    s = (hi − lo) / 15,  m = lo,  q = clamp(round((w − m) / s), 0, 15),     ŵ = s · q + m
with s and m both float16.

Scales are rounded to float16 *before* the codes are chosen, so the file's float16 scales
dequantise to exactly the values the error was measured on.

``clip_search``: each block's range is shrunk by the factor in a small grid that minimises the
(optionally Fisher-weighted) squared error of that block — MSE-optimal clipping, a standard
refinement of round-to-nearest that costs nothing at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FormatSpec

# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E), ascending; index = code.
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float64,
)

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass
class QuantizedTensor:
    """Unpacked integer codes and their block parameters.

    codes:  uint8 (N, nb·B), values in [0, 2^bits - 1] (padded columns hold the zero point)
    scales: float32 (N, nb), exactly representable in float16
    zeros:  uint8 (N, nb) for affine INT formats, else None
    shape:  (N, K) of the original matrix
    offsets: float32 (N, nb), exactly representable in float16, for ``int4f`` (ŵ = s·q + m), else None
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    spec: FormatSpec
    offsets: torch.Tensor | None = None

    def cpu(self) -> "QuantizedTensor":
        """The same codes and parameters on the CPU (what is written)."""
        return QuantizedTensor(self.codes.cpu(), self.scales.cpu(), None if self.zeros is None else self.zeros.cpu(),
                               self.shape, self.spec, None if self.offsets is None else self.offsets.cpu())


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) → (N, nb, B), zero-padded along K."""
    n, k = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, nb, block)


def _to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def _int_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for a block range [lo, hi] (lo ≤ 0 ≤ hi)."""
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = torch.maximum(hi, -lo)
        scale = _to_fp16_grid(amax / max(half - 1, 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
    else:
        scale = _to_fp16_grid((hi - lo) / qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def _int_codes(wb: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(wb / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def _keep_better(best: list[torch.Tensor] | None, err: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """One step of the per-block clip search: ``[err, *params]`` where ``err`` (the block's squared
    error) is below the best so far, else the best so far (first call: the candidate itself).
    ``params`` are shaped like ``err`` (scales, zero points, offsets) or ``err``'s shape + (B,) (codes)."""
    if best is None:
        return [err, *params]
    better = err < best[0]
    return [torch.where(better if new.dim() == err.dim() else better[..., None], new, old)
            for new, old in zip((err, *params), best)]


def quantize_int(w: torch.Tensor, spec: FormatSpec, weight: torch.Tensor | None = None,
                 clip_search: bool = True) -> QuantizedTensor:
    """Affine or symmetric blockwise INT-k of ``w: (N, K)``; ``weight`` (N, K) ≥ 0 weights the
    clip search's squared error (e.g. the diagonal Fisher)."""
    n, k = w.shape
    wb = _blocks(w.float(), spec.block)
    wt = _blocks(weight.float(), spec.block) if weight is not None else None
    lo = wb.amin(-1).clamp(max=0)
    hi = wb.amax(-1).clamp(min=0)
    best = None
    for ratio in CLIP_GRID if clip_search else (1.0,):
        scale, zero = _int_params(lo * ratio, hi * ratio, spec.bits, spec.symmetric)
        q = _int_codes(wb, scale, zero, spec.bits)
        err = (q - zero[..., None]) * scale[..., None] - wb
        err = (err * err * wt).sum(-1) if wt is not None else (err * err).sum(-1)
        best = _keep_better(best, err, scale, zero, q)
    _, scale, zero, q = best
    # padded columns carry the zero point so that they dequantise to exactly 0
    codes = q.reshape(n, -1)
    if codes.shape[1] > k:
        codes[:, k:] = zero.repeat_interleave(spec.block, dim=1)[:, k:]
    return QuantizedTensor(
        codes=codes.to(torch.uint8),
        scales=scale.float(),
        zeros=None if spec.symmetric else zero.to(torch.uint8),
        shape=(n, k),
        spec=spec,
    )


def offset_params(lo: torch.Tensor, hi: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16-exact ``(s, m)`` of a block range [lo, hi] (any signs): ``s = (hi − lo)/(2^bits − 1)``,
    ``m = lo`` (Q4_1's min/max rule); a constant block gets s = 1 (its codes are 0)."""
    scale = _to_fp16_grid((hi - lo) / (2**bits - 1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, _to_fp16_grid(lo)


def offset_codes(wb: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``q = clamp(round((w − m)/s), 0, 2^bits − 1)`` for blocks ``wb: (..., B)``, ``s, m: (...)``."""
    return torch.clamp(torch.round((wb - offset[..., None]) / scale[..., None]), 0, 2**bits - 1)


def quantize_offset(w: torch.Tensor, spec: FormatSpec, weight: torch.Tensor | None = None,
                    clip_search: bool = True) -> QuantizedTensor:
    """``int4f``: per block of ``w: (N, K)`` its min/max (padding excluded) give s and m
    (:func:`offset_params`); ``clip_search`` shrinks [lo, hi] about its midpoint by each factor of
    :data:`CLIP_GRID` and keeps the (``weight``-weighted) least-squares one per block (factor 1.0
    first, so a block already on a float-offset grid — a Q4_1 source — stays exact)."""
    n, k = w.shape
    wb = _blocks(w.float(), spec.block)
    wt = _blocks(weight.float(), spec.block) if weight is not None else None
    real = _blocks(torch.ones(1, k, device=w.device), spec.block)[0] > 0  # (nb, B): not padding
    lo0 = torch.where(real, wb, torch.full_like(wb, float("inf"))).amin(-1)
    hi0 = torch.where(real, wb, torch.full_like(wb, float("-inf"))).amax(-1)
    mid, half = (hi0 + lo0) / 2, (hi0 - lo0) / 2
    best = None
    for ratio in CLIP_GRID if clip_search else (1.0,):
        lo, hi = (lo0, hi0) if ratio == 1.0 else (mid - ratio * half, mid + ratio * half)
        scale, offset = offset_params(lo, hi, spec.bits)
        q = offset_codes(wb, scale, offset, spec.bits)
        err = torch.where(real, q * scale[..., None] + offset[..., None] - wb, torch.zeros_like(wb))
        err = (err * err * wt).sum(-1) if wt is not None else (err * err).sum(-1)
        best = _keep_better(best, err, scale, offset, q)
    _, scale, offset, q = best
    codes = q.reshape(n, -1)
    codes[:, k:] = 0  # padding: multiplied by zero-padded inputs in every graph
    return QuantizedTensor(codes.to(torch.uint8), scale.float(), None, (n, k), spec, offset.float())


def quantize_nf(w: torch.Tensor, spec: FormatSpec, weight: torch.Tensor | None = None,
                clip_search: bool = True) -> QuantizedTensor:
    """NF4 with one absmax per block (QLoRA eq. 1–2, single-level scales)."""
    n, k = w.shape
    wb = _blocks(w.float(), spec.block)
    wt = _blocks(weight.float(), spec.block) if weight is not None else None
    levels = NF4_LEVELS.to(device=w.device, dtype=torch.float32)
    amax = wb.abs().amax(-1)
    best = None
    for ratio in CLIP_GRID if clip_search else (1.0,):
        scale = _to_fp16_grid(amax * ratio)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = (wb / scale[..., None]).clamp(-1, 1)
        q = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        err = levels[q] * scale[..., None] - wb
        err = (err * err * wt).sum(-1) if wt is not None else (err * err).sum(-1)
        best = _keep_better(best, err, scale, q)
    _, scale, q = best
    codes = q.reshape(n, -1)
    if codes.shape[1] > k:
        codes[:, k:] = 7  # NF level 0.0
    return QuantizedTensor(codes.to(torch.uint8), scale.float(), None, (n, k), spec)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 (N, K) from codes and block parameters."""
    n, k = qt.shape
    spec = qt.spec
    codes = qt.codes.reshape(n, -1, spec.block)
    if spec.kind == "nf":
        w = NF4_LEVELS.to(device=codes.device, dtype=torch.float32)[codes.long()] * qt.scales[..., None]
    elif spec.kind == "intf":
        w = codes.to(torch.float32, copy=True).mul_(qt.scales[..., None]).add_(qt.offsets[..., None])  # s·q + m
    else:
        zero = qt.zeros.float() if qt.zeros is not None else torch.full_like(qt.scales, 2.0 ** (spec.bits - 1))
        w = codes.to(torch.float32, copy=True).sub_(zero[..., None]).mul_(qt.scales[..., None])  # (q − z)·s, in place
    return w.reshape(n, -1)[:, :k]


def quantize(w: torch.Tensor, spec: FormatSpec, weight: torch.Tensor | None = None,
             clip_search: bool = True) -> QuantizedTensor:
    """Dispatch on the format kind; floating formats have no codes (use :func:`round_float`)."""
    if spec.kind == "int":
        return quantize_int(w, spec, weight, clip_search)
    if spec.kind == "intf":
        return quantize_offset(w, spec, weight, clip_search)
    if spec.kind == "nf":
        return quantize_nf(w, spec, weight, clip_search)
    raise ValueError(f"{spec.name} is not a quantised format")


def round_float(w: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """What a floating format stores, back in float32."""
    return w.to(torch.float16).float() if spec.bits == 16 else w.float()


def fake_quantize(w: torch.Tensor, spec: FormatSpec, weight: torch.Tensor | None = None,
                  clip_search: bool = True) -> torch.Tensor:
    """``dequantize(quantize(w))`` for any format, floating ones included."""
    if spec.kind == "fp":
        return round_float(w, spec)
    return dequantize(quantize(w, spec, weight, clip_search))
