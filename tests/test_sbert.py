"""sentence-transformers conventions of a model folder (quantseal/sbert.py): real files of the
bundled all-MiniLM-L6-v2, and small folders written here for the other layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantseal.errors import BadInput, Unsupported
from quantseal.sbert import Conventions, convention_files, pooling_modes, read_conventions


def _folder(tmp_path: Path, modules=None, sbert=None, pooling=None, config=None, tokenizer_config=None) -> Path:
    f = tmp_path / "m"
    f.mkdir(parents=True)
    (f / "config.json").write_text(json.dumps(config or {"model_type": "bert", "max_position_embeddings": 512}))
    if modules is not None:
        (f / "modules.json").write_text(json.dumps(modules))
    if sbert is not None:
        (f / "sentence_bert_config.json").write_text(json.dumps(sbert))
    if pooling is not None:
        (f / "1_Pooling").mkdir()
        (f / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if tokenizer_config is not None:
        (f / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return f


ST_CHAIN = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def test_bundled_minilm(minilm_path):
    c = read_conventions(minilm_path)
    assert (c.pooling, c.normalize, c.max_seq_length, c.do_lower_case) == (("mean",), True, 256, False)
    assert c.max_positions == 512 and c.source == "sentence-transformers"
    assert c.pooling_name == "mean+l2"
    assert convention_files(minilm_path) == ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]


def test_metadata_round_trip():
    c = Conventions(pooling=("cls", "max"), normalize=False, max_seq_length=77, do_lower_case=True,
                    max_positions=128, source="sentence-transformers")
    assert Conventions.from_metadata(c.metadata()) == c
    legacy = Conventions.from_metadata({})  # a file exported before the keys existed
    assert (legacy.pooling, legacy.normalize, legacy.max_seq_length, legacy.source) == (("mean",), True, 128, "legacy")


def test_legacy_and_new_pooling_spellings():
    assert pooling_modes({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}) == ("cls", "mean")
    assert pooling_modes({"pooling_mode": "max"}) == ("max",)
    assert pooling_modes({"pooling_mode": ["mean_sqrt_len_tokens", "cls"]}) == ("mean_sqrt_len_tokens", "cls")
    with pytest.raises(Unsupported, match="weightedmean"):
        pooling_modes({"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(Unsupported, match="include_prompt"):
        pooling_modes({"pooling_mode": "mean", "include_prompt": False})
    with pytest.raises(BadInput, match="no pooling mode"):
        pooling_modes({"pooling_mode_mean_tokens": False})


def test_chain_without_normalize_and_with_cls(tmp_path):
    f = _folder(tmp_path, ST_CHAIN, {"max_seq_length": 384, "do_lower_case": True},
                {"word_embedding_dimension": 64, "pooling_mode_cls_token": True})
    c = read_conventions(f)
    assert (c.pooling, c.normalize, c.max_seq_length, c.do_lower_case) == (("cls",), False, 384, True)
    assert c.pooling_name == "cls"


def test_plain_hf_folder_follows_sentence_transformers_defaults(tmp_path, tiny_bert_dir):
    """No modules.json: mean pooling, length = min(tokenizer model_max_length, max positions)."""
    c = read_conventions(_folder(tmp_path, tokenizer_config={"model_max_length": 300}))
    assert (c.pooling, c.max_seq_length, c.source) == (("mean",), 300, "default")
    c = read_conventions(tiny_bert_dir)  # no tokenizer_config.json; max_position_embeddings 128
    assert (c.pooling, c.max_seq_length, c.max_positions) == (("mean",), 128, 128)
    assert convention_files(tiny_bert_dir) == []


def test_missing_max_seq_length_uses_the_tokenizer_rule(tmp_path):
    f = _folder(tmp_path, ST_CHAIN + [NORMALIZE], {"do_lower_case": False}, {"pooling_mode": "mean"},
                tokenizer_config={"model_max_length": 1e30})  # transformers' "no limit"
    assert read_conventions(f).max_seq_length == 512


def test_refusals(tmp_path):
    dense = ST_CHAIN + [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(Unsupported, match="Dense"):
        read_conventions(_folder(tmp_path / "a", dense, {"max_seq_length": 128}, {"pooling_mode": "mean"}))
    with pytest.raises(Unsupported, match="no Pooling"):
        read_conventions(_folder(tmp_path / "b", ST_CHAIN[:1], {"max_seq_length": 128}))
    bad = _folder(tmp_path / "c")
    (bad / "modules.json").write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_conventions(bad)
    with pytest.raises(BadInput, match="list of"):
        read_conventions(_folder(tmp_path / "d", {"type": "x"}))
    escape = [ST_CHAIN[0], {**ST_CHAIN[1], "path": "../../elsewhere"}]
    with pytest.raises(BadInput, match="outside the model folder"):
        convention_files(_folder(tmp_path / "e", escape))
