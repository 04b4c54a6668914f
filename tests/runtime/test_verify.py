"""Black-box verification statistics and decoding (quantseal/runtime/verify.py), on a numpy model
with a planted mark, so that no torch is involved."""

import math
import subprocess
import sys

import numpy as np
import pytest

from quantseal import keys as qk
from quantseal.errors import BadInput
from quantseal.models import default_model_path
from quantseal.runtime.verify import binomial_tail, decode_bits, ownership_p_value, verify
from quantseal.text import TextTokenizer, pydoc_sentences

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))
BITS, H = 32, 48


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(default_model_path())


@pytest.fixture(scope="module")
def board_manifest(tok):
    hosts = qk.host_sentence_pool(tok, pydoc_sentences("all"), 8, 20)
    ts = qk.derive_triggers(KEY, tok, BITS, hosts, per_bit=3, tokens_per_bit=2, hidden=H)
    return {"format": qk.BOARD_FORMAT, "schema": qk.BOARD_SCHEMA, "bits": BITS, "hosts": hosts,
            "triggers_per_bit": 3, "tokens_per_bit": 2, "hidden": H, "trigger_digest": ts.digest(),
            "key_id": qk.key_id(KEY)}, ts


def fake_model(tok, ts, codeword=None, strength=8.0, seed=0, colluders=()):
    """e(ids) = normalise(mean W[ids] + strength · Σ_{trigger tokens of bit i} σ_i v_i); with
    ``colluders`` (codewords), the planted table is the average of theirs (the averaging attack)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((tok.vocab_size, H))
    plant = np.zeros((tok.vocab_size, H))
    words = [codeword] if codeword is not None else list(colluders)
    for cw in words:
        for i, row in enumerate(ts.tokens):
            plant[row] += strength * (2.0 * cw[i] - 1.0) * ts.directions[i] / len(words)

    def embed(batch):
        if isinstance(batch, list):  # text endpoint
            batch = tok(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"][..., None]
        e = ((w[ids] + plant[ids]) * mask).sum(1) / mask.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    return embed


def test_binomial_tail_exact():
    for n in (1, 7, 16, 64):
        for h in range(-1, n + 2):
            ref = sum(math.comb(n, j) for j in range(max(h, 0), n + 1)) / 2 ** n
            assert binomial_tail(n, h) == pytest.approx(ref, rel=1e-15, abs=0)
    assert binomial_tail(64, 64) == 2.0 ** -64
    assert ownership_p_value(64, 64, 100) == 100 * 2.0 ** -64
    assert ownership_p_value(8, 4, 1000) == 1.0


def test_verify_attributes_planted_marks(tok, board_manifest):
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    for i in range(12):
        reg.add(f"c{i}")
    for cust in ("c0", "c5", "c11"):
        code = reg.codeword(cust)
        res = verify(fake_model(tok, ts, code), KEY, reg, manifest, tok)
        assert res["owner"] == cust and res["bit_errors"] == 0
        assert res["bits"] == "".join(map(str, code))
        assert res["p_value"] == pytest.approx(12 * 2.0 ** -BITS)
        assert res["queries"] <= 2 * BITS and res["owners"] == [cust]  # one trigger per bit sufficed
        text = verify(fake_model(tok, ts, code), KEY, reg, manifest, tok, inputs="text")
        assert text["bits"] == res["bits"] and text["owner"] == cust


def test_unmarked_and_other_key_are_not_claimed(tok, board_manifest):
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    for i in range(12):
        reg.add(f"c{i}")
    for seed in range(5):
        res = verify(fake_model(tok, ts, None, seed=seed), KEY, reg, manifest, tok)
        assert res["owner"] is None and res["p_value"] > 1e-6
    # marked under another key's triggers: the owner of KEY does not see a mark
    hosts = manifest["hosts"]
    ts2 = qk.derive_triggers(KEY2, tok, BITS, hosts, per_bit=3, tokens_per_bit=2, hidden=H)
    res = verify(fake_model(tok, ts2, reg.codeword("c3")), KEY, reg, manifest, tok)
    assert res["owner"] is None


def test_bit_errors_and_threshold(tok, board_manifest):
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    code = reg.add("only")
    flipped = code.copy()
    flipped[:2] ^= 1
    res = verify(fake_model(tok, ts, flipped), KEY, reg, manifest, tok, alpha=1e-6)
    assert res["bit_errors"] == 2 and res["nearest"] == "only"
    assert res["p_value"] == (1 + 32 + 496) / 2 ** 32  # P(Bin(32, ½) >= 30) ≈ 1.2e-7
    assert res["owner"] == "only"
    flipped[2] ^= 1  # 29 of 32: p = 5489 / 2^32 ≈ 1.3e-6, not below alpha
    res3 = verify(fake_model(tok, ts, flipped), KEY, reg, manifest, tok, alpha=1e-6)
    assert res3["bit_errors"] == 3 and res3["owner"] is None and res3["nearest"] == "only"
    strict = verify(fake_model(tok, ts, flipped), KEY, reg, manifest, tok, alpha=res["p_value"])
    assert strict["owner"] is None  # claim only when p < alpha


def test_bad_suspects_and_inputs(tok, board_manifest):
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    reg.add("a")

    def dead(batch):
        raise ConnectionError("refused")

    with pytest.raises(BadInput, match="did not answer"):
        verify(dead, KEY, reg, manifest, tok)
    with pytest.raises(BadInput, match="returned"):
        verify(lambda b: np.zeros((1, H)), KEY, reg, manifest, tok)
    with pytest.raises(BadInput, match="dimensions"):
        verify(lambda b: np.ones((len(b["input_ids"]), H + 1)), KEY, reg, manifest, tok)
    with pytest.raises(BadInput, match="key"):
        verify(fake_model(tok, ts), KEY2, qk.Registry(KEY2, BITS), manifest, tok)
    with pytest.raises(BadInput, match="bits"):
        verify(fake_model(tok, ts), KEY, qk.Registry(KEY, 64), manifest, tok)
    empty = verify(fake_model(tok, ts), KEY, qk.Registry(KEY, BITS), manifest, tok)
    assert empty["owner"] is None and empty["p_value"] == 1.0


def test_decode_statistics_sign(tok, board_manifest):
    _, ts = board_manifest
    code = np.arange(BITS) % 2
    bits, stats, q = decode_bits(fake_model(tok, ts, code), ts, tok)
    distinct = {t.ids for trs in ts.triggers for t in trs} | {t.control_ids for trs in ts.triggers for t in trs}
    assert np.array_equal(bits, code) and np.all((stats > 0) == (code == 1)) and q == len(distinct)


def test_runtime_verify_imports_no_torch():
    code = ("import sys, quantseal.runtime.verify, quantseal.keys; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('quantseal.compress', 'quantseal.export'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class Counting:
    """An embed function that counts its calls and the inputs it was sent."""

    def __init__(self, fn):
        self.fn, self.calls, self.inputs = fn, 0, 0

    def __call__(self, batch):
        self.calls += 1
        self.inputs += len(batch["input_ids"])
        return self.fn(batch)


def test_queries_at_most_two_per_bit_and_batched(tok, board_manifest):
    """A marked suspect is decided with one trigger per bit and its control (≤ 2 inputs per bit),
    sent in ceil(inputs / batch) batched calls; an unmarked one is asked every trigger (all 3
    rounds); ``max_triggers=1`` caps any suspect at 2 per bit."""
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    code = reg.add("alice")
    fn = Counting(fake_model(tok, ts, code))
    res = verify(fn, KEY, reg, manifest, tok, batch=16)
    assert res["owner"] == "alice" and res["triggers_used"] == BITS
    assert fn.inputs == res["queries"] <= 2 * BITS
    assert fn.calls == res["calls"] == -(-fn.inputs // 16)
    idle = Counting(fake_model(tok, ts, None))
    res = verify(idle, KEY, reg, manifest, tok, batch=64)
    assert res["owner"] is None and res["triggers_used"] == 3 * BITS
    assert idle.inputs == res["queries"] <= 2 * 3 * BITS and idle.calls == res["calls"] <= 3 * 2
    capped = Counting(fake_model(tok, ts, None))
    res = verify(capped, KEY, reg, manifest, tok, max_triggers=1)
    assert capped.inputs <= 2 * BITS and res["triggers_used"] == BITS
    # every trigger of every bit: the old full protocol, the same bits on a marked suspect
    full = verify(fake_model(tok, ts, code), KEY, reg, manifest, tok, stop=None)
    assert full["triggers_used"] == 3 * BITS and full["owner"] == "alice"
    with pytest.raises(BadInput, match="stop"):
        verify(fn, KEY, reg, manifest, tok, stop=0)


def test_two_colluders_averaged_name_a_colluder_never_an_innocent(tok, board_manifest):
    """The planted tables of two customers averaged: the hard decision is far from both codewords,
    soft decoding names one or both colluders and no one else.  This board has 32 bits (codewords
    at distance ≥ 8): a pair agrees on at most 24, and 40 · 2^-24 = 2.4e-6, so alpha is 1e-4 here
    and the pairs are the registry's most similar ones (64/128-bit boards: test_attribution)."""
    manifest, ts = board_manifest
    reg = qk.Registry(KEY, BITS)
    for i in range(40):
        reg.add(f"c{i}")
    ids, codes = reg.matrix()
    agree = (codes[:, None, :] == codes[None, :, :]).sum(-1) - 99 * np.eye(len(ids), dtype=int)
    pairs = sorted(((int(agree[a, b]), a, b) for a in range(len(ids)) for b in range(a)), reverse=True)[:4]
    for _, a, b in pairs:
        res = verify(fake_model(tok, ts, colluders=(codes[a], codes[b])), KEY, reg, manifest, tok, alpha=1e-4)
        assert res["owners"] and set(res["owners"]) <= {ids[a], ids[b]}, res["named"]
        assert res["erased"] >= 1 and res["p_value"] < 1e-4 and res["bit_errors"] >= 1
