"""What a decoder graph needs to know about its architecture, read from ``config.json`` alone.

One :class:`DecoderArch` describes every LLaMA-shaped decoder this exporter builds: a pre-norm
stack of RMSNorm → grouped-query attention with rotary positions → RMSNorm → SwiGLU MLP, a final
RMSNorm and a (possibly tied) LM head.  The members of the family differ only in switches:

===========  ==============================================================================
model_type   what differs from LLaMA
===========  ==============================================================================
llama        rope scaling ``llama3`` (Llama 3.1/3.2) or ``linear``, optional q/k/v/o bias
mistral      ``sliding_window``: each query sees at most that many keys
qwen2        bias on q/k/v (``attention_bias`` implied), optional sliding window
qwen3        RMSNorm over each head of q and k (``q_norm``/``k_norm``) before the rotation
===========  ==============================================================================

These are the decoder-only families onnxruntime-genai's builder also emits as
GroupQueryAttention graphs.  Others (Phi-3's fused ``qkv_proj``/``gate_up_proj`` and longrope,
Gemma's scaled embeddings and GeGLU, ...) are refused by name: :func:`arch_of` raises
:class:`~quantseal.errors.Unsupported`.

Rotary embeddings (Su et al., RoFormer, eq. 34): position ``p`` rotates each pair ``(x_j,
x_{j+d/2})`` of a head by ``θ_j p`` with ``θ_j = base^{-2j/d}``; :func:`rope_tables` returns
``cos(p θ_j)`` and ``sin(p θ_j)`` for ``p < max_positions``, ``j < d/2`` — the ``cos_cache`` /
``sin_cache`` inputs of onnxruntime's GroupQueryAttention (``rotary_interleaved = 0``: the
``rotate_half`` layout of transformers' LLaMA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import Unsupported

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderArch:
    """The shape and switches of one decoder (all read from ``config.json``)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    tied: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2, or LLaMA's attention_bias)
    o_bias: bool  # o_proj carries a bias (LLaMA's attention_bias)
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before the rotation
    sliding_window: int | None  # keys older than this many positions are not attended to

    @property
    def scale(self) -> float:
        """The attention logit scale ``1/√d``."""
        return 1.0 / math.sqrt(self.head_dim)


def _rope_scaling(config: dict) -> dict | None:
    rs = config.get("rope_scaling") or None
    if rs is None:
        params = config.get("rope_parameters") or None  # transformers ≥ 5 spells it this way
        if params and params.get("rope_type", "default") != "default":
            rs = params
    if rs is None:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise Unsupported(f"rope scaling {kind!r} is not exported (supported: default, linear, llama3)")
    return dict(rs, rope_type=kind)


def arch_of(config: dict) -> DecoderArch:
    """The :class:`DecoderArch` of a transformers config dict; :class:`Unsupported` (one line,
    naming the architecture) for a model type this exporter does not build."""
    mt = config.get("model_type")
    if mt not in SUPPORTED:
        raise Unsupported(f"decoder architecture {mt!r} is not exported (supported: {', '.join(SUPPORTED)})")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta = config.get("rope_theta")
    if theta is None:
        theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    window = None
    if mt == "mistral":
        window = config.get("sliding_window")
    elif mt in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        if int(config.get("max_window_layers", 0)) < int(config["num_hidden_layers"]):
            raise Unsupported(f"{mt} with sliding window on some layers only (max_window_layers) is not exported")
        window = config.get("sliding_window")
    attention_bias = bool(config.get("attention_bias", False))
    return DecoderArch(
        model_type=mt,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(config),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=None if window is None else int(window),
    )


def inverse_frequencies(arch: DecoderArch) -> np.ndarray:
    """``θ_j = base^{-2j/d}`` (float64, (d/2,)), rescaled as the config's rope scaling says:

    * ``linear``: ``θ_j / factor`` (positions interpolated);
    * ``llama3`` (Llama 3.1): wavelengths ``λ_j = 2π/θ_j`` above ``L/low_freq_factor`` are
      divided by ``factor``, those below ``L/high_freq_factor`` kept, and in between blended with
      ``s = (L/λ_j − low)/(high − low)``: ``θ_j ((1−s)/factor + s)``, where ``L`` is
      ``original_max_position_embeddings``."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = arch.rope_scaling
    if rs is None:
        return inv
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv / factor
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old / low, inv / factor, inv)
    mid = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(mid, blended, out)


def rope_tables(arch: DecoderArch, positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``: float32 ``(positions, head_dim/2)`` tables of ``p·θ_j``."""
    n = arch.max_positions if positions is None else int(positions)
    angles = np.outer(np.arange(n, dtype=np.float64), inverse_frequencies(arch))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def graph_table_bytes(arch: DecoderArch, positions: int | None = None) -> int:
    """Bytes of the float32 ``cos_cache`` and ``sin_cache`` initialisers of the exported graph
    (counted against a whole-file ``--budget-mb``)."""
    n = arch.max_positions if positions is None else int(positions)
    return 2 * n * (arch.head_dim // 2) * 4
