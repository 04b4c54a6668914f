"""Each low-bit node in onnxruntime equals the float64 numpy reference built from our own
``dequantize``: ``x · dequant(Q)ᵀ + (x · L2ᵀ) · L1ᵀ`` and ``dequant(Q)[ids] + L1[ids] · L2``."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from quantseal.checkpoint import MatrixEntry, dequantized_matrix, matrix_tensors
from quantseal.compress.formats import Candidate, FormatSpec
from quantseal.compress.quantizers import quantize, round_float
from quantseal.errors import Unsupported
from quantseal.export.lowbit import (MS_DOMAIN, OPSET, StoredMatrix, embedding_nodes, initializer_bytes,
                                     linear_nodes, nf4_bnb_layout)


def stored(name: str, fmt: str, n: int, k: int, rank: int = 0, seed: int = 0):
    """A random matrix stored as the checkpoint would: (StoredMatrix, float64 W_hat + L1 L2)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    spec = FormatSpec.parse(fmt)
    qt = None if spec.kind == "fp" else quantize(w, spec, clip_search=False)
    weight = round_float(w, spec) if spec.kind == "fp" else None
    l1 = torch.randn(n, rank, generator=gen) * 0.1 if rank else None
    l2 = torch.randn(rank, k, generator=gen) * 0.1 if rank else None
    tensors = matrix_tensors(name, spec, qt, weight, l1, l2)
    entry = MatrixEntry(fmt, rank, [n, k], 0.0, Candidate(spec, rank).stored_bytes(n, k))
    w_hat, l1f, l2f = dequantized_matrix(name, entry, tensors)
    ref = w_hat.double().numpy()
    if rank:
        ref = ref + l1f.double().numpy() @ l2f.double().numpy()
    arrays = {k[len(name) + 1:]: v.numpy() for k, v in tensors.items()}
    return StoredMatrix(name, spec, (n, k), arrays), ref, entry


def run_graph(g, inputs, feeds):
    graph = helper.make_graph(g.nodes, "t", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def run_linear(m: StoredMatrix, x: np.ndarray):
    g = linear_nodes(m, "x", "y")
    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * (x.ndim - 1) + [x.shape[-1]])
    return run_graph(g, [vi], {"x": x}), g


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


LINEAR_CASES = [
    # fmt, N, K   (odd N; K not a multiple of the block → a padded last block)
    ("int2_b16", 37, 100), ("int2s_b32", 37, 96), ("int4_b32", 33, 200), ("int4s_b64", 21, 130),
    ("int8_b128", 19, 300), ("int8s_b64", 19, 64), ("int3_b32", 23, 70), ("int4_b128", 7, 128),
    ("nf4_b64", 29, 150), ("nf4_b32", 17, 64), ("nf4_b16", 5, 33), ("fp16", 13, 41), ("fp32", 13, 41),
]


@pytest.mark.parametrize("fmt,n,k", LINEAR_CASES)
@pytest.mark.parametrize("rank", [0, 3])
def test_linear_matches_numpy(fmt, n, k, rank):
    m, w_ref, entry = stored("blk.lin", fmt, n, k, rank)
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32)
    y, g = run_linear(m, x)
    ref = x.astype(np.float64) @ w_ref.T
    assert y.shape == (2, 5, n)
    assert rel_err(y, ref) < 2e-5, fmt
    ops = Counter(nd.op_type for nd in g.nodes)
    assert ops[m.spec.onnx_op] == 1 + (2 * (rank > 0) if m.spec.onnx_op == "MatMul" else 0)
    if m.spec.onnx_op != "MatMul":
        assert ops["MatMul"] == 2 * (rank > 0)
    # the matrix's initialisers hold exactly the bytes the manifest promises, nothing else stored
    own = [t for t in g.initializers if t.name.startswith("blk.lin.") and t.name[len("blk.lin"):] in
           (".qweight", ".scales", ".qzeros", ".weight", ".L1", ".L2")]
    assert initializer_bytes(own) == entry.bytes
    extra = [t for t in g.initializers if t not in own]
    assert initializer_bytes(extra) <= 32  # Pad's small shape constants only


def test_symmetric_has_no_zero_points_and_affine_does():
    sym, _, _ = stored("a", "int4s_b32", 8, 64)
    aff, _, _ = stored("a", "int4_b32", 8, 64)
    assert len(linear_nodes(sym, "x", "y").nodes[-1].input) == 3
    assert linear_nodes(aff, "x", "y").nodes[-1].input[3] == "a.qzeros"


def test_nf4_layout_first_code_in_high_nibble():
    q = np.array([[[0x21, 0x43]]], dtype=np.uint8)  # codes 1,2,3,4 stored LSB first
    assert nf4_bnb_layout(q).tolist() == [0x12, 0x34]


def test_2d_input_and_batch_one():
    m, w_ref, _ = stored("m", "int4_b32", 11, 70, rank=2)
    x = np.random.default_rng(2).standard_normal((1, 70)).astype(np.float32)
    y, _ = run_linear(m, x)
    assert rel_err(y, x.astype(np.float64) @ w_ref.T) < 2e-5


EMB_CASES = [("int4f_b32", 50, 64), ("int4f_b128", 17, 200), ("int4_b32", 50, 64), ("int4s_b32", 50, 64), ("int8_b64", 41, 100), ("int8s_b128", 41, 128),
             ("int2_b16", 30, 48), ("int4_b128", 17, 200), ("int3_b32", 20, 96), ("fp16", 30, 24), ("fp32", 30, 24)]


@pytest.mark.parametrize("fmt,v,h", EMB_CASES)
@pytest.mark.parametrize("rank", [0, 4])
def test_embedding_matches_numpy(fmt, v, h, rank):
    m, e_ref, entry = stored("emb", fmt, v, h, rank, seed=3)
    ids = np.array([[0, v - 1, 5, 5], [3, 2, 1, 0]], dtype=np.int64)
    g = embedding_nodes(m, "ids", "y")
    y = run_graph(g, [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])], {"ids": ids})
    assert y.shape == (2, 4, h)
    assert rel_err(y, e_ref[ids]) < 2e-5, fmt
    own = [t for t in g.initializers
           if t.name.split(".")[-1] in ("qweight", "scales", "qzeros", "offsets", "weight", "L1", "L2")]
    assert initializer_bytes(own) == entry.bytes
    if m.spec.kind in ("int", "intf"):
        assert Counter(nd.op_type for nd in g.nodes)["GatherBlockQuantized"] == 1


def test_nf4_embedding_is_unsupported():
    m, _, _ = stored("emb", "nf4_b32", 10, 32)
    with pytest.raises(Unsupported, match="GatherBlockQuantized"):
        embedding_nodes(m, "ids", "y")


@pytest.mark.parametrize("fmt,n,k", [("int4f_b32", 33, 200), ("int4f_b64", 21, 128), ("int4f_b128", 7, 300)])
@pytest.mark.parametrize("rank", [0, 3])
def test_int4f_linear_matches_float64_dequantise(fmt, n, k, rank):
    """MatMulNBits (z = 8) + S(x)·(m + 8s)ᵀ equals x · (s·q + m)ᵀ in float64 to 1e-5 (accuracy level
    0); dropping the offsets' 8s, or the offsets altogether, misses by orders of magnitude more."""
    m, _, entry = stored("blk.lin", fmt, n, k, rank)
    m.tensors["offsets"] = m.tensors["offsets"] + np.float16(0.02)  # blocks away from 0: the offsets matter
    from quantseal.compress.packing import unpack_weight

    per_col = lambda t: np.repeat(t.astype(np.float64), m.spec.block, axis=1)[:, :k]  # noqa: E731
    q = unpack_weight(torch.from_numpy(m.tensors["qweight"]), 4).numpy()[:, :k].astype(np.float64)
    s = per_col(m.tensors["scales"])
    ref_w = q * s + per_col(m.tensors["offsets"])
    if rank:
        ref_w = ref_w + m.tensors["L1"].astype(np.float64) @ m.tensors["L2"].astype(np.float64)
    x = np.random.default_rng(1).standard_normal((2, 5, k)).astype(np.float32) + 0.3
    y, g = run_linear(m, x)
    ref = x.astype(np.float64) @ ref_w.T
    assert y.shape == (2, 5, n) and rel_err(y, ref) < 1e-5
    assert rel_err(y, ref - x.astype(np.float64) @ (8 * s).T) > 1e-2
    ops = Counter(nd.op_type for nd in g.nodes)
    assert ops["MatMulNBits"] == 1 and ops["ReduceSum"] == 1 and ops["MatMul"] == 1 + 2 * (rank > 0)
    assert all(len(nd.input) == 3 for nd in g.nodes if nd.op_type == "MatMulNBits")  # no zero points
    own = [t for t in g.initializers if t.name.startswith("blk.lin.") and t.name[len("blk.lin"):] in
           (".qweight", ".scales", ".offsets", ".L1", ".L2")]
    assert initializer_bytes(own) == entry.bytes  # the file keeps float16 offsets: M' is folded at load


def test_int4f_matrices_reading_one_input_share_one_block_sum():
    a, wa, _ = stored("a", "int4f_b32", 8, 96, seed=1)
    b, wb, _ = stored("b", "int4f_b32", 6, 96, seed=2)
    memo: dict = {}
    ga = linear_nodes(a, "x", "ya", x_rank=3, memo=memo)
    gb = linear_nodes(b, "x", "yb", x_rank=3, memo=memo)
    nodes = ga.nodes + gb.nodes
    assert sum(nd.op_type == "ReduceSum" for nd in nodes) == 1
    assert not any(nd.op_type in ("Shape", "Concat") for nd in nodes)  # x's rank known: a constant Reshape
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 96])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("ya", "yb")],
                              initializer=ga.initializers + gb.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 9
    x = np.random.default_rng(3).standard_normal((1, 4, 96)).astype(np.float32)
    ya, yb = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert rel_err(ya, x.astype(np.float64) @ wa.T) < 1e-5 and rel_err(yb, x.astype(np.float64) @ wb.T) < 1e-5
