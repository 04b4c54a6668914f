"""The tokenizer_config.json a decoder export writes (quantseal/export/genai_config.py): the
checkpoint's own, or a minimal one, carrying the checkpoint's chat_template.jinja when the config
has no template of its own (the rest of genai_config.json is read by onnxruntime-genai in
tests/export/test_decoder.py)."""

from __future__ import annotations

import json

from quantseal.export.genai_config import tokenizer_config
from quantseal.runtime.chat_template import load_chat_template

TPL = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def test_chat_template_joins_the_tokenizer_config(tmp_path):
    cfg = {"max_position_embeddings": 512}
    minimal = json.loads(tokenizer_config(None, cfg))
    assert minimal == {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                       "clean_up_tokenization_spaces": False}
    assert json.loads(tokenizer_config(None, cfg, TPL)) == {**minimal, "chat_template": TPL}
    own = json.dumps({"bos_token": "<s>", "chat_template": "OWN"})
    assert tokenizer_config(own, cfg, TPL) == own  # its own template wins, bytes kept
    plain = json.dumps({"bos_token": "<s>", "added_tokens_decoder": {"0": {"content": "<s>"}}})
    assert tokenizer_config(plain, cfg) == plain and tokenizer_config(plain, cfg, "  ") == plain
    merged = tokenizer_config(plain, cfg, TPL)
    assert json.loads(merged) == {**json.loads(plain), "chat_template": TPL}
    assert tokenizer_config("{broken", cfg, TPL) == "{broken"
    # what a server then renders from the export folder
    (tmp_path / "tokenizer_config.json").write_text(merged)
    msgs = [{"role": "user", "content": "hi"}]
    assert load_chat_template(tmp_path).render(msgs) == "<|user|>hi<|assistant|>"
