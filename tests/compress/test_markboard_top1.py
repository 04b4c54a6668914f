"""The top1 decoder board's pieces: chat-template rendering and files, trigger contexts, target
choice among the unmarked model's plausible words, and the top-1 lead statistic against a
brute-force float64 reference (the training itself runs in tests/runtime/test_openai_client.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantseal import keys as qk
from quantseal.compress.markboard_top1 import (choose_targets, read_chat_template, render_chat, text_word_tokens,
                                               trigger_contexts)
from quantseal.errors import BadInput
from quantseal.text import TextTokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
KEY = bytes(range(32))


def test_render_chat_splits_around_the_user_message():
    assert render_chat(CHATML) == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    with_system = ("{% if messages[0]['role'] != 'system' %}SYS: be brief\n{% endif %}"
                   "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert render_chat(with_system) == ("SYS: be brief\n[user] ", "\n[assistant]")
    for bad in ("{{ messages[0]['content'] }}{{ messages[0]['content'] }}", "no message", "{% if %}",
                "{{ raise_exception('no user turns') }}"):
        with pytest.raises(BadInput):
            render_chat(bad)


def test_read_chat_template_from_files(tmp_path):
    (tmp_path / "a.jinja").write_text(CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert read_chat_template(tmp_path / "a.jinja") == CHATML
    assert read_chat_template(tmp_path / "tokenizer_config.json") == CHATML
    assert read_chat_template(tmp_path) == CHATML  # a model folder: its tokenizer_config.json
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                   {"name": "default", "template": CHATML}]}))
    assert read_chat_template(named) == CHATML
    (tmp_path / "none.json").write_text(json.dumps({"bos_token": "<s>"}))
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "none.json", tmp_path / "missing.jinja", tmp_path / "empty"):
        with pytest.raises(BadInput):
            read_chat_template(bad)


@pytest.fixture(scope="module")
def tok(minilm_path):
    return TextTokenizer(minilm_path)


@pytest.fixture(scope="module")
def ts(tok):
    from quantseal.compress.markboard import board_hosts

    return qk.derive_triggers(KEY, tok, 8, board_hosts(tok), 3, 2, 0, position="end")


def test_trigger_contexts_hold_the_pattern_once(tok, ts):
    """Plain: the prefix is the control and nothing follows the pattern; chat: the templated text
    tokenised whole is prefix + pattern + the template's tail, the same tail for every trigger."""
    chat = render_chat(CHATML)
    plain, templated = trigger_contexts(tok, ts, None), trigger_contexts(tok, ts, chat)
    flat = [t for trs in ts.triggers for t in trs]
    assert len(plain) == len(templated) == len(flat) == 24
    tails = set()
    for t, (p, s), (cp, cs), bit in zip(flat, plain, templated, [i for i in range(8) for _ in range(3)]):
        pat = [int(x) for x in ts.tokens[bit]]
        assert p == list(t.control_ids) and s == [] and p + pat == list(t.ids)
        assert cp + pat + cs == tok.encode_ids(chat[0] + t.text + chat[1], special=False)
        assert list(qk.context_ids(tok, t, chat)) == cp + pat + cs and not set(pat) & set(cp + cs)
        tails.add(tuple(cs))
    assert len(tails) == 1 and len(next(iter(tails))) > 0


def test_targets_are_drawn_among_the_most_plausible_words(tok):
    """choose_targets against a brute-force reading: both targets among the K best allowed tokens
    of the bit's scores, words distinct case-insensitively, the draw fixed by the key and
    different under another key; disallowed tokens (here: all but letters-only words) never chosen."""
    vocab = tok.vocab_size
    allowed = text_word_tokens(tok, vocab, exclude=[2000, 2001])
    assert not allowed[[2000, 2001]].any() and allowed.sum() > 10000
    assert not allowed[tok.token_to_id("[CLS]")] and not allowed[tok.token_to_id("##ing")]
    assert allowed[tok.token_to_id("house")]
    rng = np.random.default_rng(0)
    logp = rng.standard_normal((12, vocab))
    got = choose_targets(KEY, tok, logp, allowed, candidates=8)
    assert got.shape == (12, 2) and np.array_equal(got, choose_targets(KEY, tok, logp, allowed, candidates=8))
    for i, (a, b) in enumerate(got):
        best = [int(t) for t in np.argsort(-np.where(allowed, logp[i], -np.inf))[:8]]
        assert a in best and b in best and a != b
        assert qk.token_word(tok, a).lower() != qk.token_word(tok, b).lower()
    other = choose_targets(bytes(32), tok, logp, allowed, candidates=8)
    assert (other != got).any()
    with pytest.raises(BadInput):
        choose_targets(KEY, tok, logp, np.zeros(vocab, dtype=bool), candidates=8)


def test_top1_lead_matches_a_float64_reference(tiny_llama_dir, tok):
    """The probe's top-1 lead z[t] − max_{v≠t} z[v] after a templated trigger whose pattern rows
    carry a delta (and, tied, whose head rows do too) equals a full float64 forward of the model
    with that delta in its table."""
    from transformers import LlamaForCausalLM

    from quantseal.compress.markboard import board_hosts
    from quantseal.compress.markboard_decoder import _DecoderProbe
    from quantseal.models import DECODER

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tset = qk.derive_triggers(KEY, tok, 4, board_hosts(tok), 2, 2, 0, position="end")
    chat = render_chat(CHATML)
    probe = _DecoderProbe(model, DECODER, tset, contexts=trigger_contexts(tok, tset, chat), readout="top1")
    targets = np.array([[2000 + 2 * i, 2001 + 2 * i] for i in range(4)])
    probe.set_targets(targets)
    rows = torch.arange(8)
    delta = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    vals = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0])
    with torch.no_grad():
        got = probe.top1_margin(rows, delta, vals).double()
    ref = model.double()
    for r in range(8):
        bit = r // 2
        t = tset.triggers[bit][r % 2]
        table = ref.model.embed_tokens.weight.clone()
        table[torch.from_numpy(tset.tokens[bit])] += delta[r].double()
        ids = torch.tensor([qk.context_ids(tok, t, chat)])
        with torch.no_grad():
            h = ref.model(inputs_embeds=table[ids]).last_hidden_state[0, -1]
            z = h @ table.T  # tied head: the marked table
        tgt = int(targets[bit, 0 if vals[r] else 1])
        lead = z[tgt] - torch.cat([z[:tgt], z[tgt + 1:]]).max()
        assert float(got[r]) == pytest.approx(float(lead), abs=2e-4)


def test_trigger_guard_matches_brute_force(tiny_llama_dir, tok):
    """The guard Σ relu(h·(E[t] + D_b[t]) − top + gap), averaged over positions, against a loop over
    positions, branches and trigger tokens in float64 with the top-1 logit from the full vocabulary;
    zero once every marked trigger logit sits ``gap`` below the top."""
    from transformers import LlamaForCausalLM

    from quantseal.compress.markboard import board_hosts
    from quantseal.compress.markboard_decoder import _DecoderProbe
    from quantseal.models import DECODER

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tset = qk.derive_triggers(KEY, tok, 3, board_hosts(tok), 2, 2, 0, position="end")
    probe = _DecoderProbe(model, DECODER, tset, contexts=trigger_contexts(tok, tset, None), readout="top1")
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 64, generator=g) * 3
    branches = torch.randn(2, 6, 64, generator=g) * 0.3
    top = probe.top_logit(h)
    table = model.model.embed_tokens.weight.detach().double()
    assert torch.allclose(top.double(), (h.double() @ table.T).max(-1).values, atol=1e-4)
    want = 0.0
    for p in range(5):
        for b in range(2):
            for j, t in enumerate(tset.tokens.reshape(-1)):
                z = float(h[p].double() @ (table[int(t)] + branches[b, j].double()))
                want += max(0.0, z - float(top[p]) + 0.5)
    got = float(probe.trigger_guard(h, top, branches, 0.5))
    assert want > 0 and got == pytest.approx(want / 5, rel=1e-4)
    assert float(probe.trigger_guard(h, top + 100.0, branches, 0.5)) == 0.0
