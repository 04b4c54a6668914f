"""What a candidate costs per decoded token on the runtime that will run it.

A decoder on a device generates one token at a time: every matrix is a matrix–vector product
(batch 1), and a model's weights (86 MB for SmolLM2-135M at 4 bits) never stay in the caches, so
each token streams them from memory through the storage format's kernel.  On onnxruntime's CPU
provider (1.32) the kernels differ by far more than their bytes suggest:

* ``MatMulNBits`` at ``accuracy_level`` 4 (int8 activations) scales each block once, so its cost
  falls with the block: int4 at b128 runs ~0.8× b32; int8 costs ~1.5× int4 at the same block
  (its bytes).  At level 0 an 8-bit matrix is ~80× slower (it dequantises the whole matrix per call);
* ``MatMulBnb4`` (nf4) runs ~20× slower than int4 for one token (so a decoder's default formats
  leave nf4 out: :data:`DECODER_FAMILIES`);
* a float matrix is a float32 ``MatMul`` (an fp16 file's Cast is folded at load), 2–5× int4;
* ``int4f`` (float block offsets) runs as MatMulNBits without zero points plus a block-sum
  correction ``S(x)·M'ᵀ`` (Reshape + ReduceSum + a float32 MatMul of 1/B of the weights + Add):
  1.16–1.28× int4 at SmolLM2's shapes (a fixed ~3–7 µs per matrix);
* a low-rank branch adds two float32 products of ``r·(N + K)`` weights.

The tables hold µs per million weights for one token, measured inside a whole decoder on this
project's machine (``benchmarks/decode_cost_in_model.py``): one entry for a Linear's shape and
one for a tied LM head's (``N ≥`` :data:`HEAD_MIN_N`).
The model is ``cost(f, r, N, K) = u(f, N) · N·K/10⁶ + u(fp32) · r·(N + K)/10⁶``.  The ILP
(:mod:`.budget`) can bound the sum over the planned matrices (``--max-decode-ms``), so a decoder's
plan is chosen with its decode speed in view, not only its bytes and error.
"""

from __future__ import annotations

from .formats import Candidate

# a product this wide is a vocabulary: a tied LM head (SmolLM2 49152, Llama-3 128256 rows)
HEAD_MIN_N = 8192

# Measured inside SmolLM2's int4 export (benchmarks/decode_cost_in_model.py: the builder's model with
# its 150 Linears, or its head, re-quantised to each format, one decode step of every variant timed
# in turn in one process; results/decode_cost_in_model.json) and in onnxruntime's per-node profiles
# of whole quantseal plans (benchmarks/README.md, "Decode cost inside a model"), rounded; onnxruntime
# 1.32 CPU, accuracy level 4, 1 thread.  (format, block) → µs per 10⁶ weights per token as
# (Linear, LM head).  The single-op numbers of ``decode_cost.py --cold`` rank int8 with int4; in a
# model int8 costs ~1.5x int4 (its bytes).  int4 at b16 and int2 are scaled from the int4_b32 entry
# by their single-op ratios (results/decode_cost_cold.json, decode_cost_cold_head.json); int3 is
# stored in 4-bit slots and runs the 4-bit kernel; symmetric formats run the same kernel.
ACC4_US_PER_MPARAM = {
    ("int2", 32): (112.0, 60.0),
    ("int4", 16): (79.0, 140.0), ("int4", 32): (60.0, 58.0), ("int4", 64): (55.0, 52.0), ("int4", 128): (47.0, 42.0),
    ("int8", 32): (100.0, 95.0), ("int8", 64): (88.0, 80.0), ("int8", 128): (78.0, 70.0),
}
# float32 MatMul (fp16 files are cast at load; single-op ratio to int4_b32 2.2x / 4.6x); nf4's
# MatMulBnb4 (~22x int4 per token, level-independent); int4f: int4's MatMulNBits plus the block-sum
# correction, 1.3x (results/decode_cost_int4f.json)
FLOAT_US_PER_MPARAM = (131.0, 252.0)
NF4_US_PER_MPARAM = (1350.0, 1350.0)
INT4F_FACTOR = 1.3
# accuracy level 0 (float32 compute; benchmarks/results/decode_cost.json, one class)
US_PER_MPARAM_ACC0 = {"int2": 3704.0, "int3": 86.0, "int4": 86.0, "int8": 2170.0, "nf4": 608.0, "fp16": 59.0,
                      "fp32": 59.0, "int4f": 96.0}
# nf4 runs ~20x slower than int4 per decoded token: a decoder's default candidate families leave it out
DECODER_FAMILIES = ("int2", "int4", "int8", "fp16")


def _family(c: Candidate) -> str:
    f = c.fmt
    if f.kind == "intf":
        return f"int{f.bits}f"
    return f"fp{f.bits}" if f.kind == "fp" else f"{f.kind}{f.bits}"


def _acc4_us(c: Candidate, head: bool) -> float:
    f = c.fmt
    if f.kind == "fp":
        return FLOAT_US_PER_MPARAM[head]
    if f.kind == "nf":
        return NF4_US_PER_MPARAM[head]
    bits = 4 if f.bits == 3 else f.bits
    blocks = sorted(b for fam, b in ACC4_US_PER_MPARAM if fam == f"int{bits}")
    block = min(blocks, key=lambda b: abs(b - f.block))  # an unmeasured block: the nearest measured one
    us = ACC4_US_PER_MPARAM[f"int{bits}", block][head]
    return us * INT4F_FACTOR if f.kind == "intf" else us


def candidate_cost_us(c: Candidate, n: int, k: int, accuracy_level: int = 4) -> float:
    """Estimated µs per decoded token of ``y = x·Wᵀ`` for ``W: (n, k)`` stored as ``c``."""
    head = n >= HEAD_MIN_N
    per = _acc4_us(c, head) if accuracy_level == 4 else US_PER_MPARAM_ACC0[_family(c)]
    return per * n * k / 1e6 + FLOAT_US_PER_MPARAM[0] * c.rank * (n + k) / 1e6
