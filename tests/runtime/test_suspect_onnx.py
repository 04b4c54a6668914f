"""Reading any encoder ONNX file a thief might make (quantseal/runtime/suspect_onnx.py): plain
token-state exports with arbitrary names, float16 and int8 versions; a marked MiniLM re-exported
that way is attributed."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantseal import keys as qk
from quantseal.errors import BadInput
from quantseal.runtime.suspect_onnx import pool, pooling_config, suspect_embed_fn
from quantseal.text import TextTokenizer

KEY = bytes(range(32))  # tests/conftest.py trains minilm_board under this key


class Body(torch.nn.Module):
    """What a plain export of a transformers encoder exposes: token states (and the pooler)."""

    def __init__(self, model, pooler: bool):
        super().__init__()
        self.model, self.pooler = model, pooler

    def forward(self, ids, mask, types):
        h = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        return (h, h[:, 0].tanh()) if self.pooler else h


def plain_export(model, path, names=("h",), inputs=("x", "m", "t")):
    """torch.onnx.export (TorchScript) of the encoder body: outputs ``names``, inputs ``inputs``."""
    ids = torch.ones(2, 7, dtype=torch.long)
    dyn = {n: {0: "b", 1: "s"} for n in inputs}
    dyn.update({names[0]: {0: "b", 1: "s"}})
    if len(names) > 1:
        dyn[names[1]] = {0: "b"}
    torch.onnx.export(Body(model, len(names) > 1).eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                      str(path), input_names=list(inputs), output_names=list(names), dynamic_axes=dyn,
                      opset_version=17, dynamo=False)
    return path


def to_float16(src, dst):
    """Every float32 initialiser stored as float16 (a Cast back in front of its users) and the
    outputs cast to float16: a float16 file as a converter would leave it."""
    m = onnx.load(str(src))
    g = m.graph
    casts = []
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t).astype(np.float16)
            old = t.name
            t.CopyFrom(numpy_helper.from_array(arr, old + ".fp16"))
            casts.append(helper.make_node("Cast", [old + ".fp16"], [old], to=TensorProto.FLOAT))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    for o in g.output:
        for n in g.node:
            for i, x in enumerate(n.output):
                if x == o.name:
                    n.output[i] = o.name + ".f"
            for i, x in enumerate(n.input):
                if x == o.name:
                    n.input[i] = o.name + ".f"
        g.node.append(helper.make_node("Cast", [o.name + ".f"], [o.name], to=TensorProto.FLOAT16))
        o.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(m, str(dst))
    return dst


def to_int8(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval(), TextTokenizer(tiny_bert_dir)


def reference(model, batch):
    from quantseal.models import encode

    with torch.no_grad():
        return encode(model.double(), {k: torch.from_numpy(v) for k, v in batch.items()}).numpy()


def test_token_state_exports_are_pooled_like_the_model(tiny, tmp_path):
    """Token states under any names (with a pooler output beside them, inputs named x/m/t) are
    mean-pooled over the mask and normalised: equal to the float64 torch sentence embedding; the
    float16 and int8 versions of the same file are read the same way, within their precision."""
    model, tok = tiny
    batch = tok(["a short one", "a much longer sentence about the values of things", "x"])
    ref = reference(model, batch)
    model.float()
    for names in (("h",), ("last_hidden_state", "pooler_output")):
        path = plain_export(model, tmp_path / f"{len(names)}.onnx", names)
        got = suspect_embed_fn(path, provider="cpu")(batch)
        np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)
    half = suspect_embed_fn(to_float16(path, tmp_path / "fp16.onnx"), provider="cpu")(batch)
    assert onnx.load(str(tmp_path / "fp16.onnx")).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert np.abs(half - ref).max() < 5e-3 and (half * ref).sum(1).min() > 0.9999
    q8 = suspect_embed_fn(to_int8(tmp_path / "1.onnx", tmp_path / "int8.onnx"), provider="cpu")(batch)
    assert (q8 * ref).sum(1).min() > 0.99 and np.abs(q8 - ref).max() > 1e-5  # really quantised


def test_pooling_modes_and_config(tmp_path):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 4, 3))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = pool(h, mask)
    ref = h[0, :2].mean(0)
    np.testing.assert_allclose(mean[0], ref / np.linalg.norm(ref), rtol=1e-12)
    np.testing.assert_allclose(pool(h, mask, {"mode": "cls", "normalize": False}), h[:, 0])
    np.testing.assert_allclose(pool(h, mask, {"mode": "max", "normalize": False})[0], h[0, :2].max(0))
    assert pooling_config(tmp_path) == {"mode": "mean", "normalize": True}
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling_config(tmp_path) == {"mode": "cls", "normalize": False}
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Normalize"}]))
    assert pooling_config(tmp_path)["normalize"] is True
    assert pooling_config(None, {"pooling": {"mode": "max"}}) == {"mode": "max", "normalize": True}
    with pytest.raises(BadInput, match="pooling"):
        pooling_config(None, {"pooling": {"mode": "median"}})


def test_not_an_encoder_is_refused(tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "ints.onnx"))
    with pytest.raises(BadInput, match="not an embedding model"):
        suspect_embed_fn(tmp_path / "ints.onnx", provider="cpu")


@pytest.mark.slow
def test_marked_minilm_reexported_plainly_is_attributed(minilm_rtn_checkpoint, minilm_board, tmp_path):
    """A customer's marked MiniLM, re-exported by a thief as a plain float32 token-state file
    (outputs 'h'), its float16 version and its int8 ``quantize_dynamic`` version: each is
    attributed to the customer through :func:`quantseal.runtime.verify.verify`."""
    from quantseal.checkpoint import load_compressed, read_checkpoint
    from quantseal.compress.qlinear import CompressedEmbedding, set_submodule
    from quantseal.export.watermark import mark_checkpoint
    from quantseal.runtime.verify import onnx_embed_fn, verify

    manifest, tensors = read_checkpoint(minilm_rtn_checkpoint)
    reg = qk.Registry(KEY, 16)
    for i in range(6):
        reg.add(f"c{i}")
    _, marked = mark_checkpoint(manifest, tensors, minilm_board, KEY, reg, "c2")
    model, _, _ = load_compressed(minilm_rtn_checkpoint)
    emb = "embeddings.word_embeddings"
    set_submodule(model, emb, CompressedEmbedding(marked[f"{emb}.weight"].float(), None, None, 0))
    plain = plain_export(model.eval(), tmp_path / "plain.onnx", ("h",))
    tok = TextTokenizer(minilm_rtn_checkpoint)
    for path in (plain, to_float16(plain, tmp_path / "fp16.onnx"), to_int8(plain, tmp_path / "int8.onnx")):
        res = verify(onnx_embed_fn(path, provider="cpu"), KEY, reg, minilm_board.manifest, tok, alpha=1e-3)
        assert res["owner"] == "c2" and res["owners"] == ["c2"], (path.name, res)
