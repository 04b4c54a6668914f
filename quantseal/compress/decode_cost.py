"""What a candidate costs per decoded token on the runtime that will run it.

A decoder on a device generates one token at a time: every matrix is a matrix–vector product
(batch 1), memory- and kernel-bound, and the storage format decides the kernel.  On onnxruntime's
CPU provider (1.32) the kernels differ by far more than their bytes suggest:

* ``MatMulNBits`` at ``accuracy_level`` 4 (int8 activations) runs 2, 4 and 8 bits at about the same
  speed; at level 0 an 8-bit matrix is ~80× slower (it dequantises the whole matrix per call);
* ``MatMulBnb4`` (nf4) runs ~20× slower than int4 for one token (so a decoder's default formats
  leave nf4 out: :data:`DECODER_FAMILIES`);
* a float matrix is a float32 ``MatMul`` (an fp16 file's Cast is folded at load), ~2× int4;
* ``int4f`` (float block offsets) runs as MatMulNBits without zero points plus a block-sum
  correction ``S(x)·M'ᵀ`` (Reshape + ReduceSum + a float32 MatMul of 1/B of the weights + Add):
  1.16–1.28× int4 at SmolLM2's shapes (a fixed ~3–7 µs per matrix);
* a low-rank branch adds two float32 products of ``r·(N + K)`` weights.

:data:`US_PER_MPARAM` holds CPU µs per million weights for one token, one thread, measured by
``benchmarks/decode_cost.py`` on this project's machine (its JSON keeps every shape); the model is
``cost(f, r, N, K) = US_PER_MPARAM[f] · N·K/10⁶ + US_PER_MPARAM["fp32"] · r·(N + K)/10⁶``.
The ILP (:mod:`.budget`) can bound the sum over the planned matrices (``--max-decode-ms``), so a
decoder's plan is chosen with its decode speed in view, not only its bytes and error.
"""

from __future__ import annotations

from .formats import Candidate

# benchmarks/results/decode_cost.json (median over (K, N) ∈ {(576, 1536), (1536, 576), (2048, 2048)},
# onnxruntime 1.32 CPU, 1 thread, CPU time under a load of ~11 on 2 cores): format family → µs per
# 10⁶ weights per token.  int3 is stored in 4-bit slots and runs the 4-bit kernel.
# int4f: benchmarks/results/decode_cost_int4f.json (SmolLM2's four shapes, interleaved: int4_b32 29.9 / 85.1,
# int4f_b32 37.1 / 94.6 µs per M weights at accuracy level 4 / 0, i.e. 1.24x / 1.11x), scaled to int4 here.
US_PER_MPARAM_ACC4 = {"int2": 47.0, "int3": 28.0, "int4": 28.0, "int8": 27.0, "nf4": 608.0, "fp16": 59.0,
                      "fp32": 59.0, "int4f": 35.0}
US_PER_MPARAM_ACC0 = {"int2": 3704.0, "int3": 86.0, "int4": 86.0, "int8": 2170.0, "nf4": 608.0, "fp16": 59.0,
                      "fp32": 59.0, "int4f": 96.0}
# nf4 runs ~20x slower than int4 per decoded token: a decoder's default candidate families leave it out
DECODER_FAMILIES = ("int2", "int4", "int8", "fp16")

def _family(c: Candidate) -> str:
    f = c.fmt
    if f.kind == "intf":
        return f"int{f.bits}f"
    return f"fp{f.bits}" if f.kind == "fp" else f"{f.kind}{f.bits}"


def candidate_cost_us(c: Candidate, n: int, k: int, accuracy_level: int = 4) -> float:
    """Estimated CPU µs per decoded token of ``y = x·Wᵀ`` for ``W: (n, k)`` stored as ``c``."""
    table = US_PER_MPARAM_ACC4 if accuracy_level == 4 else US_PER_MPARAM_ACC0
    main = table[_family(c)] * n * k / 1e6
    return main + table["fp32"] * c.rank * (n + k) / 1e6
