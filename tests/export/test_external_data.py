"""Initialiser bytes written to a data file as a graph is built (quantseal/export/external_data.py):
aligned external data that onnxruntime reads, and the one-file form assembled from the pieces,
byte for byte what ``onnx.save_model`` writes for the same model in memory."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantseal.export.external_data import (ALIGN, INLINE_BELOW, TensorSink, external_info, save, to_external,
                                            write_single_file)


def _model(seed: int = 0) -> onnx.ModelProto:
    """``y = ((x · A) + b) · C`` with initialisers of many sizes and dtypes, a doc string on one,
    metadata, two opsets: every field kind the one-file assembly must place."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 300)).astype(np.float32)  # 76800 bytes
    b = rng.standard_normal(300).astype(np.float32)  # 1200 bytes: just over the inline limit
    c = rng.standard_normal((300, 5)).astype(np.float16)  # 3000 bytes
    shape = np.array([-1, 5], np.int64)  # 16 bytes: stays inline
    inits = [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "C"),
             numpy_helper.from_array(shape, "shape"),
             numpy_helper.from_array(rng.integers(0, 255, 4097, dtype=np.uint8), "unused_codes")]
    inits[0].doc_string = "the first matrix"
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Cast", ["hb"], ["h16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["h16", "C"], ["y16"]),
             helper.make_node("Reshape", ["y16", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 5])], inits,
                              doc_string="a graph")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    model.producer_name = "quantseal-test"
    model.metadata_props.append(onnx.StringStringEntryProto(key="k", value="v" * 300))
    return model


def _streamed(model: onnx.ModelProto, folder, name: str = "m.onnx") -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    sink = TensorSink(folder / (name + ".data"), name + ".data")
    to_external(copy, sink)
    sink.close()
    return copy


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_single_file_is_byte_identical_to_save_model(tmp_path, seed):
    model = _model(seed)
    onnx.save_model(model, str(tmp_path / "ref.onnx"))
    streamed = _streamed(model, tmp_path)
    assert sum(t.data_location == TensorProto.EXTERNAL for t in streamed.graph.initializer) == 4
    write_single_file(streamed, tmp_path, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()


def test_sink_aligns_and_keeps_small_tensors_inline(tmp_path):
    model = _model()
    streamed = _streamed(model, tmp_path)
    data = (tmp_path / "m.onnx.data").read_bytes()
    originals = {t.name: t for t in model.graph.initializer}
    end = 0
    for t in streamed.graph.initializer:
        raw = originals[t.name].raw_data
        if len(raw) < INLINE_BELOW:
            assert t.data_location == TensorProto.DEFAULT and t.raw_data == raw
            continue
        info = external_info(t)
        off, n = int(info["offset"]), int(info["length"])
        assert info["location"] == "m.onnx.data" and off % ALIGN == 0 and n == len(raw)
        assert off >= end and off - end < ALIGN and data[end:off] == b"\0" * (off - end)  # zero padding only
        assert data[off:off + n] == raw and not t.HasField("raw_data")
        end = off + n
    assert len(data) == end


def test_external_and_single_file_run_the_same_in_onnxruntime(tmp_path):
    model = _model()
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    ref_dir, ext_dir, one_dir = (tmp_path / d for d in ("ref", "ext", "one"))
    for d in (ref_dir, ext_dir, one_dir):
        d.mkdir()
    onnx.save_model(model, str(ref_dir / "m.onnx"))
    assert save(_streamed(model, ext_dir), ext_dir, "m.onnx", external=True) == ["m.onnx.data", "m.onnx"]
    assert save(_streamed(model, one_dir), one_dir, "m.onnx", external=False) == ["m.onnx"]
    assert not (one_dir / "m.onnx.data").exists()  # folded in, then removed
    assert (ext_dir / "m.onnx").stat().st_size < 2000 < (ext_dir / "m.onnx.data").stat().st_size
    ref = _run(ref_dir / "m.onnx", x)
    assert np.array_equal(_run(ext_dir / "m.onnx", x), ref) and np.array_equal(_run(one_dir / "m.onnx", x), ref)
    # an in-memory model goes external too, at the same offsets as a streamed one
    mem_dir = tmp_path / "mem"
    mem_dir.mkdir()
    save(_model(), mem_dir, "m.onnx", external=True)
    assert (mem_dir / "m.onnx.data").read_bytes() == (ext_dir / "m.onnx.data").read_bytes()
    assert (mem_dir / "m.onnx").read_bytes() == (ext_dir / "m.onnx").read_bytes()
    assert np.array_equal(_run(mem_dir / "m.onnx", x), ref)
