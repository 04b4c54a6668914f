"""A compressed decoder checkpoint → onnxruntime's fused decoder graph, built node by node.

The graph is the one onnxruntime-genai's model builder emits for the same architecture, and it
reads the checkpoint's stored tensors unchanged (no torch tracing):

* token lookup: ``Gather`` over a float table, or ``GatherBlockQuantized`` over a quantised one;
  an input-side watermark adds ``Gather(mark_delta, Gather(mark_slots, input_ids))`` to its rows
  (:meth:`DecoderGraph._input_mark`), which the head never reads;
* per layer: ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm,
  Zhang & Sennrich 2019, eq. 4: ``x / √(mean(x²) + ε) · g``; the Skip form also returns the
  residual sum ``x + skip``), the q/k/v projections packed into one ``MatMulNBits`` where their
  formats agree, ``GroupQueryAttention`` (rotary inside, KV cache in and out, causal, optional
  sliding window), the o/gate/up/down projections, SwiGLU ``(g·σ(g))·u`` (Shazeer 2020, eq. 6);
* final RMSNorm and the LM head: ``MatMulNBits`` over the *same* code tensor as the lookup when
  the table is quantised and tied, ``Gemm(h, E, transB=1)`` when it is float (no transposed copy);
* every planned matrix keeps its low-rank branch ``(x·L2ᵀ)·L1ᵀ``, its CFP input smoothing
  (``x / s``) and its calibrated activation QuantizeLinear/DequantizeLinear
  (:func:`~quantseal.export.lowbit.linear_nodes`).

Inputs and outputs (onnxruntime-genai's names; ``genai_config.json`` lists them):

=================================  =============================================  ====================
``input_ids``                      [batch, sequence] int64                        new tokens
``attention_mask``                 [batch, past + sequence] int64                 1 = real token
``past_key_values.{i}.key/value``  [batch, kv_heads, past, head_dim] float*       layer i's cache
``logits``                         [batch, sequence, vocab] float*                next-token logits
``present.{i}.key/value``          [batch, kv_heads, past + sequence, head_dim]   the cache to feed back
=================================  =============================================  ====================

``float*`` is the compute type: float32 (CPU), or float16 (``export --dtype fp16``, for the CUDA
execution provider: MatMulNBits reads the stored float16 scales directly).

GroupQueryAttention takes each row's length from the mask (``seqlens_k = Σ mask − 1``), so a
batch is *right*-padded: each row's real tokens sit at positions 0..len−1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..compress.formats import FormatSpec
from ..errors import Unsupported
from .decoder_arch import DecoderArch, rope_tables, table_positions
from .graph import GraphBuilder
from .lowbit import (MS_DOMAIN, OPSET, Nodes, StoredMatrix, block_sums, embedding_nodes, linear_nodes, offset_matrix,
                     offset_rows)

QDQ_OPSET = 21
SMOOTH = "input_smooth"
OUTPUT_SCALE = "output_scale"  # compress/qlinear.py
MARK_SLOTS = "mark_slots"  # <table>.mark_slots: (V,) int32, 0 = unmarked, j = the j-th marked row (export/watermark.py)
MARK_DELTA = "mark_delta"  # <table>.mark_delta: (1 + n·k, H) float32, row 0 all zero


def _packable(ms: list[StoredMatrix], acts: list, smooths: list) -> bool:
    """Whether matrices with the same input can share one MatMulNBits (rows concatenated): the
    same integer format, no low-rank branch, no activation quantiser, the same input smoothing."""
    spec = ms[0].spec
    if spec.kind not in ("int", "intf") or any(m.spec != spec or m.rank or m.shape[1] != ms[0].shape[1] for m in ms):
        return False
    if any("K1" in m.tensors for m in ms):  # a folded LoKr's Kronecker branch (adapters/lokr.py)
        return False
    if any(a is not None for a in acts):
        return False
    if any(s is None for s in smooths):
        return all(s is None for s in smooths)
    return all(np.array_equal(s, smooths[0]) for s in smooths)


def pack_rows(name: str, ms: list[StoredMatrix]) -> StoredMatrix:
    """One matrix whose rows are ``ms``' rows in order: codes, scales and packed zero points are
    laid out per output row, so concatenating along rows is exact (``y = [y_q | y_k | y_v]``)."""
    tensors = {k: np.concatenate([m.tensors[k] for m in ms], axis=0) for k in ms[0].tensors}
    return StoredMatrix(name, ms[0].spec, (sum(m.shape[0] for m in ms), ms[0].shape[1]), tensors)


class DecoderGraph:
    """Builds the graph of one checkpoint; :meth:`build` returns ``(ModelProto, matrix_bytes)``.

    ``matrices``: the planned matrices (:class:`StoredMatrix` by name); ``plain``: every other
    stored tensor as numpy (norms, biases, smoothing vectors, a float embedding / LM head);
    ``activations``: calibrated activation quantisers by Linear name.  Both mappings may read each
    entry when it is asked for (:mod:`.stored`); ``sink``: where initialiser bytes go
    (:class:`~.external_data.TensorSink`; ``None``: kept in the protos)."""

    def __init__(self, arch: DecoderArch, matrices: dict[str, StoredMatrix], plain: dict[str, np.ndarray],
                 accuracy_level: int = 0, activations: dict[str, dict] | None = None,
                 max_positions: int | None = None, dtype=np.float32, sink=None):
        self.arch, self.matrices, self.plain = arch, matrices, plain
        self.dtype = np.dtype(dtype).type
        self.accuracy_level = accuracy_level
        self.activations = activations or {}
        self.positions = max_positions or arch.max_positions
        self.g = GraphBuilder(self.dtype, sink)
        self.matrix_bytes = {n: 0 for n in matrices}
        self._plain_used: dict[str, str] = {}
        self._table_scales: str | None = None  # float32 scales of a quantised tied table
        self._table_offsets: str | None = None  # an int4f tied table's M' = m + 8s (V, nb)
        self._block_sums: dict = {}  # S(x) per (input, block): shared by the int4f matrices reading x

    # ------------------------------------------------------------------ stored tensors
    def _plain(self, name: str) -> str:
        """A non-matrix stored tensor as an initialiser (read in the compute type)."""
        if name in self._plain_used:
            return self._plain_used[name]
        if name not in self.plain:
            raise Unsupported(f"the checkpoint has no tensor {name!r} that a {self.arch.model_type} graph needs")
        arr = self.plain[name]
        out = self.g.init(name, arr)
        out = self.g.cast_float(out, arr.dtype)
        self._plain_used[name] = out
        return out

    def _matrix(self, name: str) -> StoredMatrix:
        m = self.matrices.get(name)
        if m is None:
            w = self.plain.get(name + ".weight")
            if w is None:
                raise Unsupported(f"the checkpoint has no matrix {name!r}")
            spec = FormatSpec("fp", 16 if w.dtype == np.float16 else 32)
            m = StoredMatrix(name, spec, tuple(w.shape), {"weight": w.astype(np.float32) if w.dtype not in (np.float16, np.float32) else w})
            self._plain_used[name + ".weight"] = name + ".weight"
        return m

    def _owned(self, m: StoredMatrix, *parts: StoredMatrix) -> None:
        for p in parts or (m,):
            if p.name in self.matrix_bytes:
                self.matrix_bytes[p.name] += sum(int(a.nbytes) for a in p.tensors.values())

    # ------------------------------------------------------------------ pieces
    def _smoothed(self, x: str, name: str) -> str:
        s = self.plain.get(f"{name}.{SMOOTH}")
        if s is None:
            return x
        self._plain_used[f"{name}.{SMOOTH}"] = f"{name}.{SMOOTH}"
        return self.g.op("Div", [x, self.g.init(f"{name}.{SMOOTH}", s.astype(self.dtype))])

    def linear(self, name: str, x: str, y: str | None = None) -> str:
        """``y = smooth(x) · Wᵀ (+ low-rank) (+ bias)`` for the planned (or float) Linear ``name``."""
        m = self._matrix(name)
        with self.g.scope(name.rsplit(".", 1)[-1]):
            xs = self._smoothed(x, name)
            bias = self.plain.get(f"{name}.bias")
            out = y if (y is not None and bias is None) else f"{self.g.prefix()}/MatMul/output_0"
            scale = self.plain.get(f"{name}.{OUTPUT_SCALE}")  # a folded DoRA / IA³: o ⊙ (x Wᵀ) + b
            mm = out if scale is None else f"{self.g.prefix()}/MatMul/output_unscaled"
            self.g.extend(linear_nodes(m, xs, mm, self.accuracy_level, self.activations.get(name), self.dtype,
                                       x_rank=3, memo=self._block_sums))
            self._owned(m)
            if scale is not None:
                o = self._plain(f"{name}.{OUTPUT_SCALE}")
                out = self.g.op("Mul", [mm, o], [out] if out == y else 1)
            if bias is not None:
                b = self._plain(f"{name}.bias")
                out = self.g.op("Add", [out, b], [y] if y is not None else 1)
        return out

    def qkv(self, attn: str, x: str) -> tuple[str, str, str]:
        """The query, key and value projections: one packed MatMulNBits where they agree
        (:func:`_packable`), else three; returns ``(q, k, v)`` or ``(qkv, "", "")``.  Phi-3 stores
        them as one ``qkv_proj`` already (rows q | k | v): one Linear."""
        if self.arch.fused:
            return self.linear(f"{attn}.qkv_proj", x), "", ""
        names = [f"{attn}.{p}_proj" for p in "qkv"]
        ms = [self._matrix(n) for n in names]
        acts = [self.activations.get(n) for n in names]
        smooths = [self.plain.get(f"{n}.{SMOOTH}") for n in names]
        biased = any(f"{n}.bias" in self.plain for n in names)
        scaled = any(f"{n}.{OUTPUT_SCALE}" in self.plain for n in names)
        if scaled or not _packable(ms, acts, smooths):
            del ms  # each Linear reads its own tensors again: one matrix held at a time
            return tuple(self.linear(n, x) for n in names)
        packed = pack_rows(f"{attn}.qkv_proj", ms)
        with self.g.scope("qkv_proj"):
            xs = self._smoothed(x, names[0])
            for n in names[1:]:
                if f"{n}.{SMOOTH}" in self.plain:
                    self._plain_used[f"{n}.{SMOOTH}"] = "shared with q_proj"
            out = f"{self.g.prefix()}/MatMul/output_0"
            self.g.extend(linear_nodes(packed, xs, out, self.accuracy_level, dtype=self.dtype, x_rank=3,
                                       memo=self._block_sums))
            self._owned(packed, *ms)
            if biased:
                b = np.concatenate([self.plain.get(f"{n}.bias", np.zeros(m.shape[0], np.float32)).astype(self.dtype)
                                    for n, m in zip(names, ms)])
                for n in names:
                    self._plain_used[f"{n}.bias"] = "packed"
                out = self.g.op("Add", [out, self.g.init(f"{attn}.qkv_proj.bias", b)])
        if self.arch.qk_norm:  # Qwen3 normalises q and k per head: split first
            sizes = [m.shape[0] for m in ms]
            q, k, v = self.g.op("Split", [out, self.g.const("qkv_sizes", np.array(sizes, np.int64))], 3, axis=-1)
            return q, k, v
        return out, "", ""

    def head_norm(self, x: str, gamma: str, heads: int) -> str:
        """RMSNorm over each head's ``head_dim`` features of ``x: (B, S, heads·d)`` (Qwen3)."""
        d = self.arch.head_dim
        x4 = self.g.op("Reshape", [x, self.g.const(f"heads_{heads}_{d}", np.array([0, 0, heads, d], np.int64))])
        y4 = self.g.op("SimplifiedLayerNormalization", [x4, self._plain(gamma)], axis=-1,
                       epsilon=self.arch.rms_eps, stash_type=1)
        return self.g.op("Reshape", [y4, self.g.const(f"flat_{heads * d}", np.array([0, 0, heads * d], np.int64))])

    def gate_up(self, mlp: str, h: str) -> tuple[str, str]:
        """SwiGLU's gate and up projections: two Linears, or Phi-3's stored ``gate_up_proj`` (rows
        gate | up, transformers' ``chunk(2)``) as one Linear and a Split after it."""
        if not self.arch.fused:
            return self.linear(f"{mlp}.gate_proj", h), self.linear(f"{mlp}.up_proj", h)
        gu = self.linear(f"{mlp}.gate_up_proj", h)
        n = self.arch.intermediate
        return self.g.op("Split", [gu, self.g.const(f"halves_{n}", np.array([n, n], np.int64))], 2, axis=-1)

    def rope_caches(self) -> tuple[str, str]:
        """GroupQueryAttention's ``cos_cache`` / ``sin_cache``: one table pair, or LongRoPE's short
        and long pairs and an ``If`` on the total sequence length (``attention_mask``'s width)
        ``> original_max_position_embeddings`` picking one, as onnxruntime-genai's builder does."""
        a, g = self.arch, self.g
        sizes = table_positions(a, self.positions)
        if len(sizes) == 1:
            cos, sin = (t.astype(self.dtype) for t in rope_tables(a, sizes[0]))
            return g.init("cos_cache", cos), g.init("sin_cache", sin)
        names = {}
        for kind, n, long in (("small", sizes[0], False), ("large", sizes[1], True)):
            cos, sin = (t.astype(self.dtype) for t in rope_tables(a, n, long))
            names[kind] = (g.init(f"cos_cache_{kind}", cos), g.init(f"sin_cache_{kind}", sin))
        elem = TensorProto.FLOAT if self.dtype == np.float32 else TensorProto.FLOAT16

        def branch(kind: str) -> onnx.GraphProto:  # outer-scope initialisers, passed through
            outs = [f"{t}_cache_{kind}_out" for t in ("cos", "sin")]
            nodes = [helper.make_node("Identity", [src], [dst], name=f"/rope_caches/{kind}/Identity_{i}")
                     for i, (src, dst) in enumerate(zip(names[kind], outs))]
            return helper.make_graph(nodes, f"{kind}_rope_caches", [],
                                     [helper.make_tensor_value_info(o, elem, None) for o in outs])

        with g.scope("rope_caches"):
            width = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("one", np.array(1, np.int64))], axis=0)
            longer = g.op("Greater", [width, g.const(f"switch_{a.rope_switch}", np.array(a.rope_switch, np.int64))])
            return g.op("If", [longer], ["cos_cache", "sin_cache"], then_branch=branch("large"),
                        else_branch=branch("small"))

    def rms(self, x: str, gamma: str, skip: str | None = None) -> tuple[str, str]:
        """``(RMSNorm(x [+ skip]), x [+ skip])``: the normalised value and the residual stream."""
        if skip is None:
            y = self.g.op("SimplifiedLayerNormalization", [x, self._plain(gamma)], axis=-1,
                          epsilon=self.arch.rms_eps, stash_type=1)
            return y, x
        prefix = self.g.prefix()
        outs = [f"{prefix}/output_0", "", "", f"{prefix}/output_3"]
        y, _, _, s = self.g.ms("SkipSimplifiedLayerNormalization", [x, skip, self._plain(gamma)], outs,
                               epsilon=self.arch.rms_eps)
        return y, s

    def embedding(self, emb: str) -> tuple[str, StoredMatrix]:
        m = self._matrix(emb)
        marked = f"{emb}.{MARK_DELTA}" in self.plain or f"{emb}.{MARK_SLOTS}" in self.plain
        with self.g.scope("embed_tokens"):
            out = f"{self.g.prefix()}/output_0"
            rows = f"{self.g.prefix()}/rows" if marked else out
            if self.arch.tied and m.spec.kind in ("int", "intf"):
                self._quantised_tied_lookup(m, rows)
            else:
                self.g.extend(embedding_nodes(m, "input_ids", rows, self.dtype))
            self._owned(m)
            if marked:
                self._input_mark(emb, m, rows, out)
        return out, m

    def _input_mark(self, emb: str, m: StoredMatrix, rows: str, out: str) -> None:
        """The input-side watermark (:mod:`quantseal.export.watermark`, ``mark_side`` input):
        ``out = rows + mark_delta[mark_slots[input_ids]]``, slots (V,) int32 and delta (K, H) with
        ``delta[0] = 0``, so a token outside the board's triggers gets exactly ``+0.0`` and the head
        keeps reading the unmarked table."""
        sk, dk = f"{emb}.{MARK_SLOTS}", f"{emb}.{MARK_DELTA}"
        if sk not in self.plain or dk not in self.plain:
            raise Unsupported(f"{emb}: an input-side mark needs both {sk!r} and {dk!r}")
        slots, delta = np.asarray(self.plain[sk]), np.asarray(self.plain[dk])
        if (slots.dtype != np.int32 or slots.shape != (m.shape[0],) or delta.ndim != 2
                or delta.shape[1] != m.shape[1] or delta.dtype not in (np.float16, np.float32)
                or slots.min() < 0 or slots.max() >= delta.shape[0] or np.any(delta[0] != 0)):
            raise Unsupported(f"{emb}: its input-side mark tensors do not fit the table "
                              f"(slots {slots.dtype}{list(slots.shape)}, delta {delta.dtype}{list(delta.shape)})")
        self._plain_used[sk] = self.g.init(sk, slots)
        d = self._plain(dk)
        slot = self.g.op("Gather", [sk, "input_ids"], axis=0)
        corr = self.g.op("Gather", [d, slot], axis=0)
        self.g.op("Add", [rows, corr], [out])

    def _quantised_tied_lookup(self, m: StoredMatrix, out: str):
        """The lookup half of a quantised tied table: ``GatherBlockQuantized`` over a Reshape of
        the head's MatMulNBits codes ``(V, nb, B·k/8) → (V, nb·B·k/8)``, so one code tensor
        serves both (the layout of onnxruntime-genai's shared embeddings).  An int4f table adds
        ``Gather(M', ids)`` per block (:func:`~.lowbit.offset_rows`), M' = m + 8s shared with the head."""
        if m.rank:
            raise Unsupported(f"{m.name}: a quantised tied table with a low-rank branch is not exported")
        q = self.g.init(f"{m.name}.qweight", m.tensors["qweight"])
        data = self.g.op("Reshape", [q, self.g.const(f"rows_{m.shape[0]}", np.array([m.shape[0], -1], np.int64))])
        self.g.init(f"{m.name}.scales", m.tensors["scales"])  # float32 rows out: as exact as torch's
        scales = self.g.cast_float(f"{m.name}.scales", m.tensors["scales"].dtype)
        self._table_scales = scales
        inputs = [data, "input_ids", scales]
        if m.spec.kind == "intf":
            rows = self.g.ms("GatherBlockQuantized", inputs, gather_axis=0, quantize_axis=1,
                             block_size=m.spec.block, bits=4)
            n = Nodes(dtype=self.dtype)
            self._table_offsets = offset_matrix(n, m, scales)
            off = n.node("Gather", [self._table_offsets, "input_ids"], f"{m.name}.offset_rows")
            offset_rows(n, m.name, rows, off, "input_ids", m.shape[1], m.spec.block, out)
            self.g.extend(n)
            return
        if not m.spec.symmetric:
            inputs.append(self.g.init(f"{m.name}.qzeros", m.tensors["qzeros"]))
        hdim = m.shape[1]
        padded = m.spec.n_blocks(hdim) * m.spec.block > hdim
        rows = self.g.ms("GatherBlockQuantized", inputs, gather_axis=0, quantize_axis=1,
                         block_size=m.spec.block, bits=m.spec.stored_bits)
        if padded:
            rows = self.g.op("Slice", [rows, self.g.const("zero", np.array([0], np.int64)),
                                       self.g.const(f"len_{hdim}", np.array([hdim], np.int64)),
                                       self.g.const("last_axis", np.array([-1], np.int64))])
        self.g.op("Identity", [rows], [out])

    def lm_head(self, h: str, table: StoredMatrix | None) -> None:
        """``logits = h · Eᵀ`` (tied) or ``h · Wᵀ`` (its own head)."""
        with self.g.scope("lm_head"):
            if table is None:
                m = self._matrix("lm_head")
                if m.spec.kind == "fp":
                    self._float_head(h, m, own=True)
                else:
                    self.g.extend(linear_nodes(m, h, "logits", self.accuracy_level, dtype=self.dtype))
                    self._owned(m)
                return
            if table.spec.kind == "intf":  # codes and M' were added by the lookup
                n, k = table.shape
                codes = self.g.ms("MatMulNBits", [h, f"{table.name}.qweight", self._table_scales], K=k, N=n, bits=4,
                                  block_size=table.spec.block, accuracy_level=self.accuracy_level)
                mt = self.g.op("Transpose", [self._table_offsets], perm=[1, 0])
                g = Nodes(dtype=self.dtype)
                corr = g.node("MatMul", [block_sums(g, h, k, table.spec.block, 3, self._block_sums), mt],
                              f"{table.name}.logits_offsets")
                g.node("Add", [codes, corr], "logits")
                self.g.extend(g)
                return
            if table.spec.kind == "int":  # the codes were added by the lookup: reference them
                scales = self._table_scales or f"{table.name}.scales"
                inputs = [h, f"{table.name}.qweight", scales]
                if not table.spec.symmetric:
                    inputs.append(f"{table.name}.qzeros")
                n, k = table.shape
                self.g.ms("MatMulNBits", inputs, ["logits"], K=k, N=n, bits=table.spec.stored_bits,
                          block_size=table.spec.block, accuracy_level=self.accuracy_level)
                return
            self._float_head(h, table, own=False)

    def _float_head(self, h: str, m: StoredMatrix, own: bool) -> None:
        """``Gemm(h₂, E, transB=1)`` on the table as stored (no transposed copy) + low-rank."""
        name = f"{m.name}.weight"
        if own:
            self.g.init(name, m.tensors["weight"])
        w = self.g.cast_float(name, m.tensors["weight"].dtype)
        hidden = m.shape[1]
        h2 = self.g.op("Reshape", [h, self.g.const(f"flat_rows_{hidden}", np.array([-1, hidden], np.int64))])
        y2 = self.g.op("Gemm", [h2, w], transB=1)
        if m.rank:
            l2 = self.g.cast_float(f"{m.name}.L2", m.tensors["L2"].dtype)
            l1 = self.g.cast_float(f"{m.name}.L1", m.tensors["L1"].dtype)
            lr = self.g.op("Gemm", [h2, l2], transB=1)
            y2 = self.g.op("Gemm", [lr, l1, y2], transB=1)
        ids_shape = self.g.op("Shape", ["input_ids"])
        vocab = self.g.const(f"vocab_{m.shape[0]}", np.array([m.shape[0]], np.int64))
        target = self.g.op("Concat", [ids_shape, vocab], axis=0)
        self.g.op("Reshape", [y2, target], ["logits"])

    # ------------------------------------------------------------------ the whole graph
    def attention_lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's ``seqlens_k`` (tokens seen per row − 1) and ``total_sequence_length``
        (``attention_mask``'s width), both int32."""
        g = self.g
        with g.scope("attn_mask"):
            total = g.op("ReduceSum", ["attention_mask", g.const("axis1", np.array([1], np.int64))], keepdims=0)
            seqlens = g.op("Cast", [g.op("Sub", [total, g.const("one", np.array(1, np.int64))])],
                           to=TensorProto.INT32)
            width = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("one", np.array(1, np.int64))],
                         axis=0)
            total_len = g.op("Cast", [width], to=TensorProto.INT32)
        return seqlens, total_len

    def blocks(self, x: str, seqlens: str, total_len: str, cos: str, sin: str, prefix: str,
               past: str = "past_key_values", present: str = "present") -> str:
        """The decoder blocks and the final norm over the embedded ``x``; each layer's KV cache is
        ``{past}.{i}.key|value`` in and ``{present}.{i}.key|value`` out.  Returns the normed states."""
        a, g = self.arch, self.g
        residual, skip = x, None
        for i in range(a.layers):
            base = f"{prefix}.layers.{i}"
            with g.scope(f"layers.{i}"):
                with g.scope("input_layernorm"):
                    h, residual = self.rms(residual, f"{base}.input_layernorm.weight", skip)
                with g.scope("attn"):
                    q, k, v = self.qkv(f"{base}.self_attn", h)
                    if a.qk_norm:
                        q = self.head_norm(q, f"{base}.self_attn.q_norm.weight", a.heads)
                        k = self.head_norm(k, f"{base}.self_attn.k_norm.weight", a.kv_heads)
                    attn, _, _ = g.ms(
                        "GroupQueryAttention",
                        [q, k, v, f"{past}.{i}.key", f"{past}.{i}.value", seqlens, total_len, cos, sin],
                        [f"{g.prefix()}/GroupQueryAttention/output_0", f"{present}.{i}.key", f"{present}.{i}.value"],
                        num_heads=a.heads, kv_num_heads=a.kv_heads, scale=a.scale, do_rotary=1,
                        rotary_interleaved=0, local_window_size=-1 if a.sliding_window is None else a.sliding_window)
                    o = self.linear(f"{base}.self_attn.o_proj", attn)
                with g.scope("post_attention_layernorm"):
                    h, residual = self.rms(residual, f"{base}.post_attention_layernorm.weight", o)
                with g.scope("mlp"):
                    gate, up = self.gate_up(f"{base}.mlp", h)
                    with g.scope("act_fn"):
                        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
                    skip = self.linear(f"{base}.mlp.down_proj", act)
        with g.scope("norm"):
            h, _ = self.rms(residual, f"{prefix}.norm.weight", skip)
        return h

    def refuse_unused(self, embedding_name: str) -> None:
        """A stored tensor the graph never read means the checkpoint is not this architecture."""
        unused = sorted(set(self.plain) - set(self._plain_used) - {"lm_head.weight"} - {f"{embedding_name}.weight"})
        if unused:
            raise Unsupported(f"the checkpoint holds {unused[0]!r}, which a {self.arch.model_type} graph has no place for")

    def build(self, embedding_name: str, prefix: str = "model") -> tuple[onnx.ModelProto, dict[str, int]]:
        a, g = self.arch, self.g
        with g.scope("model"):
            x, table = self.embedding(embedding_name)
            seqlens, total_len = self.attention_lengths()
            cos, sin = self.rope_caches()
            h = self.blocks(x, seqlens, total_len, cos, sin, prefix)
        self.lm_head(h, table if a.tied else None)
        self.refuse_unused(embedding_name)
        return self._model(), dict(self.matrix_bytes)

    def _model(self) -> onnx.ModelProto:
        a, g = self.arch, self.g
        f32 = TensorProto.FLOAT if self.dtype == np.float32 else TensorProto.FLOAT16
        i64 = TensorProto.INT64
        cache = lambda n, t: helper.make_tensor_value_info(n, f32, ["batch_size", a.kv_heads, t, a.head_dim])  # noqa: E731
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", a.vocab])]
        for i in range(a.layers):
            for kv in ("key", "value"):
                inputs.append(cache(f"past_key_values.{i}.{kv}", "past_sequence_length"))
                outputs.append(cache(f"present.{i}.{kv}", "total_sequence_length"))
        graph = helper.make_graph(g.nodes, "quantseal-decoder", inputs, outputs, g.initializers)
        opset = QDQ_OPSET if self.activations else OPSET
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        return model
