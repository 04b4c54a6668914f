"""Fixtures of the streamed-compress tests: tiny seeded LLaMAs at several depths, a spill recorder."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=30522, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory, minilm_path):
    """``get(n)``: a seeded tiny LLaMA folder of n blocks (hidden 64, GQA 4/2, tied table; the
    shape of tests/conftest.py's tiny_llama_dir, with one sharp v_proj row per block, so CFP gives
    A4/A8 o_proj an explicit input scale), built on first use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_llamas")
    made: dict[int, Path] = {}

    def get(n: int) -> Path:
        if n not in made:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, **TINY_LLAMA)).eval()
            with torch.no_grad():  # an outlier channel in o_proj's input
                for layer in model.model.layers:
                    layer.self_attn.v_proj.weight[3] *= 30
            made[n] = root / f"l{n}"
            model.save_pretrained(made[n], safe_serialization=True)
            shutil.copyfile(minilm_path / "tokenizer.json", made[n] / "tokenizer.json")
        return made[n]

    return get


@pytest.fixture
def spill_record(monkeypatch):
    """Every :class:`SpillStore`'s spill count after each append (``.spilled``) and the spill
    folders this test's own runs made (``.folders``): other processes (pytest-xdist workers) make
    theirs in the same temporary directory, so a test checks only these."""
    from quantseal.compress.spill import SpillStore

    rec = SimpleNamespace(spilled=[], folders=[])
    real_append, real_dir = SpillStore.append, SpillStore._dir

    def counting_append(self, t):
        real_append(self, t)
        rec.spilled.append(self.spilled)

    def recorded_dir(self):
        rec.folders.append(real_dir(self))
        return rec.folders[-1]

    monkeypatch.setattr(SpillStore, "append", counting_append)
    monkeypatch.setattr(SpillStore, "_dir", recorded_dir)
    return rec
