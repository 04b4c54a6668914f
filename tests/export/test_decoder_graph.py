"""The decoder graph onnxruntime actually runs: after its own graph optimisation, a GPTQ W4 export
with an int4 tied table holds the builder's op set and nothing more (no Cast, Reshape or Identity
left per token), and the lookup and the head read one stored code tensor."""

from collections import Counter

import onnx
import onnxruntime as ort

from tests.conftest import _decoder_export


def test_runtime_graph_is_the_builders_op_set(tmp_path_factory, tiny_llama_dir, tmp_path):
    ck, report = _decoder_export(tmp_path_factory, tiny_llama_dir, "gptq", "--wbits", "4", "--block", "32",
                                 "--table", "int4_b32", "--calib-samples", "8")
    path = report["path"]
    stored = onnx.load(path)
    inits = {i.name for i in stored.graph.initializer}
    gbq = next(n for n in stored.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in stored.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    codes = [i for i in inits if i.endswith("embed_tokens.qweight")]
    assert codes == [head.input[1]]  # one copy of the table's codes, read by the head ...
    reshape = next(n for n in stored.graph.node if n.output[0] == gbq.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == codes[0]  # ... and by the lookup

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    layers = 2
    assert ops["MatMulNBits"] == 5 * layers + 1  # packed q/k/v, o, gate, up, down; the tied head
    assert ops["GroupQueryAttention"] == layers and ops["GatherBlockQuantized"] == 1
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
    # the scale Casts fold at load: only the two attention-length Casts run per token, as in the builder's graph
    assert ops["Cast"] == 2
    allowed = {"MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization",
               "SimplifiedLayerNormalization", "QuickGelu", "Mul", "Sigmoid", "Cast", "ReduceSum", "Sub", "Shape",
               "Gather"}
    assert set(ops) <= allowed, set(ops) - allowed
