"""The learnable quantised Linear of CBQ (Ding et al. 2024, §3.1–3.2) and its activation quantiser.

Weights (per Linear ``W: (N, K)``, blocks of B along K, ``nb = ceil(K / B)``; everything below
is (N, nb, B) unless said otherwise).  Initialised from round-to-nearest with MSE clipping
(:func:`.quantizers.quantize_int`: step sizes s₀ (N, nb), integer zero points z (N, nb)):

    Ŵ = s · (clamp(⌊W / s₀⌋ + h + z, 0, 2^k − 1) − z),   s = fp16(s₀ · e^t)          (CBQ eq. 5)
    h = ΔW = clip(σ(V)(ζ − γ) + γ, 0, 1),                ζ = 1.1, γ = −0.1          (LoRA-Rounding)
    V = V₀ + A1 · A2,   A1: (N, r), A2: (r, nb·B)

V₀ is AdaRound's initialisation (h(V₀) = W/s₀ − ⌊W/s₀⌋, frozen); as in LoRA, the trainable
low-rank product starts at zero (A1 = 0).  The step sizes are learned through t (N, nb), with the
float16 rounding of the stored scales applied in the forward pass (straight-through), so training
sees exactly the scales the file will hold.  At the end, h is hardened to (V ≥ 0) ∈ {0, 1}: the
codes ⌊W/s₀⌋ + h + z are plain integers and dequantise with our :func:`~.quantizers.dequantize`
to exactly the weights the reconstructed torch model uses.  With rank 0 the rounding is plain
nearest rounding (straight-through) and only the step sizes are learned.

Activations (A8 / A4): a static per-tensor affine quantiser in front of every Linear,
x̂ = s_a (clamp(round(x / s_a) + z_a, 0, 2^b − 1) − z_a), s_a learned LSQ-style (Esser et al.
2020) through the straight-through estimator, z_a fixed from the calibration range.

The training loop that learns these parameters block window by block window is :mod:`.cbq`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .formats import FormatSpec
from .quantizers import QuantizedTensor, _blocks, quantize_int
from .smoothing import attach_input_smoothing, has_input_smoothing, input_smoothing

ZETA, GAMMA = 1.1, -0.1
ACT_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1) (AdaRound eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero exactly when every h ∈ {0, 1} (AdaRound eq. 24)."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class ActQuantizer(nn.Module):
    """Static per-tensor affine activation quantiser with an LSQ-learned step size."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("s0", torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.enabled = False  # until initialised from calibration data

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """MSE-best range among shrunk [min, max] of a sample ``x`` (any shape)."""
        x = x.float().flatten()
        if x.numel() > (1 << 20):
            x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20].to(x.device)]
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        qmax = 2**self.bits - 1
        best = None
        for r in ACT_CLIP_GRID:
            s = max((hi - lo) * r / qmax, 1e-8)
            z = float(min(max(round(-lo * r / s), 0), qmax))
            err = float((((torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s - x) ** 2).mean())
            if best is None or err < best[0]:
                best = (err, s, z)
        self.s0.fill_(best[1])
        self.zero.fill_(best[2])
        self.log_scale.zero_()
        self.enabled = True

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.log_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale()
        q = torch.clamp(_round_ste(x / s) + self.zero, 0, 2**self.bits - 1)
        return (q - self.zero) * s

    def export(self) -> dict:
        """What QuantizeLinear / DequantizeLinear need: float32 scale, integer zero point."""
        return {"bits": self.bits, "scale": float(self.scale().detach().float()),
                "zero_point": int(self.zero), "signed": False}


def _on(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    """``qt``'s codes and block parameters on ``device`` (the same object when already there)."""
    if qt.codes.device == device:
        return qt
    return QuantizedTensor(qt.codes.to(device), qt.scales.to(device), None if qt.zeros is None else qt.zeros.to(device),
                           qt.shape, qt.spec, None if qt.offsets is None else qt.offsets.to(device))


class CBQLinear(nn.Module):
    """A Linear with learnable step sizes and LoRA-Rounding (see the module docstring)."""

    def __init__(self, linear: nn.Linear, spec: FormatSpec, rank: int, act_bits: int = 16,
                 weight: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 hard_forward: bool = True, init: QuantizedTensor | None = None,
                 lowrank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if spec.kind != "int":
            raise ValueError(f"CBQ learns integer formats, not {spec.name}")
        w = (linear.weight if weight is None else weight).detach().float()
        self.spec, self.rank, self.hard_forward = spec, rank, hard_forward
        self.out_features, self.in_features = w.shape
        n, k = w.shape
        start = init if init is not None else quantize_int(w, spec)  # default: RTN, MSE-clipped
        if start.shape != (n, k) or start.spec != spec:
            raise ValueError(f"init codes are {start.spec.name} {start.shape}, the layer needs {spec.name} {(n, k)}")
        start = _on(start, w.device)  # given codes come from the CPU (--device: the weight's device)
        if lowrank is not None:
            lowrank = (lowrank[0].to(w.device), lowrank[1].to(w.device))
        wb = _blocks(w, spec.block)  # (N, nb, B)
        s0 = start.scales.float()
        zero = start.zeros.float() if start.zeros is not None else torch.full_like(s0, 2.0 ** (spec.bits - 1))
        self.register_buffer("wb", wb)
        self.register_buffer("s0", s0)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        x = wb / s0[..., None]
        if init is None:  # AdaRound: base ⌊W/s₀⌋, h(V₀) = the fractional part
            base = torch.floor(x)
            rest = (x - base).clamp(0, 1)
        else:  # start from the given codes c: base = c − 1 where c rounded up, h(V₀) ∈ {0.25, 0.75}
            c = start.codes.float().view_as(wb) - zero[..., None]
            up = (c > x).float()
            base = c - up
            rest = 0.25 + 0.5 * up
        self.register_buffer("base", base)
        self.register_buffer("v0", -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V₀) = rest
        self.log_scale = nn.Parameter(torch.zeros_like(s0))
        if rank > 0:
            # drawn on the CPU from the CPU generator, so every device starts from the same numbers
            self.a1 = nn.Parameter(torch.zeros(n, rank, device=w.device))
            self.a2 = nn.Parameter(torch.randn(rank, wb.shape[1] * wb.shape[2], generator=generator).to(w.device))
        self.act = ActQuantizer(act_bits).to(w.device) if act_bits < 16 else None
        if has_input_smoothing(linear):  # x / s first, then the activation quantiser (forward)
            attach_input_smoothing(self, input_smoothing(linear))
        self.hard = False
        self.fixed_codes = init is not None and rank == 0  # learn the scales of the given codes
        # LQ+CBQ: a frozen low-rank branch L1 L2 in the loop (W ≈ Q + L1 L2; Q learns around it)
        self.register_buffer("l1", None if lowrank is None else lowrank[0].float().contiguous())
        self.register_buffer("l2", None if lowrank is None else lowrank[1].float().contiguous())

    def scale(self) -> torch.Tensor:
        """s = fp16(s₀ e^t): (N, nb), float16-representable values."""
        return _fp16_ste(self.s0 * torch.exp(self.log_scale))

    def rounding(self) -> torch.Tensor:
        """h: (N, nb, B) ∈ [0, 1] (soft) or {0, 1} (hard).  With ``hard_forward`` (default) the
        forward pass uses the hard h and the gradient flows through the soft one
        (straight-through), so training sees the integer weights the file will hold."""
        v = self.v0 + (self.a1 @ self.a2).view_as(self.v0) if self.rank > 0 else self.v0
        hard = (v >= 0).to(v.dtype)
        if self.hard:
            return hard
        soft = rectified_sigmoid(v)
        return soft + (hard - soft).detach() if self.hard_forward else soft

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (N, nb, B) float codes in [0, 2^k − 1], s (N, nb))."""
        s = self.scale()
        qmax = 2**self.spec.bits - 1
        if self.rank > 0 or self.fixed_codes:
            q = self.base + self.rounding() + self.zero[..., None]
        else:
            q = _round_ste(self.wb / s[..., None]) + self.zero[..., None]
        return torch.clamp(q, 0, qmax), s

    def weight_hat(self) -> torch.Tensor:
        """Ŵ: (N, K) float32."""
        q, s = self.codes()
        return ((q - self.zero[..., None]) * s[..., None]).reshape(self.out_features, -1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        y = F.linear(x, self.weight_hat(), self.bias)
        if self.l1 is not None:
            y = y + (x @ self.l2.T) @ self.l1.T
        return y

    def regularizer(self, beta: float) -> tuple[torch.Tensor, int]:
        """(Σ(1 − |2h − 1|^β), number of terms); zero for rank 0."""
        if self.rank == 0:
            return torch.zeros((), device=self.s0.device), 0
        h = self.rounding()
        return rounding_regularizer(h, beta), h.numel()

    @torch.no_grad()
    def to_quantized(self) -> QuantizedTensor:
        """The hard-rounded integer codes in our format (float16-exact scales)."""
        hard, self.hard = self.hard, True
        try:
            q, s = self.codes()
        finally:
            self.hard = hard
        n, k = self.out_features, self.in_features
        codes = q.reshape(n, -1).round()
        if codes.shape[1] > k:
            codes[:, k:] = self.zero.repeat_interleave(self.spec.block, dim=1)[:, k:]
        return QuantizedTensor(codes.to(torch.uint8), s.detach().float().clone(),
                               None if self.spec.symmetric else self.zero.to(torch.uint8), (n, k), self.spec).cpu()
