"""CBQ's calibrated activation quantisers export as QuantizeLinear / DequantizeLinear pairs
(uint8 for A8, uint4 for A4) and onnxruntime reproduces the torch fake-quantised model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantseal.checkpoint import load_compressed, read_checkpoint
from quantseal.cli import main
from quantseal.export.lowbit import Nodes, activation_qdq
from quantseal.quality import embed_texts
from quantseal.text import TextTokenizer, pydoc_sentences


@pytest.mark.parametrize("bits,zero", [(8, 131), (4, 9)])
def test_qdq_pair_equals_numpy_fake_quantiser(bits, zero):
    g = Nodes()
    act = {"bits": bits, "scale": 0.037, "zero_point": zero, "signed": False}
    y = activation_qdq(g, "lin", "x", act)
    graph = onnx.helper.make_graph(g.nodes, "qdq", [onnx.helper.make_tensor_value_info("x", 1, [7, 50])],
                                   [onnx.helper.make_tensor_value_info(y, 1, [7, 50])], g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    x = np.random.default_rng(0).normal(0, 3, (7, 50)).astype(np.float32)
    x[0, :4] = np.array([0.5, 1.5, -2.5, 100.0], dtype=np.float32) * 0.037  # ties and saturation
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    s, qmax = np.float32(0.037), 2**bits - 1
    ref = ((np.clip(np.round(x / s) + zero, 0, qmax) - zero) * s).astype(np.float32)  # half to even
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("abits", [8, 4])
def test_exported_activation_quantised_model_matches_torch(tiny_bert_dir, tmp_path, capsys, abits):
    ck, out = tmp_path / "ck", tmp_path / "model.onnx"
    assert main(["compress", str(tiny_bert_dir), "-o", str(ck), "--method", "cbq", "--wbits", "4", "--abits",
                 str(abits), "--block", "16", "--steps", "4", "--rank", "2", "--calib-samples", "8", "--json"]) == 0
    assert main(["export", str(ck), "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest, _ = read_checkpoint(ck)
    acts = manifest.extra["activations"]
    assert len(acts) == 12 and rep["ops"]["QuantizeLinear"] == 12 and rep["ops"]["DequantizeLinear"] == 12
    proto = onnx.load(str(out))
    zero_types = Counter(i.data_type for i in proto.graph.initializer if i.name.endswith(".act_zero"))
    assert zero_types == Counter({onnx.TensorProto.UINT8 if abits == 8 else onnx.TensorProto.UINT4: 12})

    tok = TextTokenizer(ck)
    texts = pydoc_sentences("evaluation")[:12]
    plain = embed_texts(load_compressed(ck, activations=False)[0], tok, texts)
    model, _, _ = load_compressed(ck)  # attaches the manifest's activation quantisers
    ref = embed_texts(model, tok, texts)
    # the torch model and the export both divide by CFP's smoothing factors before quantising
    _, tensors = read_checkpoint(ck)
    smoothed = sorted(k.removesuffix(".input_smooth") for k in tensors if k.endswith(".input_smooth"))
    assert smoothed, "the tiny model's LayerNorm / GELU outputs have outlier channels to smooth"
    divs = {n.input[1] for n in proto.graph.node if n.op_type == "Div"}
    smooth_inits = [i for i in proto.graph.initializer if i.name in divs and len(i.dims) == 1 and i.dims[0] > 1]
    assert len(smooth_inits) >= len({tuple(tensors[f"{n}.input_smooth"].tolist()) for n in smoothed})
    capsys.readouterr()
    assert main(["inspect", str(ck), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matrices"]}
    assert all(rows[n]["activation"] == acts[n] and f"A{abits} static input" in rows[n]["note"] for n in acts)
    assert all("input divided by CFP factors" in rows[n]["note"] for n in smoothed)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], tok(texts))[0]
    cos = np.sum(ref * got, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    # the quantisers are not a no-op: the fake-quantised model differs from the plain one
    assert np.abs(ref - plain).max() > 1e-4


@pytest.mark.slow
def test_exported_a8_decoder_matches_torch(tiny_llama_dir, tmp_path, capsys):
    """The decoder path (KV-cache graph) carries the QDQ pairs and CFP's folds / smoothing too."""
    import torch

    from quantseal.runtime.pipelines import CausalLM

    ck, out = tmp_path / "ck", tmp_path / "model.onnx"
    assert main(["compress", str(tiny_llama_dir), "-o", str(ck), "--method", "cbq", "--wbits", "4", "--abits", "8",
                 "--block", "16", "--steps", "4", "--rank", "2", "--calib-samples", "8", "--json"]) == 0
    assert main(["export", str(ck), "-o", str(out), "--json", "--accuracy-level", "0"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest, tensors = read_checkpoint(ck)
    assert rep["ops"]["QuantizeLinear"] == len(manifest.extra["activations"]) == 14
    tok = TextTokenizer(ck)
    seqs = [tok.encode_ids(s, special=False)[:24] for s in pydoc_sentences("evaluation")[:4]]
    model, _, _ = load_compressed(ck)
    plain, _, _ = load_compressed(ck, activations=False)
    lm = CausalLM(out, provider="cpu")
    for s in seqs:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([s])).logits[0].numpy()
            unq = plain(input_ids=torch.tensor([s])).logits[0].numpy()
        got = lm.logits(np.array(s))
        np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)
        assert np.abs(ref - unq).max() > 1e-4  # the quantisers are not a no-op
