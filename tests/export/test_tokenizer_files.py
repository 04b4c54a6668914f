"""The tokenizer files an encoder export writes beside model.onnx
(quantseal/export/tokenizer_files.py): ``transformers.AutoTokenizer`` loads the export folder and
gives exactly the inputs the graph takes, truncated where sentence-transformers truncates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantseal.errors import BadInput
from quantseal.export.tokenizer_files import companion_files
from quantseal.runtime.pipelines import Embedder
from quantseal.runtime.session import Session


def test_auto_tokenizer_gives_the_graph_inputs(minilm_rtn_onnx, minilm_path):
    transformers = pytest.importorskip("transformers")
    st = pytest.importorskip("sentence_transformers")
    folder = minilm_rtn_onnx.parent
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    sess = Session(minilm_rtn_onnx, provider="cpu")
    assert list(tok.model_input_names) == ["input_ids", "token_type_ids", "attention_mask"]
    assert set(tok.model_input_names) == set(sess.input_names)
    assert tok.model_max_length == 256
    texts = ["A short one.", " ".join(["tokenisation"] * 200), "Two sentences. And a second one!"]
    enc = tok(texts, padding=True, truncation=True, return_tensors="np")
    assert enc["input_ids"].shape == (3, 256)  # "tokenisation" is 3 word pieces: cut at model_max_length

    # the same ids, types and mask as sentence-transformers' own tokenizer of the source model ...
    model = st.SentenceTransformer(str(minilm_path), device="cpu")
    ref = model.tokenize(texts)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(enc[k], ref[k].numpy())
    # ... and feeding them straight to onnxruntime gives what the runtime's Embedder gives
    out = sess.run({k: enc[k].astype(np.int64) for k in sess.input_names}, ["sentence_embedding"])
    np.testing.assert_allclose(out["sentence_embedding"], Embedder(minilm_rtn_onnx, provider="cpu").embed(texts),
                               atol=1e-6)

    # sentence-transformers itself loads the export folder as its tokenizer: same length, same inputs
    from sentence_transformers.base.modules.transformer import Transformer

    st_tok = Transformer(str(minilm_path), tokenizer_name_or_path=str(folder))
    assert st_tok.max_seq_length == 256
    feats = st_tok.tokenize(texts)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(enc[k], feats[k].numpy())

    sb = json.loads((folder / "sentence_bert_config.json").read_text())
    assert sb == {"max_seq_length": 256, "do_lower_case": False}


def _model(inputs, meta: dict) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0]], ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1])])
    m = helper.make_model(graph)
    for k, v in meta.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return m


def test_companion_files_follow_the_graph_and_metadata(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    # a decoder (no encoder conventions in its metadata): nothing added
    assert companion_files(tmp_path / "tokenizer.json", _model(["input_ids"], {"quantseal.family": "decoder"})) == {}
    # a graph without token types, a source without tokenizer_config.json, lowercasing on
    meta = {"quantseal.max_seq_length": "77", "quantseal.do_lower_case": "true", "quantseal.pooling": "cls"}
    files = companion_files(tmp_path / "tokenizer.json", _model(["input_ids", "attention_mask"], meta))
    assert sorted(files) == ["sentence_bert_config.json", "tokenizer_config.json"]
    assert json.loads(files["tokenizer_config.json"]) == {"model_input_names": ["input_ids", "attention_mask"],
                                                          "model_max_length": 77}
    assert json.loads(files["sentence_bert_config.json"]) == {"max_seq_length": 77, "do_lower_case": True}
    # the source's tokenizer_config.json is kept, its two fields overwritten; vocab and map copied as they are
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                "model_max_length": 512}))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    files = companion_files(tmp_path / "tokenizer.json",
                            _model(["input_ids", "attention_mask", "token_type_ids"], meta))
    assert json.loads(files["tokenizer_config.json"]) == {
        "tokenizer_class": "BertTokenizer", "model_max_length": 77,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    assert files["vocab.txt"] == b"[PAD]\n[UNK]\n"
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(BadInput, match="not valid JSON"):
        companion_files(tmp_path / "tokenizer.json", _model(["input_ids"], meta))
