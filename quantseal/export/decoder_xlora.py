"""X-LoRA as a routed decoder graph (issue #13 §2): two passes, a classifier, per-expert branches.

The graph of :mod:`.decoder_graph` built twice over the same stored tensors (each initialiser
once; :class:`SharedBuilder`), as peft's ``XLoraModel`` computes (:mod:`.adapters.xlora`):

1. the *scaling pass*: the base model (``scaling_pass_value = 0`` makes every expert term zero;
   otherwise each adapted Linear adds the static mix ``d · (x · Aᵀ) · Bᵀ``, d from
   :mod:`.adapters.xlora`), with its own KV cache ``scaling_past.{i}.key/value`` → ``scaling_present.{i}.key/value``, to
   the final RMSNorm: h (B, T, H) — transformers' ``hidden_states[-1]``;
2. the classifier: ``MatMul + Add`` per Linear, ReLU between; logits (B, T, C) or (B, T, L·C) →
   Reshape (B, T, L, C) → ``Softmax(logits / τ)``; per adapted Linear ℓ its slice s_ℓ (B, T, C),
   top-k masked (``s ≥`` the k-th largest) and renormalised over the kept experts when asked;
3. the *routed pass*: every adapted Linear adds ``((x · Aᵀ) ⊙ (s_ℓ · E)) · Bᵀ``, where ``A``
   (Σr, K) and ``B`` (N, Σr) stack the experts' factors (B already scaled by the LoRA scale and
   ``global_scaling_weight``) and ``E`` (C, Σr) repeats expert k's scaling over its r_k columns:
   ``Σ_k s_k · B_k A_k x`` in three MatMuls.  Its cache is the usual ``past_key_values``.

Inputs: ``input_ids``, ``attention_mask``, both caches; outputs ``logits`` and both presents.
onnxruntime-genai does not know the second cache, so no ``genai_config.json`` is written;
quantseal's runtime reads the extra cache from the ``quantseal.extra_caches`` metadata.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .decoder_arch import rope_tables
from .decoder_graph import DecoderGraph
from .graph import GraphBuilder
from .lowbit import Nodes

SCALING_PAST = "scaling_past"
SCALING_PRESENT = "scaling_present"


class SharedBuilder(GraphBuilder):
    """A :class:`GraphBuilder` on which a second pass over the same matrices reuses their
    initialisers: an initialiser added again under the same name is the same tensor (skipped),
    and in ``suffix`` mode the intermediate values a rewrite names after its matrix
    (``<matrix>.y_q``, not scope-named ``/…``) get the suffix, so two passes do not collide."""

    suffix = ""

    def init(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            return name
        return super().init(name, array)

    def extend(self, g: Nodes) -> None:
        if self.suffix:
            own = {o for n in g.nodes for o in n.output if o and not o.startswith("/")}
            for n in g.nodes:
                n.name = n.name + self.suffix
                for i, x in enumerate(n.input):
                    if x in own:
                        n.input[i] = x + self.suffix
                for i, o in enumerate(n.output):
                    if o in own:
                        n.output[i] = o + self.suffix
        for t in g.initializers:
            if t.name not in self._names:
                self._names.add(t.name)
                self.initializers.append(t)
        self.nodes.extend(g.nodes)


class XLoraDecoderGraph(DecoderGraph):
    """:class:`DecoderGraph` with the X-LoRA passes (module docstring); ``xlora``: a read
    :class:`~quantseal.export.adapters.xlora.XLora`."""

    def __init__(self, arch, matrices, plain, xlora, accuracy_level: int = 0, activations=None,
                 max_positions: int | None = None, dtype=np.float32):
        super().__init__(arch, matrices, plain, accuracy_level, activations, max_positions, dtype)
        self.g = SharedBuilder(self.dtype)
        self.xlora = xlora
        self.routed = False
        self.scalings: str | None = None

    # ------------------------------------------------------------------ per-Linear
    def _owned(self, m, *parts) -> None:
        if self.routed:  # each matrix's bytes once
            super()._owned(m, *parts)

    def linear(self, name: str, x: str, y: str | None = None) -> str:
        xl = self.xlora
        if name not in xl.factors or not (self.routed or xl.scaling_pass):
            return super().linear(name, x, y)
        base = super().linear(name, x)
        with self.g.scope(name.rsplit(".", 1)[-1] + "_xlora"):
            branch = self._experts(name, x) if self.routed else self._scaling_pass_mix(name, x)
            return self.g.op("Add", [base, branch], [y] if y is not None else 1)

    def _scaling_pass_mix(self, name: str, x: str) -> str:
        """``d · Σ_k B_k A_k x`` (B scaled as in the routed pass): the scaling pass's dummy
        scalings, equal for every expert (:mod:`.adapters.xlora`)."""
        g = self.g
        at, bt, _ = self._factors(name)
        d = g.const(f"scaling_pass_{self.xlora.scaling_pass!r}", np.array(self.xlora.scaling_pass, self.dtype))
        return g.op("Mul", [g.op("MatMul", [g.op("MatMul", [x, at]), bt]), d])

    def _factors(self, name: str) -> tuple[str, str, str]:
        """The initialisers ``Aᵀ`` (K, Σr), ``Bᵀ`` (Σr, N) (the compute dtype) and ``E`` (C, Σr)
        (float32, the routing's type) of an adapted Linear, shared by both passes."""
        g, parts = self.g, self.xlora.factors[name]
        n, k = self._matrix(name).shape
        bs = [p[0] if p is not None else np.zeros((n, 0)) for p in parts]
        as_ = [p[1] if p is not None else np.zeros((0, k)) for p in parts]
        expand = np.zeros((len(parts), sum(b.shape[1] for b in bs)))
        col = 0
        for j, b in enumerate(bs):
            expand[j, col:col + b.shape[1]] = 1.0
            col += b.shape[1]
        at = g.init(f"{name}.xlora.AT", np.concatenate(as_, 0).T.astype(self.dtype))
        bt = g.init(f"{name}.xlora.BT", np.concatenate(bs, 1).T.astype(self.dtype))
        return at, bt, g.init(f"{name}.xlora.E", expand.astype(np.float32))

    def qkv(self, attn: str, x: str):
        if any(f"{attn}.{p}_proj" in self.xlora.factors for p in "qkv"):
            return tuple(self.linear(f"{attn}.{p}_proj", x) for p in "qkv")  # experts: no packing
        return super().qkv(attn, x)

    def _experts(self, name: str, x: str) -> str:
        """``Σ_k s_k · B_k A_k x`` for the adapted Linear ``name`` (three MatMuls)."""
        g, xl = self.g, self.xlora
        at, bt, e = self._factors(name)
        s = self._layer_scalings(xl.layer[name])
        se = g.op("MatMul", [s, e])
        if self.dtype != np.float32:  # routing in float32, the branch in the compute dtype
            se = g.op("Cast", [se], to=TensorProto.FLOAT16)
        h = g.op("Mul", [g.op("MatMul", [x, at]), se])
        return g.op("MatMul", [h, bt])

    def _layer_scalings(self, layer: int) -> str:
        """s_ℓ (B, T, C): the layer's slice of the scalings, top-k masked / renormalised."""
        g, xl = self.g, self.xlora
        s = self.scalings
        if xl.layerwise:
            s = g.op("Gather", [s, g.const(f"layer_{layer}", np.array([layer], np.int64))], axis=2)  # (B, T, 1, C)
            s = g.op("Squeeze", [s, g.const("axis2", np.array([2], np.int64))])
        if xl.top_k is not None:
            vals, _ = g.op("TopK", [s, g.const(f"k_{xl.top_k}", np.array([xl.top_k], np.int64))], 2, axis=-1)
            kth = g.op("Slice", [vals, g.const(f"k_{xl.top_k - 1}", np.array([xl.top_k - 1], np.int64)),
                                 g.const(f"k_{xl.top_k}", np.array([xl.top_k], np.int64)),
                                 g.const("last_axis", np.array([-1], np.int64))])
            keep = g.op("GreaterOrEqual", [s, kth])
            s = g.op("Mul", [s, g.op("Cast", [keep], to=TensorProto.FLOAT)])
            if xl.softmax_topk:  # softmax over the kept (non-zero) experts, zeros elsewhere
                nonzero = g.op("Not", [g.op("Equal", [s, g.const("zero_f", np.array(0.0, np.float32))])])
                ninf = g.const("neg_inf", np.array(-np.inf, np.float32))
                soft = g.op("Softmax", [g.op("Where", [nonzero, s, ninf])], axis=-1)
                s = g.op("Where", [nonzero, soft, g.const("zero_f", np.array(0.0, np.float32))])
        return s

    def _classifier(self, h: str) -> str:
        """The scalings (B, T, L, C) (or (B, T, C) when not layerwise) from h (B, T, H)."""
        g, xl = self.g, self.xlora
        with g.scope("xlora_classifier"):
            z = h if self.dtype == np.float32 else g.op("Cast", [h], to=TensorProto.FLOAT)  # routing in float32
            for i, (w, b) in enumerate(xl.classifier):
                wt = g.init(f"xlora_classifier.layers.{i}.weight.T", w.T.astype(np.float32))
                z = g.op("Add", [g.op("MatMul", [z, wt]), g.init(f"xlora_classifier.layers.{i}.bias",
                                                                b.astype(np.float32))])
                if i < len(xl.classifier) - 1:
                    z = g.op("Relu", [z])
            if xl.layerwise:
                c = len(xl.experts)
                z = g.op("Reshape", [z, g.const(f"scalings_{c}", np.array([0, 0, -1, c], np.int64))])
            if xl.softmax:
                if xl.temperature != 1.0:
                    z = g.op("Div", [z, g.const("temperature", np.array(xl.temperature, np.float32))])
                z = g.op("Softmax", [z], axis=-1)
        return z

    # ------------------------------------------------------------------ the whole graph
    def build(self, embedding_name: str, prefix: str = "model"):
        a, g = self.arch, self.g
        with g.scope("model"):
            x, table = self.embedding(embedding_name)
            seqlens, total_len = self.attention_lengths()
            cos, sin = (t.astype(self.dtype) for t in rope_tables(a, self.positions))
            cos, sin = g.init("cos_cache", cos), g.init("sin_cache", sin)
            with g.scope("scaling_pass"):
                g.suffix = "#scaling_pass"
                h0 = self.blocks(x, seqlens, total_len, cos, sin, prefix, SCALING_PAST, SCALING_PRESENT)
                g.suffix = ""
            self.scalings = self._classifier(h0)
            self.routed = True
            h = self.blocks(x, seqlens, total_len, cos, sin, prefix)
        self.lm_head(h, table if a.tied else None)
        self.refuse_unused(embedding_name)
        model = self._model()
        f32 = TensorProto.FLOAT if self.dtype == np.float32 else TensorProto.FLOAT16
        cache = lambda n, t: helper.make_tensor_value_info(n, f32, ["batch_size", a.kv_heads, t, a.head_dim])  # noqa: E731
        for i in range(a.layers):
            for kv in ("key", "value"):
                model.graph.input.append(cache(f"{SCALING_PAST}.{i}.{kv}", "past_sequence_length"))
                model.graph.output.append(cache(f"{SCALING_PRESENT}.{i}.{kv}", "total_sequence_length"))
        return model, dict(self.matrix_bytes)


def build_xlora_decoder(manifest, tensors, config: dict, xlora, accuracy_level: int = 0,
                        dtype: str = "fp32") -> tuple[onnx.ModelProto, dict]:
    """The routed graph of a checkpoint read by :func:`~quantseal.checkpoint.read_checkpoint`;
    ``dtype``: the compute type, ``fp32`` or ``fp16`` (the CUDA graph: float16 activations, caches
    and logits, the classifier and the scalings in float32)."""
    from .decoder import COMPUTE

    from ..models import family_of
    from .decoder_arch import arch_of
    from .stored import Filtered, LazyMatrices, NumpyView, owned_names

    arch = arch_of(config)
    if arch.fused:
        from ..errors import Unsupported

        raise Unsupported(f"X-LoRA export is for decoders with separate q/k/v and gate/up projections, "
                          f"not {arch.model_type}")
    fam = family_of(config)
    arrays = NumpyView(tensors)
    builder = XLoraDecoderGraph(arch, LazyMatrices(manifest, arrays), Filtered(arrays, owned_names(manifest)), xlora,
                                accuracy_level, manifest.extra.get("activations"), dtype=COMPUTE[dtype])
    return builder.build(fam.embedding_attr, prefix=fam.blocks_attr.split(".")[0])



def export_xlora(checkpoint, output, folder, accuracy_level: int = 0, dtype: str = "fp32") -> dict:
    """``quantseal export CK -o OUT --adapter XLORA_DIR``: the routed graph of a decoder
    checkpoint, written like :func:`~quantseal.export.decoder.export_decoder` minus the
    onnxruntime-genai config; the report gains ``adapters`` (experts, layers, classifier depth)."""
    import json
    import time
    from pathlib import Path

    from .. import checkpoint as ckpt
    from ..errors import BadInput, Unsupported
    from ..models import ENCODER, family_of, read_config
    from .adapters.xlora import read_xlora
    from .decoder_arch import arch_of
    from .onnx import _check_output, _make_parent, _metadata, finish_export

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    manifest, tensors = ckpt.read_checkpoint(checkpoint)
    config = read_config(checkpoint)
    if family_of(config) is ENCODER:
        raise Unsupported(f"{folder}: peft_type 'XLORA' is exported for LLaMA-family decoders (peft's X-LoRA runs "
                          f"causal LMs), not for the encoder {checkpoint}")
    xl = read_xlora(folder, list(manifest.matrices))
    try:
        proto, matrix_bytes = build_xlora_decoder(manifest, tensors, config, xl, accuracy_level, dtype)
    except BadInput as exc:
        raise BadInput(f"{checkpoint}: {exc}") from None
    del tensors
    _make_parent(output)
    arch = arch_of(config)
    eos = config.get("eos_token_id")
    meta = _metadata(manifest, "decoder", matrix_bytes)
    meta.update({
        "quantseal.output": "logits", "quantseal.pooling": "none",
        "quantseal.num_layers": str(arch.layers), "quantseal.num_kv_heads": str(arch.kv_heads),
        "quantseal.head_dim": str(arch.head_dim), "quantseal.architecture": arch.model_type,
        "quantseal.eos_token_id": ",".join(str(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None),
        "quantseal.dtype": dtype,
        "quantseal.extra_caches": json.dumps([[SCALING_PAST, SCALING_PRESENT]]),
        "quantseal.xlora": json.dumps({"experts": xl.experts, "layers": len(xl.layer),
                                       "classifier_depth": len(xl.classifier), "layerwise": xl.layerwise,
                                       "top_k": xl.top_k, "scaling_pass": xl.scaling_pass}, sort_keys=True),
    })
    res = finish_export(proto, output, checkpoint, manifest, "decoder", matrix_bytes, meta, t0)
    res["adapters"] = {"xlora": True, "experts": xl.experts, "matrices": sorted(xl.factors),
                       "adapters": [{"path": str(folder), "peft_type": "XLORA", "fold_rel_error": 0.0}]}
    return res
