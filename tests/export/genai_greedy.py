"""Greedy decoding through onnxruntime-genai on CPU: the runtime on-device apps use, reading an
export folder (``model.onnx`` + ``genai_config.json`` + tokenizer files) unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest


def og_greedy(folder: str | Path, prompt: list[int], new_tokens: int, inputs: dict | None = None) -> list[int]:
    """The new token ids of ``og.Generator``'s greedy search (it stops early at EOS); the test is
    skipped where onnxruntime-genai is not installed.  ``inputs``: extra model inputs
    (``Generator.set_model_input``, e.g. a switchable export's ``adapter_id``)."""
    og = pytest.importorskip("onnxruntime_genai")
    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    gen = og.Generator(model, params)
    for name, value in (inputs or {}).items():
        gen.set_model_input(name, value)
    gen.append_tokens(list(prompt))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
