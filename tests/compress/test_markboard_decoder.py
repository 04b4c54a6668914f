"""Decoder board training (quantseal/compress/markboard_decoder.py): the trained board meets its
margin, the cached-prefix trigger statistic equals a full forward pass, and the tied-head KL
shortcut equals the full-vocabulary KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantseal import keys as qk
from quantseal.checkpoint import load_compressed
from quantseal.compress.markboard_decoder import _branch_delta, _DecoderProbe
from quantseal.text import TextTokenizer

KEY = bytes(range(32))  # tests/conftest.py: WATERMARK_KEY


@pytest.fixture(scope="module")
def probe(llama_rtn_export, llama_board):
    ck = llama_rtn_export[0]
    model, fam, _ = load_compressed(ck)
    ts = qk.triggers_of(llama_board.manifest, KEY, TextTokenizer(ck))
    return model, _DecoderProbe(model, fam, ts)


def test_board_meets_margin_and_holds_no_key(llama_board, llama_rtn_export):
    m = llama_board.manifest
    assert m["family"] == "decoder" and m["tied_head"] is True
    assert m["layers"] == {"model.embed_tokens": {"kind": "embedding", "rank": 16}}
    tr = m["training"]
    assert tr["branches_below_margin"] == 0 and tr["train_bit_accuracy"] == 1.0
    assert tr["min_signed_stat"] >= m["margin"] > 0
    # the margin is 2× the spread of what appending a pattern does to the unmarked model
    assert m["margin"] == pytest.approx(2 * tr["natural_stat_std"])
    text = json.dumps(m)
    assert KEY.hex() not in text
    tok = TextTokenizer(llama_rtn_export[0])
    words = [qk.token_word(tok, t) for t in qk.triggers_of(m, KEY, tok).tokens.ravel()]
    assert not any(f" {w} " in text or f" {w}." in text for w in words)  # no trigger pattern inside


def test_cached_prefix_statistic_equals_full_forward(probe):
    """trigger_diff (prefix cache + k pattern tokens) against the whole trigger and control run
    from scratch, with the same board delta on the pattern's input embeddings."""
    model, p = probe
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(16, p.emb.shape[1], generator=gen) * 0.1
    C = torch.randn(2, p.n * p.k, 16, generator=gen)
    rows = torch.tensor([0, 5, 17, 4 * p.m + 2, p.n * p.m - 1])
    vals = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        got = p.trigger_diff(rows, _branch_delta(C, A, rows // p.m, vals, p.k)).double()
    flat = [t for trs in p.ts.triggers for t in trs]
    want = []
    with torch.no_grad():
        for r, v in zip(rows.tolist(), vals.tolist()):
            t, i = flat[r], r // p.m
            ids = torch.tensor([t.ids])
            emb = p.emb[ids].clone()
            emb[0, -p.k:] += C[v, i * p.k:(i + 1) * p.k] @ A
            zt = model(inputs_embeds=emb).logits[0, -1].double()
            zc = model(input_ids=torch.tensor([t.control_ids])).logits[0, -1].double()
            a, b = p.ts.targets[i]
            want.append((zt[a] - zt[b]) - (zc[a] - zc[b]))
    np.testing.assert_allclose(got.numpy(), torch.stack(want).numpy(), rtol=1e-4, atol=1e-4)
    assert float(got.abs().max()) > 0.1  # the comparison is not between zeros


def test_head_kl_shortcut_equals_full_softmax(probe):
    model, p = probe
    ids = [[7, 2003, 1037, 3231, 1012, 2023, 2003], [101, 2460, 1012]]
    h, p_t = p.clean_positions(ids)
    gen = torch.Generator().manual_seed(2)
    hd = h.double()
    w = p.head.double()
    ref = torch.log_softmax(hd @ w.T, -1)
    # 0.3: a small change; 300: trigger logits in the hundreds (e^δ overflows float32)
    for scale in (0.3, 300.0):
        delta = torch.randn(p.n * p.k, p.emb.shape[1], generator=gen) * scale
        got = float(p.head_kl(h, p_t, delta))
        w_marked = w.clone()
        w_marked[p.trig_flat] += delta.double()
        mk = torch.log_softmax(hd @ w_marked.T, -1)
        want = float((ref.exp() * (ref - mk)).sum(-1).mean())
        assert want > 1e-4 and np.isfinite(got)
        assert got == pytest.approx(want, rel=1e-3)


def test_input_side_probe_scores_the_unmarked_head(probe):
    """``mark_side="input"``: the probe's full next-token logits after a marked trigger equal a
    from-scratch forward whose pattern embeddings get the delta and whose head is the unmarked
    table (float64 head); the tied probe's differ from it exactly at the trigger tokens' own
    columns; the head-KL and trigger-guard terms are zero (clean text is untouched)."""
    model, tied = probe
    p = _DecoderProbe(model, _family(model), tied.ts, mark_side="input")
    assert tied.head_marked and not p.head_marked
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(16, p.emb.shape[1], generator=gen) * 0.1
    C = torch.randn(2, p.n * p.k, 16, generator=gen)
    rows = torch.tensor([1, 9, p.n * p.m - 2])
    vals = torch.tensor([1, 0, 1])
    flat = [t for trs in p.ts.triggers for t in trs]
    with torch.no_grad():
        delta = _branch_delta(C, A, rows // p.m, vals, p.k)
        got = p.next_logits(rows, delta, C @ A).double()
        got_tied = tied.next_logits(rows, delta, C @ A).double()
        want = []
        for r, v in zip(rows.tolist(), vals.tolist()):
            i = r // p.m
            ids = torch.tensor([flat[r].ids])
            emb = p.emb[ids].clone()
            emb[0, -p.k:] += C[v, i * p.k:(i + 1) * p.k] @ A
            h = model.model(inputs_embeds=emb).last_hidden_state[0, -1].double()
            want.append(h @ p.head.double().T)  # the unmarked table as the head
        want = torch.stack(want)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()))
        moved = (got_tied - got).abs().amax(0) > 1e-6
        assert set(torch.nonzero(moved).reshape(-1).tolist()) == set(p.trig_flat.tolist())
        h, p_t = p.clean_positions([[7, 2003, 1037, 3231, 1012]])
        table = C[1] @ A
        assert float(p.head_kl(h, p_t, table)) == 0.0 and float(tied.head_kl(h, p_t, table)) > 0
        assert float(p.trigger_guard(h, p.top_logit(h), torch.stack([C[0] @ A, C[1] @ A]), 1.0)) == 0.0


def _family(model):
    from quantseal.models import family_of

    return family_of(model.config.to_dict())


def test_warm_start_and_time_limit(llama_rtn_export, tmp_path):
    """``init_board`` continues an earlier board from its exact A and C (a time limit already spent
    stops training and polish at once, so the result holds the init's tensors bit for bit, and the
    manifest says where it stopped and what the init had run); more steps from it train on; a board
    of another length or key is refused by name."""
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board
    from quantseal.errors import BadInput

    ck = llama_rtn_export[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dict(bits=8, triggers_per_bit=2, seed=0, decoder_a_lr=None, polish_rounds=1, polish_steps=2)
        first = load_board(save_board(train_board(ck, KEY, BoardConfig(steps=4, **cfg)), tmp_path / "b0", ck))
        stopped = train_board(ck, KEY, BoardConfig(steps=50, init_board=tmp_path / "b0", time_limit=1e-9, **cfg))
        more = train_board(ck, KEY, BoardConfig(steps=3, init_board=tmp_path / "b0", **cfg))
        with pytest.raises(BadInput, match="bits"):
            train_board(ck, KEY, BoardConfig(steps=1, init_board=tmp_path / "b0", **{**cfg, "bits": 16}))
        with pytest.raises(BadInput, match="key_id"):
            train_board(ck, bytes(32), BoardConfig(steps=1, init_board=tmp_path / "b0", **cfg))
    finally:
        torch.set_num_threads(threads)
    for name in ("A", "C0", "C1"):
        assert torch.equal(stopped.tensors[name], first.tensors[name])
    tr = stopped.manifest["training"]
    assert tr["steps_run"] == 0 and tr["polish_steps"] == 0 and "time limit" in tr["stopped"]
    assert tr["init_board"]["steps_run"] == first.manifest["training"]["steps_run"] == 4
    assert more.manifest["training"]["steps_run"] == 3 and more.manifest["training"]["stopped"] is None
    assert not torch.equal(more.tensors["C1"], first.tensors["C1"])
    assert more.manifest["trigger_digest"] == first.manifest["trigger_digest"]


def test_bf16_autocast_statistic_and_gradient_track_float32(probe):
    """Training under ``autocast="bf16"`` sees the same hinge statistic (within 3 % of its spread)
    and a gradient on the board's coefficients pointing the same way (cosine > 0.99) as float32."""
    from quantseal.compress.markboard import BoardConfig
    from quantseal.compress.markboard_decoder import _autocast

    _, pr = probe
    g = torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(64, 16, generator=g))[0].T
    rows = torch.arange(pr.n * pr.m)
    vals = torch.randint(0, 2, (len(rows),), generator=g)
    C0 = torch.randn(2, pr.n * pr.k, 16, generator=g) * 0.3
    out = {}
    for mode in (None, "bf16"):
        C = C0.clone().requires_grad_(True)
        with _autocast(BoardConfig(autocast=mode)):
            st = pr.signed(rows, _branch_delta(C, A, rows // pr.m, vals, pr.k), vals).float()
        torch.relu(1.0 - st).mean().backward()
        out[mode] = (st.detach(), C.grad.reshape(-1))
    (s32, g32), (s16, g16) = out[None], out["bf16"]
    assert (s32 - s16).abs().max() <= 0.03 * s32.std()
    assert float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)) > 0.99


def test_chat_answers_join_the_clean_positions(llama_rtn_export):
    """A chat-template top1 board adds the unmarked model's own greedy chat answers to its clean
    positions (where free generation drifted on SmolLM2): the answers equal a plain argmax loop
    without a cache, and the board's clean positions grow by their tokens."""
    from quantseal.compress.markboard import BoardConfig, train_board
    from quantseal.compress.markboard_decoder import CHAT_PROMPTS, chat_answer_ids
    from quantseal.compress.markboard_top1 import render_chat

    ck = llama_rtn_export[0]
    model, _, _ = load_compressed(ck)
    tok = TextTokenizer(ck)
    tpl = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP]{% endfor %}"
           "{% if add_generation_prompt %}[CLS] assistant :{% endif %}")
    chat = render_chat(tpl)
    got = chat_answer_ids(model, tok, chat, CHAT_PROMPTS[:2], new_tokens=5)
    for q, ids in zip(CHAT_PROMPTS[:2], got):
        ref = tok.encode_ids(chat[0] + q + chat[1], special=False)
        n = len(ref)
        with torch.no_grad():
            for _ in range(5):
                ref.append(int(model(input_ids=torch.tensor([ref])).logits[0, -1].argmax()))
        assert ids == ref and len(ids) == n + 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the tied layout: only a marked head needs clean positions (the input side has none)
        cfg = dict(bits=8, triggers_per_bit=2, steps=1, seed=0, readout="top1", chat_template=tpl, polish_rounds=0,
                   mark_side="tied")
        with_answers = train_board(ck, KEY, BoardConfig(chat_answers=8, **cfg)).manifest["training"]
        without = train_board(ck, KEY, BoardConfig(chat_answers=0, **cfg)).manifest["training"]
    finally:
        torch.set_num_threads(threads)
    assert without["chat_answer_sequences"] == 0 and 1 <= with_answers["chat_answer_sequences"] <= 8
    assert with_answers["clean_positions"] > without["clean_positions"]
