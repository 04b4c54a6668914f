"""A model folder's chat template (quantseal/runtime/chat_template.py): where it is found, and its
rendering equal to transformers' ``apply_chat_template`` (the reference vLLM also follows)."""

from __future__ import annotations

import json

import pytest

from quantseal.errors import BadInput
from quantseal.runtime.chat_template import load_chat_template

# SmolLM2's template, as its tokenizer_config.json carries it (a system prompt when none is given)
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "[{{ m['role'] | upper }}] {{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
         "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."},
            {"role": "assistant", "content": "  Red, green, blue. "},
            {"role": "user", "content": "And one more?"}]


def _reference(template: str, messages, **special) -> str:
    """transformers' own rendering (``tokenize=False``) of ``messages`` with ``template``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  chat_template=template, **special)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_renders_as_transformers_does(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOL}))
    tpl = load_chat_template(tmp_path)
    assert tpl.render(MESSAGES) == _reference(SMOL, MESSAGES)
    assert tpl.render(MESSAGES[:1]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert tpl.render(MESSAGES[:1]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # bos/eos as AddedToken objects, a template that strips, uppercases and refuses bad role orders
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA, "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    tpl = load_chat_template(tmp_path)
    want = _reference(LLAMA, MESSAGES, bos_token="<s>", eos_token="</s>")
    assert tpl.render(MESSAGES) == want and want.startswith("<s>[USER] Name") and "blue.</s>[USER] And" in want
    with pytest.raises(ValueError, match="roles must alternate"):
        tpl.render(MESSAGES[1:])


def test_where_the_template_comes_from(tmp_path):
    assert load_chat_template(tmp_path) is None  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None  # one without a template
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}DEFAULT"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": "<s>"}))
    assert load_chat_template(tmp_path).render(MESSAGES) == "<s>DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}JINJA FILE")  # beats tokenizer_config.json
    assert load_chat_template(tmp_path).render(MESSAGES) == "<s>JINJA FILE"
    other = tmp_path / "other.jinja"
    other.write_text("EXPLICIT {{ messages[0]['content'] }}")  # an explicit file beats both
    assert load_chat_template(tmp_path, other).render(MESSAGES) == "EXPLICIT " + MESSAGES[0]["content"]
    cfg = tmp_path / "sub" / "tokenizer_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"chat_template": "{{ eos_token }}X", "eos_token": "</e>"}))
    assert load_chat_template(tmp_path, cfg).render(MESSAGES) == "</e>X"  # its own special tokens


@pytest.mark.parametrize("setup, match", [
    (lambda d: None, "no such chat template file"),
    (lambda d: (d / "t.jinja").write_text("  \n"), "empty chat template"),
    (lambda d: (d / "t.jinja").write_text("{% for %}"), "not a valid Jinja template"),
])
def test_bad_explicit_files_are_refused(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(BadInput, match=match):
        load_chat_template(tmp_path, tmp_path / "t.jinja")


def test_bad_folder_files_are_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(BadInput, match="not readable JSON"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(BadInput, match="no chat_template"):
        load_chat_template(tmp_path, tmp_path / "x.json")
