"""Soft-decision attribution (quantseal/runtime/attribution.py): exact null tails against brute
force, no innocent named over many random codewords, colluders named from averaged statistics."""

import itertools
import math

import numpy as np
import pytest

from quantseal.errors import BadInput
from quantseal.runtime.attribution import (DEFAULT_LEVELS, NullTail, SoftConfig, attribute, scores, soft_weights,
                                           subset_sum_counts)

MU = 0.15


def brute_tail(weights, s):
    """P(Σ_i w_i·x_i ≥ s), x uniform on {0,1}^n, by enumerating all 2^n codewords (float64 sums)."""
    n = len(weights)
    hits = sum(1 for x in itertools.product((0, 1), repeat=n) if sum(w * b for w, b in zip(weights, x)) >= s)
    return hits / 2 ** n


def test_null_tail_equals_enumeration():
    rng = np.random.default_rng(0)
    for n in (1, 3, 6, 10):
        for _ in range(4):
            w = rng.integers(0, 6, n)
            null = NullTail(w)
            for s in range(-1, int(w.sum()) + 3):
                assert null.tail(s) == brute_tail(w.tolist(), s)
    # equal weights: the binomial tail, exactly
    null = NullTail(np.full(64, 8))
    for h in (0, 32, 50, 63, 64):
        num, den = null.tail_exact(8 * h)
        assert (num, den) == (sum(math.comb(64, j) for j in range(h, 65)), 2 ** 64)
    assert subset_sum_counts([2, 0, 1]) == [2, 2, 2, 2]


def test_exact_score_null_by_enumerating_codewords():
    """The p-value of every codeword of a tiny registry equals the fraction of all 2^n codewords
    scoring at least as high (enumeration over codewords, not over weights)."""
    rng = np.random.default_rng(1)
    n = 9
    stats = rng.normal(0, MU, n)
    w = soft_weights(stats, MU)
    bits = (stats > 0).astype(np.uint8)
    allcodes = np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.uint8)
    all_scores = scores(allcodes, bits, w)
    codes = allcodes[rng.choice(len(allcodes), 5, replace=False)]
    ids = [f"c{i}" for i in range(5)]
    res = attribute(ids, codes, stats, MU, alpha=0.5)
    s = scores(codes, bits, w)
    for i, c in enumerate(ids):
        ref = min(1.0, 5 * np.mean(all_scores >= s[i]))
        p = next((x["p_value"] for x in res["named"] if x["customer"] == c), None)
        if p is not None:
            assert p == pytest.approx(ref, rel=1e-12)
    best = int(np.argmax(s))
    assert res["best_p"] == pytest.approx(min(1.0, 5 * np.mean(all_scores >= s[best])), rel=1e-12)


def test_weights_erasures_and_cap():
    w = soft_weights(np.array([0.0, 0.03, -0.04, 0.075, -0.15, 0.6, -1.0]), MU, SoftConfig(levels=8, erase=0.25))
    # c = 0, .2, .27, .5, 1, 4, 6.7 → erased, erased, round(2.1)=2, 4, 8, cap 8, cap 8
    assert w.tolist() == [0, 0, 2, 4, 8, 8, 8]
    with pytest.raises(BadInput):
        SoftConfig(levels=0)
    with pytest.raises(BadInput):
        SoftConfig(erase=1.5)
    with pytest.raises(BadInput):
        soft_weights(np.ones(3), 0.0)


def random_codes(rng, n_customers, n):
    return rng.integers(0, 2, (n_customers, n), dtype=np.uint8)


def observed(codes_of_colluders, rng, noise=0.3):
    """A simulated suspect's statistics: the mean of the colluders' signed marks (each at 1.4 μ, as a
    marked file's bits are) plus per-bit noise of ``noise`` μ: the averaging attack on the bit
    statistics, which are (to first order) linear in the averaged token table."""
    sig = (2.0 * np.asarray(codes_of_colluders, dtype=np.float64) - 1.0).mean(0) * 1.4 * MU
    return sig + rng.normal(0, noise * MU, sig.shape)


def test_innocents_never_named():
    """Suspects made from some customers are scored against a registry of 200 other (innocent)
    random codewords: at alpha = 1e-3 none of 200 × 300 innocent scores is named; unmarked
    suspects (pure noise) name nobody either."""
    rng = np.random.default_rng(2)
    n = 64
    innocent = random_codes(rng, 200, n)
    ids = [f"i{k}" for k in range(200)]
    for trial in range(300):
        k = trial % 4  # 0: unmarked (noise only), 1–3 colluders outside the registry
        stats = (rng.normal(0, MU, n) if k == 0 else observed(random_codes(rng, k, n), rng))
        res = attribute(ids, innocent, stats, MU, alpha=1e-3)
        assert res["named"] == [], (trial, res["named"][:2])


@pytest.mark.parametrize("n,k,least", [(64, 2, 18), (128, 2, 20), (256, 3, 20)])
def test_averaged_colluders_are_named(n, k, least):
    """k customers' statistics averaged, in a registry of 100 random codewords: over 20 random
    coalitions a colluder is named at p ≤ 1e-6 at least ``least`` times, an innocent never.  At 64
    bits two random codewords agree on only ~32 bits (fewer than 27 in ~10 % of pairs, and
    100 · 2^-27 is already 7e-7), which bounds what any decoder can do there; 128 bits name every
    pair.  The hard decision (Hamming against the nearest codeword) names far fewer at 64 bits."""
    rng = np.random.default_rng(3 + n)
    soft_named = hard_named = 0
    for trial in range(20):
        codes = random_codes(rng, 100, n)
        ids = [f"c{j}" for j in range(100)]
        coal = rng.choice(100, k, replace=False)
        stats = observed(codes[coal], rng)
        res = attribute(ids, codes, stats, MU, alpha=1e-6)
        named = {x["customer"] for x in res["named"]}
        assert named <= {ids[j] for j in coal}, (trial, named)
        assert all(x["p_value"] <= 1e-6 for x in res["named"])
        soft_named += bool(named)
        hard = attribute(ids, codes, np.sign(stats) * MU * 2, MU, alpha=1e-6)  # every bit at full weight
        assert {x["customer"] for x in hard["named"]} <= {ids[j] for j in coal}
        hard_named += bool(hard["named"])
    assert soft_named >= least
    if n == 64:
        assert hard_named <= soft_named // 2


@pytest.mark.slow
def test_two_marked_exports_averaged_name_a_colluder(minilm_rtn_checkpoint, minilm_board, tmp_path):
    """End to end through onnxruntime: two customers' marked MiniLM exports (``export_marked``),
    their token tables (where the mark lives; every other initialiser is identical) averaged into
    one file; verify names one or both colluders and nobody else.  The test board has 16 bits
    (codewords at distance ≥ 4, so a pair agrees on at most 12 bits and the best possible p with
    10 customers is 10 · 2^-12 ≈ 2.4e-3): alpha is 1e-2 and the pair is the registry's most
    similar; the 64-bit rows are in benchmarks/watermark_minilm.py."""
    import onnx
    from onnx import numpy_helper

    from quantseal import keys as qk
    from quantseal.export.watermark import export_marked
    from quantseal.runtime.verify import onnx_embed_fn, verify
    from quantseal.text import TextTokenizer

    key = bytes(range(32))  # tests/conftest.py trains minilm_board under this key
    reg = qk.Registry(key, 16)
    for i in range(10):
        reg.add(f"c{i}")
    ids, codes = reg.matrix()
    agree = (codes[:, None] == codes[None]).sum(-1)
    a, b = max(((x, y) for x in range(10) for y in range(x)), key=lambda p: (agree[p], p))
    paths = []
    for i, c in enumerate((ids[a], ids[b])):
        paths.append(export_marked(minilm_rtn_checkpoint, tmp_path / c / "model.onnx", minilm_board.path, key, reg,
                                   c, seed=i)["path"])
    ma, mb = onnx.load(str(paths[0])), onnx.load(str(paths[1]))
    tb = {t.name: t for t in mb.graph.initializer}
    changed = 0
    for t in ma.graph.initializer:
        x, y = numpy_helper.to_array(t), numpy_helper.to_array(tb[t.name])
        if x.dtype.kind == "f" and not np.array_equal(x, y):
            t.CopyFrom(numpy_helper.from_array(((x.astype(np.float64) + y) / 2).astype(x.dtype), t.name))
            changed += 1
    assert changed == 1  # the token table only
    avg = tmp_path / "avg.onnx"
    onnx.save(ma, str(avg))
    tok = TextTokenizer(minilm_rtn_checkpoint)
    res = verify(onnx_embed_fn(avg, provider="cpu"), key, reg, minilm_board.manifest, tok, alpha=1e-2)
    assert res["owners"] and set(res["owners"]) <= {ids[a], ids[b]}, res
    assert res["erased"] >= 1 and res["p_value"] < 1e-2


def test_greedy_text_answers_are_coarse_confidences():
    """A top1 board read from greedy text alone: each trigger's answer is the bit's 1-target (+μ),
    its 0-target (−μ) or neither (0, :class:`~quantseal.runtime.openai_client.OpenAITargets` with
    ``text_unit=μ``); verify's rounds stop a bit at its first target and average otherwise.  A bit
    no trigger answers with a target is erased (weight 0), one answered by both targets keeps a
    small weight, a clean one the full weight; the customer is named from a suspect where 30 % of
    the answers show neither target and 5 % the wrong one, innocents never."""
    from quantseal.runtime.verify import _sequential

    rng = np.random.default_rng(7)
    n, m = 64, 4
    codes = random_codes(rng, 50, n)
    ids = [f"c{j}" for j in range(50)]
    me = codes[3]
    answer = rng.choice([1.0, 0.0, -1.0], size=(n, m), p=[0.65, 0.3, 0.05]) * (2.0 * me[:, None] - 1) * MU
    answer[0] = 0.0  # bit 0: no trigger shows a target
    answer[1] = [0.0, MU * (2 * me[1] - 1), -MU * (2 * me[1] - 1), 0.0]  # bit 1: both targets, once each

    class Text:  # the probe verify's rounds call: one greedy answer per (bit, trigger)
        queries = 0

        def observe(self, pairs):
            self.queries += len(pairs)
            return np.array([answer[i, j] for i, j in pairs])

    probe = Text()
    stats, used = _sequential(probe, n, m, MU, 1.0, None)
    w = soft_weights(stats, MU)
    assert w[0] == 0 and used[0] == m and w[1] == 0  # erased: nothing, or both targets equally
    first = np.argmax(answer != 0, axis=1)  # the round that decides a bit showing a target
    clean = (answer[:, 0] != 0) & (np.sign(answer[:, 0]) == 2.0 * me - 1)
    assert (used[clean] == 1).all() and (w[clean] == DEFAULT_LEVELS).all()
    assert probe.queries == used.sum() and (used[2:] >= first[2:] + 1).all()
    res = attribute(ids, codes, stats, MU, alpha=1e-6)
    assert [x["customer"] for x in res["named"]] == ["c3"] and res["kept"] < n
