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
phi3         q/k/v stored as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (``fused``);
             ``partial_rotary_factor`` (Phi-4-mini: only the first ``rotary_dim`` features of a
             head rotate); rope scaling ``longrope`` (Phi-3-128k, Phi-3.5, Phi-4-mini);
             ``sliding_window``
===========  ==============================================================================

These are the decoder-only families onnxruntime-genai's builder also emits as
GroupQueryAttention graphs (Phi-3 as its ``Phi3MiniModel`` / ``Phi3MiniLongRoPEModel``).  Others
(Phi-3-small's blocksparse attention, Gemma's scaled embeddings and GeGLU, ...) are refused by
name: :func:`arch_of` raises :class:`~quantseal.errors.Unsupported`.

LongRoPE (Ding et al. 2024, eq. 4; transformers' ``_compute_longrope_parameters``): per-pair
rescale factors ``λ_j`` divide the frequencies, ``θ_j / λ_j``, with the ``short_factor`` set while
the sequence is at most ``original_max_position_embeddings`` long and the ``long_factor`` set
beyond, and cos/sin are multiplied by ``attention_factor`` (default
``√(1 + ln s / ln L)``, ``s = max_positions / L``).  The graph holds both tables and picks one
on the total sequence length, as transformers and onnxruntime-genai's builder do.  A cached
decode that crosses the switch keeps the keys it rotated with the short factors (as
transformers' cached forward and the builder's graph do; transformers' ``generate`` re-runs
the prompt there instead), so only within one regime is a cached step a full recompute.

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

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")


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
    fused: bool = False  # Phi-3: one stored qkv_proj (rows q | k | v) and one gate_up_proj (rows gate | up)
    rotary_dim: int = 0  # features of a head that rotate (partial_rotary_factor · head_dim); 0: all

    @property
    def scale(self) -> float:
        """The attention logit scale ``1/√d``."""
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def rotated(self) -> int:
        """How many leading features of each head the rotary embedding rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def rope_switch(self) -> int | None:
        """LongRoPE's ``original_max_position_embeddings``: a sequence longer than this uses the
        long factors (None: one table serves every length)."""
        rs = self.rope_scaling
        return None if rs is None or rs["rope_type"] != "longrope" else int(rs["original_max_position_embeddings"])


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
    if kind == "su":  # Phi-3's first name for longrope
        kind = "longrope"
    if kind not in ("linear", "llama3", "longrope"):
        raise Unsupported(f"rope scaling {kind!r} is not exported (supported: default, linear, llama3, longrope)")
    rs = dict(rs, rope_type=kind)
    if kind == "longrope":
        original = rs.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if original is None or not rs.get("short_factor") or not rs.get("long_factor"):
            raise Unsupported("rope scaling 'longrope' without short_factor, long_factor and "
                              "original_max_position_embeddings is not exported")
        rs["original_max_position_embeddings"] = int(original)
    return rs


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
    if mt in ("mistral", "phi3"):
        window = config.get("sliding_window")
    elif mt in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        if int(config.get("max_window_layers", 0)) < int(config["num_hidden_layers"]):
            raise Unsupported(f"{mt} with sliding window on some layers only (max_window_layers) is not exported")
        window = config.get("sliding_window")
    attention_bias = bool(config.get("attention_bias", False))
    partial = config.get("partial_rotary_factor")
    if partial is None:
        partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * float(partial)) if float(partial) != 1.0 else 0
    if rotary_dim % 16:  # GroupQueryAttention: cos_cache's width (rotary_dim / 2) is a multiple of 8
        raise Unsupported(f"partial_rotary_factor {partial} gives a rotary dimension of {rotary_dim}, "
                          "not a multiple of 16 (onnxruntime's GroupQueryAttention)")
    rope_scaling = _rope_scaling(config)
    if rope_scaling is not None and rope_scaling["rope_type"] == "longrope":
        half = (rotary_dim or head_dim) // 2
        if mt != "phi3":
            raise Unsupported(f"rope scaling 'longrope' is exported for phi3 only, not {mt!r}")
        if len(rope_scaling["short_factor"]) != half or len(rope_scaling["long_factor"]) != half:
            raise Unsupported(f"longrope factors must have {half} entries (rotary dimension / 2)")
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
        rope_scaling=rope_scaling,
        max_positions=int(config.get("max_position_embeddings", 2048)),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=None if window is None else int(window),
        fused=mt == "phi3",
        rotary_dim=rotary_dim,
    )


def inverse_frequencies(arch: DecoderArch, long: bool = False) -> np.ndarray:
    """``θ_j = base^{-2j/d}`` (float64, (d/2,), ``d`` the rotary dimension), rescaled as the
    config's rope scaling says:

    * ``linear``: ``θ_j / factor`` (positions interpolated);
    * ``longrope``: ``θ_j / λ_j`` with the ``short_factor`` λ, or the ``long_factor`` one when
      ``long`` (a sequence longer than ``original_max_position_embeddings``);
    * ``llama3`` (Llama 3.1): wavelengths ``λ_j = 2π/θ_j`` above ``L/low_freq_factor`` are
      divided by ``factor``, those below ``L/high_freq_factor`` kept, and in between blended with
      ``s = (L/λ_j − low)/(high − low)``: ``θ_j ((1−s)/factor + s)``, where ``L`` is
      ``original_max_position_embeddings``."""
    d = arch.rotated
    inv = 1.0 / (arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = arch.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "longrope":
        return inv / np.asarray(rs["long_factor" if long else "short_factor"], dtype=np.float64)
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


def attention_factor(arch: DecoderArch) -> float:
    """LongRoPE's magnitude scale of cos/sin (1 for every other rope): the config's
    ``attention_factor``, else ``√(1 + ln s / ln L)`` for ``s = max_positions / L > 1``."""
    rs = arch.rope_scaling
    if rs is None or rs["rope_type"] != "longrope":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    original = float(rs["original_max_position_embeddings"])
    s = float(rs.get("factor") or arch.max_positions / original)
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))


def rope_tables(arch: DecoderArch, positions: int | None = None, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``: float32 ``(positions, rotary_dim/2)`` tables of ``p·θ_j`` (times
    :func:`attention_factor`); ``long`` selects LongRoPE's long factors."""
    n = arch.max_positions if positions is None else int(positions)
    angles = np.outer(np.arange(n, dtype=np.float64), inverse_frequencies(arch, long))
    m = attention_factor(arch)
    return (m * np.cos(angles)).astype(np.float32), (m * np.sin(angles)).astype(np.float32)


def table_positions(arch: DecoderArch, positions: int | None = None) -> list[int]:
    """Rows of each cos/sin table pair the graph holds: ``[n]``, or for LongRoPE ``[L, n]`` (the
    short table up to ``original_max_position_embeddings = L``, the long one up to ``n``)."""
    n = arch.max_positions if positions is None else int(positions)
    return [n] if arch.rope_switch is None else [min(arch.rope_switch, n), n]


def graph_table_bytes(arch: DecoderArch, positions: int | None = None) -> int:
    """Bytes of the float32 ``cos_cache`` and ``sin_cache`` initialisers of the exported graph
    (counted against a whole-file ``--budget-mb``)."""
    return sum(2 * n * (arch.rotated // 2) * 4 for n in table_positions(arch, positions))
