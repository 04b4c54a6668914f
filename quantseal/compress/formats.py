"""Storage formats the budget ILP chooses among, each with its exact stored byte count.

A format says how one weight matrix ``W: (N, K)`` (out, in) is stored in the exported file:

* ``int{k}_b{B}``  affine (asymmetric) integer codes, k bits, blocks of B along K; per block one
  float16 scale and one k-bit zero point.  onnxruntime op: ``MatMulNBits`` (com.microsoft).
* ``int{k}s_b{B}`` symmetric integer codes: float16 scale only, the zero point is implicit
  (``2^(k-1)``, MatMulNBits' default).
* ``int4f_b{B}``   4-bit codes with a *float* offset: ``w = s·q + m``, q ∈ 0..15, one float16 scale s
  and one float16 offset m per block (llama.cpp's Q4_1; HQQ's float zero point).  Stored as
  ``qweight`` (MatMulNBits layout), ``scales`` and ``offsets`` (both float16 [N, nb]): 4 + 32/B bits
  per weight.  onnxruntime runs it as ``MatMulNBits`` without zero points (z = 8) plus a block-sum
  correction, ``y = Σ_b s_b Σ_{i∈b} x_i (q_i − 8) + Σ_b (m_b + 8 s_b) Σ_{i∈b} x_i``
  (:mod:`quantseal.export.lowbit`).
* ``nf4_b{B}``     4-bit NormalFloat (QLoRA), one float16 absmax per block.  op: ``MatMulBnb4``.
* ``fp16`` / ``fp32`` kept in floating point.  op: ``MatMul``.

Codes are padded to whole blocks, exactly as MatMulNBits stores them
(``B: uint8 [N, ceil(K/B), B*k/8]``); packed zero points take ``[N, ceil(n_blocks*k/8)]`` bytes.
Every byte counted here is a byte written by :mod:`quantseal.checkpoint` and by the exporter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import BadInput

INT_BITS = (2, 3, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
SCALE_BYTES = 2  # float16 scales in the file, cast to the compute type in the graph
FACTOR_BYTES = 2  # float16 low-rank factors L1, L2

OFFSET_BYTES = 2  # float16 block offsets of int4f
_NAME = re.compile(r"^(?:(int)(\d)(s?)_b(\d+)|(nf)(4)_b(\d+)|fp(16|32)|int(4)f_b(\d+))$")


@dataclass(frozen=True, order=True)
class FormatSpec:
    """One storage format.  ``kind`` is ``"int"``, ``"intf"`` (float offsets), ``"nf"`` or ``"fp"``."""

    kind: str
    bits: int
    block: int = 0
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.kind == "int":
            if self.bits not in INT_BITS:
                raise BadInput(f"integer formats take bits in {INT_BITS}, not {self.bits}")
            if self.block not in BLOCK_SIZES:
                raise BadInput(f"block size must be one of {BLOCK_SIZES}, not {self.block}")
            if self.bits == 3 and self.symmetric:
                raise BadInput("int3 is stored in 4-bit slots and needs explicit zero points: use int3_bB")
        elif self.kind == "intf":
            if self.bits != 4 or self.block not in BLOCK_SIZES or self.symmetric:
                raise BadInput(f"float-offset formats are int4f with a block in {BLOCK_SIZES}")
        elif self.kind == "nf":
            if self.bits != 4 or self.block not in BLOCK_SIZES:
                raise BadInput(f"NormalFloat is nf4 with a block in {BLOCK_SIZES}")
            if self.symmetric:
                raise BadInput("nf4 has no symmetric variant")
        elif self.kind == "fp":
            if self.bits not in (16, 32) or self.block or self.symmetric:
                raise BadInput("floating formats are fp16 or fp32")
        else:
            raise BadInput(f"unknown format kind {self.kind!r}")

    @property
    def name(self) -> str:
        if self.kind == "fp":
            return f"fp{self.bits}"
        if self.kind == "intf":
            return f"int{self.bits}f_b{self.block}"
        sym = "s" if self.symmetric else ""
        return f"{self.kind}{self.bits}{sym}_b{self.block}"

    @classmethod
    def parse(cls, name: str) -> "FormatSpec":
        m = _NAME.match(name.strip().lower())
        if not m:
            raise BadInput(f"unknown format {name!r} (expected e.g. int4_b32, int4s_b64, int4f_b32, nf4_b64, fp16)")
        if m.group(1):
            return cls("int", int(m.group(2)), int(m.group(4)), bool(m.group(3)))
        if m.group(5):
            return cls("nf", 4, int(m.group(7)))
        if m.group(9):
            return cls("intf", 4, int(m.group(10)))
        return cls("fp", int(m.group(8)))

    @property
    def stored_bits(self) -> int:
        """Bits per code as stored in onnxruntime: 3-bit codes live in 4-bit slots."""
        return 4 if (self.kind == "int" and self.bits == 3) else self.bits

    @property
    def onnx_op(self) -> str:
        return {"int": "MatMulNBits", "intf": "MatMulNBits", "nf": "MatMulBnb4", "fp": "MatMul"}[self.kind]

    def n_blocks(self, k: int) -> int:
        return math.ceil(k / self.block) if self.block else 1

    def stored_bytes(self, n: int, k: int) -> int:
        """Exact bytes of codes + scales + zero points for ``W: (n, k)``."""
        if self.kind == "fp":
            return n * k * self.bits // 8
        nb = self.n_blocks(k)
        codes = n * nb * self.block * self.stored_bits // 8
        scales = n * nb * SCALE_BYTES
        zeros = 0
        if self.kind == "int" and not self.symmetric:
            zeros = n * math.ceil(nb * self.stored_bits / 8)
        elif self.kind == "intf":
            zeros = n * nb * OFFSET_BYTES
        return codes + scales + zeros


@dataclass(frozen=True, order=True)
class Candidate:
    """A (format, rank) choice for one matrix: W ≈ dequant(Q) + L1 L2 with L1: (N, r), L2: (r, K)."""

    fmt: FormatSpec
    rank: int = 0

    @property
    def name(self) -> str:
        return f"{self.fmt.name}+r{self.rank}" if self.rank else self.fmt.name

    def stored_bytes(self, n: int, k: int) -> int:
        return self.fmt.stored_bytes(n, k) + self.rank * (n + k) * FACTOR_BYTES


# What a family name on the command line (``--formats int2,int4,...``) expands to.
FAMILY_BLOCKS = {
    "int2": (16, 32, 64),
    "int3": (32, 64, 128),
    "int4": (32, 64, 128),
    "int8": (64, 128),
    "nf4": (64,),
    "int4f": (32, 64, 128),
}
DEFAULT_FAMILIES = ("int2", "int4", "int8", "nf4", "fp16")


def expand_families(families: str | tuple[str, ...] | list[str]) -> list[FormatSpec]:
    """``"int4,nf4"`` → [int4_b32, int4_b64, int4_b128, nf4_b64]; exact names pass through."""
    if isinstance(families, str):
        families = [f for f in families.split(",") if f.strip()]
    out: list[FormatSpec] = []
    for fam in families:
        fam = fam.strip().lower()
        if fam in FAMILY_BLOCKS:
            kind = "nf" if fam.startswith("nf") else "intf" if fam.endswith("f") else "int"
            out += [FormatSpec(kind, 4 if kind == "intf" else int(fam[-1]), b) for b in FAMILY_BLOCKS[fam]]
        else:
            out.append(FormatSpec.parse(fam))
    if not out:
        raise BadInput("no formats given")
    return sorted(set(out))


def max_useful_rank(n: int, k: int, bits_cap: float = 2.0) -> int:
    """Largest rank whose float16 factors cost at most ``bits_cap`` extra bits per weight.

    A rank that costs more than that buys less than moving the whole matrix up one format
    level, so the ILP would never pick it; leaving it out saves its decomposition."""
    return int(bits_cap * n * k / (8 * FACTOR_BYTES * (n + k)))
