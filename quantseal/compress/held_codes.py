"""A block's Linears during GPTQ's sequential pass, without a float32 copy of the block (issue #12).

GPTQ (Frantar et al. 2023, §4) quantises a block's Linears in order, each on inputs produced by
the already-quantised Linears before it, and maps the block's inputs to the next block's through
the quantised weights.  Holding those weights in float32 costs 4 bytes per weight of the block
(176 MB at 1B width); here a solved Linear is held as its codes instead:

* :class:`PackedCodes` — one matrix's integer codes packed in MatMulNBits' layout (``bits / 8``
  bytes per weight), its float16 scales (exact: GPTQ's scales lie on the float16 grid), uint8 zero
  points or float16 offsets; :meth:`PackedCodes.rows` gives any row range back as a
  :class:`~.quantizers.QuantizedTensor`, so ``dequantize(p.rows(0, N))`` is bit for bit the
  ``dequantize`` of the solver's result;
* :func:`hold_codes` — the Linear (kept in place, with its pre-hooks and buffers) computes
  ``y = x Ŵᵀ + b`` ``chunk_bytes`` of dequantised rows of ``Ŵ`` at a time (``x: (..., K)`` →
  ``(..., N)``, :func:`codes_forward`): the float32 of one row chunk alive, never the whole matrix;
* :func:`hold_pending` — a Linear whose weights are not read yet returns zeros of the output's
  shape.  GPTQ's Hessian passes (:func:`~.gptq._input_group`) stop at the first Linear
  after the group whose input they gather, so a pending Linear's output never reaches a recorded
  input.

Holding a block this way changes no number: :func:`codes_forward` with one chunk is
``F.linear(x, dequantize(qt), b)`` exactly as a Linear holding the dequantised weight computes
it, and both the streamed and the in-memory GPTQ run the block through it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .formats import FormatSpec
from .packing import pack_weight
from .quantizers import QuantizedTensor, dequantize

LINEAR_CHUNK_BYTES = 8 << 20  # float32 rows of one matrix alive at a time (solve and forward)


def chunk_rows(rows: int, columns: int, chunk_bytes: int = LINEAR_CHUNK_BYTES) -> int:
    """Rows of a ``(rows, columns)`` float32 matrix per chunk of about ``chunk_bytes`` (≥ 1)."""
    return max(1, min(rows, chunk_bytes // max(1, 4 * columns)))


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`~.packing.unpack_weight` in uint8 throughout (no int32 temporaries):
    ``(n, nb, bytes)`` → codes ``(n, nb · bytes · 8 / bits)``."""
    if bits == 8:
        return packed.reshape(packed.shape[0], -1)
    per, mask = 8 // bits, 2**bits - 1
    parts = [packed & mask] + [(packed >> (j * bits)) & mask for j in range(1, per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


@dataclass
class PackedCodes:
    """One matrix's GPTQ result as stored (see the module notes).

    qweight: uint8 (N, nb, B·bits/8); scales: float16 (N, nb); zeros: uint8 (N, nb) or None;
    offsets: float16 (N, nb) or None (``int4f``); shape: (N, K)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    offsets: torch.Tensor | None
    shape: tuple[int, int]
    spec: FormatSpec

    @classmethod
    def empty(cls, n: int, k: int, spec: FormatSpec, device=None) -> "PackedCodes":
        nb = -(-k // spec.block)
        bits = spec.stored_bits
        zeros = torch.empty(n, nb, dtype=torch.uint8, device=device) if spec.kind == "int" and not spec.symmetric \
            else None
        offsets = torch.empty(n, nb, dtype=torch.float16, device=device) if spec.kind == "intf" else None
        return cls(torch.empty(n, nb, spec.block * bits // 8, dtype=torch.uint8, device=device),
                   torch.empty(n, nb, dtype=torch.float16, device=device), zeros, offsets, (n, k), spec)

    def put(self, r0: int, qt: QuantizedTensor) -> None:
        """Store the solver's result for rows ``r0 : r0 + qt.shape[0]``."""
        r1 = r0 + qt.shape[0]
        bits = self.spec.stored_bits
        self.qweight[r0:r1] = pack_weight(qt.codes, bits, self.spec.block)
        half = qt.scales.to(torch.float16)
        if not torch.equal(half.float(), qt.scales):  # GPTQ's scales are on the float16 grid
            raise ValueError("scales not exactly representable in float16")
        self.scales[r0:r1] = half
        if self.zeros is not None:
            self.zeros[r0:r1] = qt.zeros
        if self.offsets is not None:
            self.offsets[r0:r1] = qt.offsets.to(torch.float16)

    def rows(self, r0: int, r1: int) -> QuantizedTensor:
        """Rows ``r0:r1`` as the solver returned them (unpacked codes, float32 scales)."""
        return QuantizedTensor(_unpack(self.qweight[r0:r1], self.spec.stored_bits), self.scales[r0:r1].float(),
                               None if self.zeros is None else self.zeros[r0:r1], (r1 - r0, self.shape[1]),
                               self.spec, None if self.offsets is None else self.offsets[r0:r1].float())

    def quantized(self) -> QuantizedTensor:
        return self.rows(0, self.shape[0])

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.zeros, self.offsets]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def codes_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A held Linear's forward (:func:`hold_codes`): ``x: (..., K)`` → ``(..., N)``, its codes
    dequantised ``chunk_bytes`` of float32 rows at a time (in the Linear's own dtype)."""
    codes, dtype, chunk_bytes = layer.__dict__["held"]
    n, k = codes.shape
    bias = layer.bias
    per = chunk_rows(n, k, chunk_bytes)
    if per >= n:  # one chunk: exactly a Linear holding the dequantised weight
        return F.linear(x, dequantize(codes.rows(0, n)).to(dtype), bias)
    out = x.new_empty(*x.shape[:-1], n)
    for r0 in range(0, n, per):
        r1 = min(r0 + per, n)
        w = dequantize(codes.rows(r0, r1)).to(dtype)
        out[..., r0:r1] = F.linear(x, w, None if bias is None else bias[r0:r1])
        del w
    return out


def pending_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear not read yet (see the module notes): ``(..., K)`` → zeros ``(..., N)``."""
    return x.new_zeros(*x.shape[:-1], layer.out_features)


def hold_codes(layer: nn.Linear, codes: PackedCodes, dtype: torch.dtype,
               chunk_bytes: int = LINEAR_CHUNK_BYTES) -> None:
    """Make ``layer`` compute through ``codes`` (:func:`codes_forward`) instead of its weight,
    which the caller frees or leaves unread.  The module stays in place, so its forward pre-hooks
    (an input smoothing ``x / s``: :mod:`.smoothing`) and buffers still apply."""
    layer.__dict__["held"] = (codes, dtype, chunk_bytes)
    layer.forward = functools.partial(codes_forward, layer)


def hold_pending(layer: nn.Linear) -> None:
    """Make ``layer`` return zeros (:func:`pending_forward`) until its codes are held."""
    layer.__dict__.pop("held", None)
    layer.forward = functools.partial(pending_forward, layer)


def held(layer: nn.Module) -> PackedCodes | None:
    """The codes ``layer`` computes through, or None (pending, or a plain Linear)."""
    h = layer.__dict__.get("held")
    return None if h is None else h[0]


def unhold(layer: nn.Linear, dequantised: bool) -> None:
    """``layer``'s own forward back; ``dequantised``: its weight becomes the held codes'
    dequantised weights (an in-memory model), else it stays as it is (a streamed block's meta
    weight)."""
    h = layer.__dict__.pop("held", None)
    if "forward" in layer.__dict__:
        del layer.forward
    if dequantised and h is not None:
        codes, dtype, _ = h
        layer.weight.data = layer.weight.data.new_empty(0)  # the float weights: freed first
        layer.weight.data = dequantize(codes.quantized()).to(dtype)
