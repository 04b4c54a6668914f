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
