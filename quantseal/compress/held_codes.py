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
* :class:`CodesLinear` — ``y = x Ŵᵀ + b`` computed ``chunk_bytes`` of dequantised rows of ``Ŵ``
  at a time (``x: (..., K)`` → ``(..., N)``): the float32 of one row chunk alive, never the whole
  matrix;
* :class:`PendingLinear` — a Linear whose weights are not read yet: it returns zeros of the
  output's shape.  GPTQ's Hessian passes (:func:`~.gptq._input_group`) stop at the first Linear
  after the group whose input they gather, so a pending Linear's output never reaches a recorded
  input.

Holding a block this way changes no number: :class:`CodesLinear` with one chunk is
``F.linear(x, dequantize(qt), b)`` exactly as a Linear holding the dequantised weight computes
it, and both the streamed and the in-memory GPTQ run the block through it.
"""

from __future__ import annotations

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


class CodesLinear(nn.Module):
    """A solved Linear held as :class:`PackedCodes`: ``x: (..., K)`` → ``(..., N)``, dequantised
    ``chunk_bytes`` of float32 rows at a time (in ``dtype``, the Linear's own).  ``original``:
    the Linear it stands in for (put back by :func:`~.gptq.release_codes`)."""

    def __init__(self, codes: PackedCodes, bias: torch.Tensor | None, dtype: torch.dtype, original: nn.Module,
                 chunk_bytes: int = LINEAR_CHUNK_BYTES):
        super().__init__()
        self.codes, self.bias, self.dtype = codes, bias, dtype
        self.out_features, self.in_features = codes.shape
        self.chunk_bytes = chunk_bytes
        self.__dict__["original"] = original  # not a submodule: its (meta or float) weights are not ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.codes.shape
        per = chunk_rows(n, k, self.chunk_bytes)
        if per >= n:  # one chunk: exactly a Linear holding the dequantised weight
            return F.linear(x, dequantize(self.codes.rows(0, n)).to(self.dtype), self.bias)
        out = x.new_empty(*x.shape[:-1], n)
        for r0 in range(0, n, per):
            r1 = min(r0 + per, n)
            w = dequantize(self.codes.rows(r0, r1)).to(self.dtype)
            out[..., r0:r1] = F.linear(x, w, None if self.bias is None else self.bias[r0:r1])
            del w
        return out


class PendingLinear(nn.Module):
    """A Linear not read yet (see the module notes): ``(..., K)`` → zeros ``(..., N)``."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = original.out_features, original.in_features
        self.__dict__["original"] = original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)
