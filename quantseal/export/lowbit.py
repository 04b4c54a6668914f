"""Low-bit ONNX nodes for one compressed matrix: the checkpoint's tensors → onnxruntime ops.

A linear matrix ``W ≈ dequant(Q) + L1 L2`` (``W: (N, K)`` out × in) becomes

    y = OP(x, Q) + MatMul(MatMul(x, L2ᵀ), L1ᵀ)          x: (..., K) float32 → y: (..., N)

with OP chosen by the storage format (:class:`~quantseal.compress.formats.FormatSpec`):

=============  ==========================================================================
format         nodes
=============  ==========================================================================
int{k}[s]_bB   ``MatMulNBits`` (com.microsoft; K, N, bits, block_size).  ``B``: uint8
               [N, nb, B·k/8] exactly as stored (LSB first); ``scales`` float16 [N, nb] + Cast;
               affine formats add packed ``zero_points`` uint8 [N, ceil(nb·k/8)]; symmetric
               ones omit them (MatMulNBits' default zero point is 2^(k-1), our implicit one).
int4f_bB       ``MatMulNBits`` without zero points (z = 8) + a block-sum correction, exact for
               ``ŵ = s·q + m``:  ``y = Σ_b s_b Σ_{i∈b} x_i (q_i − 8) + S(x) · M'ᵀ`` with
               ``S(x) = ReduceSum(Reshape(x, [..., nb, B]))`` [..., nb] and ``M' = m + 8s``
               [N, nb], computed in the graph from the stored float16 ``offsets`` and ``scales``
               (Cast/Mul/Add/Transpose on constants: onnxruntime folds them into one float32
               [nb, N] constant at load).  S(x) is shared by every matrix reading the same input
               (``block_sums``).
nf4_bB         ``MatMulBnb4`` (quant_type 1 = NF4).  bitsandbytes' layout: the codes of the
               row-major (N, K') matrix, K' = nb·B, flattened, two per byte with the *first* in
               the high nibble; ``absmax`` float16 [N·nb] + Cast.  When K' > K the input is
               zero-padded to K' (the padded codes are NF level 0.0, so the result is exact).
fp16 / fp32    Cast (fp16 only) → Transpose → MatMul.
=============  ==========================================================================

A folded LoKr adapter may add a Kronecker branch ``K1 ⊗ K2`` (``K1: (o1, i1)``, ``K2: (o2, i2)``,
N = o1·o2, K = i1·i2), computed without forming it: ``Reshape(x, [−1, i1, i2]) · K2ᵀ``, then
``K1 ·`` that (broadcast MatMul), then ``Reshape`` to ``(..., N)``, and added to y.

A token embedding ``E ≈ dequant(Q) + L1 L2`` (``E: (V, H)``) becomes
``GatherBlockQuantized(Q, ids)`` (uint8 data [V, nb·B·k/8], bits 2/4/8, quantize_axis 1; Slice
when H is not a multiple of B) plus ``Gather(L1, ids) · L2``; fp16/fp32 tables are a plain Gather.
An int4f table adds its offsets per block: ``rows + Gather(m + z₀s, ids)`` broadcast over each
block's B columns (z₀ = 8, GatherBlockQuantized's default zero point for 4-bit codes).

Every stored tensor keeps its checkpoint name (``<matrix>.qweight``, ``.scales``, ``.qzeros``,
``.weight``, ``.L1``, ``.L2``, ``.K1``, ``.K2``) and byte count, so the initialisers of a matrix total exactly the
manifest's ``bytes``.  Float16 tensors are cast to float32 inside the graph (onnxruntime folds
those casts into the constants at load).  Functions here are pure: arrays in, nodes out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..compress.formats import FormatSpec
from ..errors import Unsupported

MS_DOMAIN = "com.microsoft"
OPSET = 18  # Pad with an ``axes`` input (NF4 with a padded last block)
RUNNABLE_BITS = (2, 4, 8)  # MatMulNBits / GatherBlockQuantized on CPU in onnxruntime 1.32
STORED_SUFFIXES = (".qweight", ".scales", ".qzeros", ".offsets", ".weight", ".L1", ".L2", ".K1", ".K2")


@dataclass
class StoredMatrix:
    """One planned matrix as the checkpoint stores it.

    name:    dotted module name (``encoder.layer.0.attention.self.query``)
    spec:    its storage format
    shape:   (N, K) for a linear (out, in), (V, H) for an embedding
    tensors: suffix (``"qweight"``, ``"scales"``, ``"qzeros"``, ``"weight"``, ``"L1"``, ``"L2"``)
             → numpy array with the checkpoint's dtype and shape
    """

    name: str
    spec: FormatSpec
    shape: tuple[int, int]
    tensors: dict[str, np.ndarray]

    @property
    def rank(self) -> int:
        l1 = self.tensors.get("L1")
        return 0 if l1 is None else int(l1.shape[1])


@dataclass
class Nodes:
    """What a rewrite adds to a graph: nodes and initialisers (in topological order)."""

    nodes: list[NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    dtype: type = np.float32  # the compute type: float32 (CPU), or float16 (a CUDA graph)
    pending: dict = field(default_factory=dict)  # name → a chunked tensor whose bytes the graph writes

    def init(self, name: str, array: np.ndarray) -> str:
        if hasattr(array, "chunks"):  # a large stored tensor read in chunks (export/stored.py)
            self.initializers.append(header_proto(name, array))
            self.pending[name] = array
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output + "/" + op, domain=domain, **attrs))
        return output

    def as_float(self, name: str, array: np.ndarray) -> str:
        """An initialiser stored as-is, read in the compute type (a Cast when the stored float
        type differs; onnxruntime folds it into the constant at load)."""
        self.init(name, array)
        if array.dtype not in (np.float16, np.float32):
            raise TypeError(f"{name}: unexpected dtype {array.dtype}")
        return self.cast(name, array.dtype)

    def cast(self, value: str, dtype) -> str:
        """``value`` (of float type ``dtype``) in the compute type."""
        if np.dtype(dtype) == np.dtype(self.dtype):
            return value
        suffix, to = (".f32", TensorProto.FLOAT) if self.dtype == np.float32 else (".f16", TensorProto.FLOAT16)
        return self.node("Cast", [value], value + suffix, to=to)

    def transposed(self, name: str, array: np.ndarray) -> str:
        """float32 view of ``arrayᵀ`` (2-D), the stored tensor kept untransposed."""
        src = self.as_float(name, array)
        return self.node("Transpose", [src], name + ".T", perm=[1, 0])


def header_proto(name: str, array) -> TensorProto:
    """The TensorProto of ``array`` (name, dims, data type) without its bytes: the fields
    ``numpy_helper.from_array`` sets besides ``raw_data``."""
    t = TensorProto()
    t.dims.extend(array.shape)
    t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(array.dtype))
    t.name = name
    return t


def initializer_bytes(initializers: list[TensorProto]) -> int:
    """Raw bytes of initialisers (dims × element size)."""
    total = 0
    for t in initializers:
        size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * size
    return total


def _check_runnable(m: StoredMatrix) -> None:
    if m.spec.kind == "int" and m.spec.stored_bits not in RUNNABLE_BITS:
        raise Unsupported(f"{m.name}: {m.spec.name} is stored in {m.spec.stored_bits}-bit codes, "
                          f"which onnxruntime does not run (bits {RUNNABLE_BITS})")


def nf4_bnb_layout(qweight: np.ndarray) -> np.ndarray:
    """Our LSB-first NF4 codes ``[N, nb, B/2]`` → bitsandbytes' flat bytes ``[N·nb·B/2]``.

    Element i of the row-major (N, nb·B) code matrix sits in byte i//2, high nibble when i is
    even (bitsandbytes / MatMulBnb4), whereas the checkpoint puts it in the low nibble."""
    q = np.asarray(qweight, dtype=np.uint8)
    lo, hi = q & 0x0F, q >> 4  # first code of each stored pair, second code
    return ((lo << 4) | hi).reshape(-1).astype(np.uint8)


def _low_rank(g: Nodes, m: StoredMatrix, x: str) -> str | None:
    """(x · L2ᵀ) · L1ᵀ for a linear, or None when the rank is 0."""
    if not m.rank:
        return None
    l2t = g.transposed(f"{m.name}.L2", m.tensors["L2"])
    l1t = g.transposed(f"{m.name}.L1", m.tensors["L1"])
    h = g.node("MatMul", [x, l2t], f"{m.name}.lowrank_h")
    return g.node("MatMul", [h, l1t], f"{m.name}.lowrank_y")


def _kronecker(g: Nodes, m: StoredMatrix, x: str) -> str | None:
    """``x · (K1 ⊗ K2)ᵀ`` for x (..., i1·i2): Reshape to (−1, i1, i2), MatMul by K2ᵀ, MatMul K1 from
    the left (broadcast), Reshape back to (..., o1·o2); None without a Kronecker branch (LoKr)."""
    if "K1" not in m.tensors:
        return None
    (o1, i1), (o2, i2) = m.tensors["K1"].shape, m.tensors["K2"].shape
    k1 = g.as_float(f"{m.name}.K1", m.tensors["K1"])
    k2t = g.transposed(f"{m.name}.K2", m.tensors["K2"])
    x3 = g.node("Reshape", [x, g.init(f"{m.name}.kron_in", np.array([-1, i1, i2], dtype=np.int64))], f"{m.name}.kron_x")
    h = g.node("MatMul", [x3, k2t], f"{m.name}.kron_h")  # (B, i1, o2)
    h = g.node("MatMul", [k1, h], f"{m.name}.kron_y3")  # (B, o1, o2)
    lead = g.node("Shape", [x], f"{m.name}.kron_shape", end=-1)
    out_shape = g.node("Concat", [lead, g.init(f"{m.name}.kron_n", np.array([o1 * o2], dtype=np.int64))],
                       f"{m.name}.kron_out", axis=0)
    return g.node("Reshape", [h, out_shape], f"{m.name}.kron_y")


def activation_qdq(g: "Nodes", name: str, x: str, act: dict) -> str:
    """``x̂ = DequantizeLinear(QuantizeLinear(x))`` with a calibrated static per-tensor scale and
    zero point (uint8 for A8, uint4 for A4: opset 21): exactly CBQ's fake quantiser
    ``s · (clamp(round(x / s) + z, 0, 2^b − 1) − z)`` (both round half to even)."""
    bits = int(act["bits"])
    if bits not in (4, 8) or act.get("signed", False):
        raise Unsupported(f"{name}: unsigned 4- or 8-bit activations export, not {bits}-bit")
    scale = g.init(f"{name}.act_scale", np.array(act["scale"], dtype=g.dtype))
    if bits == 8:
        zero = g.init(f"{name}.act_zero", np.array(act["zero_point"], dtype=np.uint8))
    else:
        g.initializers.append(helper.make_tensor(f"{name}.act_zero", TensorProto.UINT4, [], [int(act["zero_point"])]))
        zero = f"{name}.act_zero"
    q = g.node("QuantizeLinear", [x, scale, zero], f"{name}.x_q")
    return g.node("DequantizeLinear", [q, scale, zero], f"{name}.x_dq")


DEFAULT_ZERO_4BIT = 8  # MatMulNBits' and GatherBlockQuantized's zero point when none is given


def offset_matrix(g: Nodes, m: StoredMatrix, s: str, zero: int = DEFAULT_ZERO_4BIT) -> str:
    """``M' = m + zero·s`` (N, nb) in the compute type, from the stored float16 ``offsets`` and the
    scales ``s`` (already in the compute type).  Constant nodes: onnxruntime folds them at load, the
    file keeps float16."""
    off = g.as_float(f"{m.name}.offsets", m.tensors["offsets"])
    zs = g.node("Mul", [s, g.init(f"{m.name}.zero_f", np.array(zero, dtype=g.dtype))], f"{m.name}.scales_z")
    return g.node("Add", [off, zs], f"{m.name}.offsets_z")


def block_sums(g: Nodes, x: str, k: int, block: int, rank: int | None = None, memo: dict | None = None,
               owner: str = "") -> str:
    """``S(x)`` (..., nb): the sums of ``x`` (..., K) over blocks of ``block`` columns (K zero-padded
    to nb·block).  ``rank``: x's rank when known (Reshape by [0, …, 0, nb, B], no Shape nodes);
    ``memo`` shares one S(x) between the matrices that read the same input (its nodes are named
    after ``x``; without a memo, after the ``owner`` matrix)."""
    key = (x, block)
    if memo is not None and key in memo:
        return memo[key]
    nb = -(-k // block)
    base = f"{x}.bsum{block}" if memo is not None else f"{owner}.bsum{block}"
    xin = x
    if nb * block > k:
        pads = g.init(f"{base}.pad", np.array([0, nb * block - k], dtype=np.int64))
        axes = g.init(f"{base}.pad_axes", np.array([-1], dtype=np.int64))
        xin = g.node("Pad", [x, pads, "", axes], f"{base}.x_padded")
    if rank is not None:
        shape = g.init(f"{base}.shape", np.array([0] * (rank - 1) + [nb, block], dtype=np.int64))
    else:
        lead = g.node("Shape", [x], f"{base}.lead", end=-1)
        shape = g.node("Concat", [lead, g.init(f"{base}.tail", np.array([nb, block], dtype=np.int64))],
                       f"{base}.shape", axis=0)
    xb = g.node("Reshape", [xin, shape], f"{base}.blocks")
    out = g.node("ReduceSum", [xb, g.init(f"{base}.axis", np.array([-1], dtype=np.int64))], base, keepdims=0)
    if memo is not None:
        memo[key] = out
    return out


def linear_nodes(m: StoredMatrix, x: str, y: str, accuracy_level: int = 0, act: dict | None = None,
                 dtype=np.float32, x_rank: int | None = None, memo: dict | None = None) -> Nodes:
    """Nodes computing ``y = x · dequant(Q)ᵀ + (x · L2ᵀ) · L1ᵀ`` for ``x: (..., K)`` of the compute
    type ``dtype`` (float32, or float16 for a CUDA graph); with ``act`` (calibrated activation
    quantiser) ``x`` is first fake-quantised by a QuantizeLinear / DequantizeLinear pair
    (:func:`activation_qdq`).  ``x_rank``/``memo``: see :func:`block_sums` (int4f only)."""
    _check_runnable(m)
    n, k = m.shape
    spec = m.spec
    g = Nodes(dtype=dtype)
    if act is not None:
        x = activation_qdq(g, m.name, x, act)
    kron = "K1" in m.tensors
    main = y if not (m.rank or kron) else f"{m.name}.y_q"
    if spec.kind == "int":
        inputs = [x, g.init(f"{m.name}.qweight", m.tensors["qweight"]),
                  g.as_float(f"{m.name}.scales", m.tensors["scales"])]
        if not spec.symmetric:
            inputs.append(g.init(f"{m.name}.qzeros", m.tensors["qzeros"]))
        elif "qzeros" in m.tensors:
            raise ValueError(f"{m.name}: a symmetric format with stored zero points")
        g.node("MatMulNBits", inputs, main, domain=MS_DOMAIN, K=k, N=n, bits=spec.stored_bits,
               block_size=spec.block, accuracy_level=accuracy_level)
    elif spec.kind == "intf":
        s = g.as_float(f"{m.name}.scales", m.tensors["scales"])
        mnb = g.node("MatMulNBits", [x, g.init(f"{m.name}.qweight", m.tensors["qweight"]), s], f"{m.name}.y_codes",
                     domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=spec.block, accuracy_level=accuracy_level)
        mt = g.node("Transpose", [offset_matrix(g, m, s)], f"{m.name}.offsets_z.T", perm=[1, 0])
        corr = g.node("MatMul", [block_sums(g, x, k, spec.block, x_rank, memo, m.name), mt], f"{m.name}.y_offsets")
        g.node("Add", [mnb, corr], main)
    elif spec.kind == "nf":
        kp = spec.n_blocks(k) * spec.block
        xin = x
        if kp > k:
            pads = g.init(f"{m.name}.pad_k", np.array([0, kp - k], dtype=np.int64))
            axes = g.init(f"{m.name}.pad_axes", np.array([-1], dtype=np.int64))
            xin = g.node("Pad", [x, pads, "", axes], f"{m.name}.x_padded")
        packed = nf4_bnb_layout(m.tensors["qweight"])
        absmax = m.tensors["scales"].reshape(-1)
        g.node("MatMulBnb4", [xin, g.init(f"{m.name}.qweight", packed), g.as_float(f"{m.name}.scales", absmax)],
               main, domain=MS_DOMAIN, K=kp, N=n, block_size=spec.block, quant_type=1)
    else:
        wt = g.transposed(f"{m.name}.weight", m.tensors["weight"])
        g.node("MatMul", [x, wt], main)
    lr = _low_rank(g, m, x)
    kr = _kronecker(g, m, x)
    if lr is not None and kr is not None:
        g.node("Add", [g.node("Add", [main, lr], f"{m.name}.y_lr"), kr], y)
    elif lr is not None or kr is not None:
        g.node("Add", [main, lr if lr is not None else kr], y)
    return g


def embedding_nodes(m: StoredMatrix, ids: str, y: str, dtype=np.float32) -> Nodes:
    """Nodes computing ``y = dequant(Q)[ids] + L1[ids] · L2`` (compute type ``dtype``) for int64
    ``ids`` of any shape."""
    _check_runnable(m)
    v, hdim = m.shape
    spec = m.spec
    g = Nodes(dtype=dtype)
    main = y if not m.rank else f"{m.name}.y_q"
    if spec.kind == "int":
        q = m.tensors["qweight"]
        data = g.init(f"{m.name}.qweight", q.reshape(q.shape[0], -1))
        inputs = [data, ids, g.as_float(f"{m.name}.scales", m.tensors["scales"])]
        if not spec.symmetric:
            inputs.append(g.init(f"{m.name}.qzeros", m.tensors["qzeros"]))
        padded = spec.n_blocks(hdim) * spec.block > hdim
        out = f"{m.name}.rows_padded" if padded else main
        g.node("GatherBlockQuantized", inputs, out, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
               block_size=spec.block, bits=spec.stored_bits)
        if padded:
            starts = g.init(f"{m.name}.slice_starts", np.array([0], dtype=np.int64))
            ends = g.init(f"{m.name}.slice_ends", np.array([hdim], dtype=np.int64))
            axes = g.init(f"{m.name}.slice_axes", np.array([-1], dtype=np.int64))
            g.node("Slice", [out, starts, ends, axes], main)
    elif spec.kind == "intf":
        q = m.tensors["qweight"]
        data = g.init(f"{m.name}.qweight", q.reshape(q.shape[0], -1))
        s = g.as_float(f"{m.name}.scales", m.tensors["scales"])
        rows = g.node("GatherBlockQuantized", [data, ids, s], f"{m.name}.rows_codes", domain=MS_DOMAIN,
                      gather_axis=0, quantize_axis=1, block_size=spec.block, bits=4)
        offset_rows(g, m.name, rows, g.node("Gather", [offset_matrix(g, m, s), ids], f"{m.name}.offset_rows"),
                    ids, hdim, spec.block, main)
    elif spec.kind == "fp":
        w = m.tensors["weight"]
        same = np.dtype(w.dtype) == np.dtype(dtype)
        rows = g.node("Gather", [g.init(f"{m.name}.weight", w), ids], main if same else f"{m.name}.rows")
        if not same:
            g.node("Cast", [rows], main, to=TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16)
    else:
        raise Unsupported(f"{m.name}: a {spec.name} token embedding has no onnxruntime op "
                          "(GatherBlockQuantized takes integer codes); use int4/int8/fp16")
    if m.rank:
        l1 = g.init(f"{m.name}.L1", m.tensors["L1"])
        rows = g.cast(g.node("Gather", [l1, ids], f"{m.name}.L1_rows"), m.tensors["L1"].dtype)
        l2 = g.as_float(f"{m.name}.L2", m.tensors["L2"])
        lr = g.node("MatMul", [rows, l2], f"{m.name}.lowrank_y")
        g.node("Add", [main, lr], y)
    return g


def offset_rows(g: Nodes, name: str, rows: str, offsets: str, ids: str, hdim: int, block: int, y: str) -> str:
    """``y = rows + offsets`` broadcast over each block: ``rows`` (ids…, nb·B) from
    GatherBlockQuantized, ``offsets`` (ids…, nb); sliced to the table's width ``hdim``."""
    lead = g.node("Shape", [ids], f"{name}.ids_shape")
    nb = -(-hdim // block)
    split = g.node("Concat", [lead, g.init(f"{name}.block_dims", np.array([nb, block], dtype=np.int64))],
                   f"{name}.rows_blocks_shape", axis=0)
    flat = g.node("Concat", [lead, g.init(f"{name}.row_width", np.array([nb * block], dtype=np.int64))],
                  f"{name}.rows_shape", axis=0)
    r3 = g.node("Reshape", [rows, split], f"{name}.rows_blocks")
    o3 = g.node("Unsqueeze", [offsets, g.init(f"{name}.last_axis", np.array([-1], dtype=np.int64))],
                f"{name}.offset_rows_b")
    full = nb * block > hdim
    summed = g.node("Reshape", [g.node("Add", [r3, o3], f"{name}.rows_blocks_off"), flat],
                    f"{name}.rows_padded" if full else y)
    if full:
        starts = g.init(f"{name}.slice_starts", np.array([0], dtype=np.int64))
        ends = g.init(f"{name}.slice_ends", np.array([hdim], dtype=np.int64))
        axes = g.init(f"{name}.slice_axes", np.array([-1], dtype=np.int64))
        g.node("Slice", [summed, starts, ends, axes], y)
    return y
