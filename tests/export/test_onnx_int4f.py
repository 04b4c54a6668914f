"""An encoder (tiny seeded BERT) with every Linear in int4f: the traced graph's MatMuls become
MatMulNBits + the block-sum correction, q/k/v share one S(x), and onnxruntime's sentence
embeddings equal the torch model of the dequantised weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.compress.pipeline import one_torch_thread
from quantseal.export.onnx import matrix_initializer_bytes
from quantseal.quality import embed_texts
from quantseal.text import TextTokenizer, pydoc_sentences

from cli_run import compress_then_export  # tests/cli_run.py


def test_int4f_encoder_matches_torch_and_shares_block_sums(tiny_bert_dir, tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "onnx" / "model.onnx"
    with one_torch_thread():
        compress_then_export(tiny_bert_dir, ck, out, ["--method", "rtn", "--budget", "16", "--formats", "int4f_b32",
                                                      "--workers", "1"])
        manifest, _ = read_checkpoint(ck)
        assert {e.format for e in manifest.matrices.values()} == {"int4f_b32"}
        model = onnx.load(str(out))
        ops = Counter(n.op_type for n in model.graph.node)
        layers = sum(n.endswith("attention.self.query") for n in manifest.matrices)
        assert ops["MatMulNBits"] == len(manifest.matrices)
        sums = [n for n in model.graph.node if n.op_type == "ReduceSum" and ".bsum32" in n.output[0]]
        assert len(sums) == 4 * layers  # q/k/v share one S(x); then o, intermediate, output
        assert matrix_initializer_bytes(model, manifest.matrices) == {n: e.bytes for n, e in manifest.matrices.items()}
        torch_model, _, _ = load_compressed(ck)
        tok = TextTokenizer(ck)
        texts = pydoc_sentences("evaluation")[:8]
        ref = embed_texts(torch_model, tok, texts)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["sentence_embedding"], tok(texts))[0]
    assert np.abs(got - ref).max() < 1e-5
