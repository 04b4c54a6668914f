"""Soft-decision attribution: per-bit confidences, erasures, and an exact p-value per customer.

Issue 14 (collusion).  A suspect gives one statistic ``t_i`` per signature bit (see
:mod:`quantseal.runtime.verify`); the board was trained so that every trigger of a marked model
clears the margin ``μ`` (``board.json`` ``margin``: embedding units for encoders, logit units for
decoders).  When customers average their files, the bits where their codewords differ carry a
weak statistic, the bits where they agree a strong one; a hard decision on every bit then matches
no colluder well (the collusion rows of the watermark benchmarks).  Here:

* **confidence** ``c_i = |t_i| / μ`` (the statistic in units of the board's margin);
* **weight** ``w_i = 0`` (an *erasure*) when ``c_i < erase``, else
  ``w_i = clip(round(levels · c_i), 1, levels)``: an integer in ``1..levels``, the confidence
  quantised to ``1/levels`` of a margin and capped at one margin (a single customer's file has
  every ``c_i ≥ 1``, so every weight is ``levels`` and the score is ``levels ×`` the matching bits);
* **score** of a codeword ``x ∈ {0,1}^n`` against the hard bits ``b_i = [t_i > 0]``:

      S(x) = Σ_i w_i · [x_i = b_i]                                    (a weighted match count)

* **null** (an innocent customer): ``x`` is uniform on ``{0,1}^n`` and independent of the suspect's
  observations, so — given the observations, which fix ``w`` and ``b`` — the terms are
  independent, each ``0`` or ``w_i`` with probability ½.  The exact tail is a count of subsets,

      P(S ≥ s) = #{T ⊆ kept : Σ_{i∈T} w_i ≥ s} / 2^{n_kept},

  the coefficients of ``Π_{i kept} (1 + z^{w_i})`` summed from ``z^s`` up, computed with Python
  integers (``n · Σ w`` additions; no approximation).  Erased bits (``w_i = 0``) add nothing to
  any score, so they drop out of the count.  With every weight equal this is the binomial tail
  ``P(Binomial(n_kept, ½) ≥ matches)``.
* **correction**: with ``N`` registered customers each customer's p-value is
  ``p_c = min(1, N · P(S ≥ S(x_c)))`` (Bonferroni); *every* customer with ``p_c < alpha`` is
  named.  By the union bound the chance that any innocent is named is at most ``alpha``, however
  many colluders made the suspect.

**Greedy text** (a ``top1`` decoder board read through an API that returns text only,
:mod:`quantseal.compress.markboard_top1`): a trigger's answer is the bit's 1-target, its
0-target, or neither, read as ``+μ``, ``−μ`` or ``0``; the bit's statistic is the mean over the
triggers asked (a bit stops at its first target, so a clean bit is one query at confidence 1 and
full weight).  A bit whose triggers never show a target has ``t_i = 0`` and is erased; one whose
triggers show both targets keeps the majority's sign at a weight of its excess (``|t_i| / μ`` is
the fraction by which one target outnumbers the other), so the confidence is coarse, in steps of
``1/m``, and the same exact null applies.

The weights depend on the observations only, never on a codeword, which is what keeps the null
exact.  Registry codewords are drawn from the key with a minimum distance to earlier ones
(:meth:`quantseal.keys.Registry.add`); that pushes an innocent codeword *away* from the
colluders' and is not modelled (the uniform null is the conservative side of it in practice:
the measured false-claim rate is in ``tests/runtime/test_attribution.py``).

**Guarantee.**  *False claims*: for any suspect whose observations are independent of an innocent's
codeword, the chance that the innocent is named is at most ``alpha / N``, that anyone innocent is
named at most ``alpha`` — whatever the coalition, the attack or the number of colluders.
*Detection* of ``k`` customers who average their files (uniform codewords): the bits where the
coalition is unanimous (about ``n · 2^{1−k}`` of them) keep a full-margin statistic and full
weight, the split ones shrink towards zero (erased, or weighted by the majority's excess), so a
colluder is named when roughly ``N · 2^{−(unanimous bits)} < alpha``.  Simulated on the averaging
channel (``benchmarks/collusion_codes.py``: N = 100, alpha = 1e-6, 100 coalitions each), a
colluder is named in

    bits  |  k = 2   k = 3   k = 4
    64    |   90 %    16 %     2 %
    128   |  100 %    94 %    83 %
    256   |  100 %   100 %   100 %

with no innocent named in any run: 64 bits for single customers and most pairs, 128 for pairs
and triples, 256 for up to four colluders.  The simulation sends split bits to zero; on the real
MiniLM they keep 0.6–1.5 margins with the majority's sign (``benchmarks/watermark_collusion_minilm.py``:
64 bits, 20 customers: 8/10 averaged pairs named, 0/5 triples; 128 bits: 10/10 pairs (both
colluders each time), 5/5 triples, 3/3 row-by-row mixes; no innocent in any; SmolLM2's top1 chat
board, ``benchmarks/watermark_smollm2_chat.py``: 64 bits x 2 triggers: 5/10 pairs, 0/3 triples;
128 bits x 1 trigger: 10/10 pairs, 1/3 triples, 3/3 mixes, no innocent), so for 3 or more
colluders the real channel is close to a majority vote and needs the longer boards (``quantseal board train --bits 128|256``; the
registry takes the board's length).  Tardos-biased codes with Škorić's symmetric score (the
binary-marking-assumption design) did worse on this channel at every length (64 bits: 3 % of
pairs; 256 bits: 27 % of quadruples), because averaging reveals how many colluders carry a 1,
which the uniform code's matched score uses; so new registries keep uniform codewords.

Pure numpy and integer arithmetic; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInput

DEFAULT_MARGIN = 0.15  # the encoder board's default μ (compress/markboard.BoardConfig.margin) for manifests without one
DEFAULT_LEVELS = 4
DEFAULT_ERASE = 0.5


@dataclass(frozen=True)
class SoftConfig:
    """Quantisation of confidences into integer weights (module docstring)."""

    levels: int = DEFAULT_LEVELS  # weight resolution: 1/levels of a margin; the cap is one margin
    erase: float = DEFAULT_ERASE  # confidence (in margins) below which a bit is erased

    def __post_init__(self):
        if not (isinstance(self.levels, int) and 1 <= self.levels <= 64):
            raise BadInput(f"levels must be an integer in 1..64, got {self.levels!r}")
        if not 0 <= self.erase < 1:
            raise BadInput(f"erase must be in [0, 1) margins, got {self.erase!r}")


def confidences(stats: np.ndarray, margin: float) -> np.ndarray:
    """``c_i = |t_i| / μ``: float64 (n,)."""
    if not margin > 0:
        raise BadInput(f"the board margin must be positive, got {margin!r}")
    return np.abs(np.asarray(stats, dtype=np.float64)) / float(margin)


def soft_weights(stats: np.ndarray, margin: float, cfg: SoftConfig = SoftConfig()) -> np.ndarray:
    """Integer weights int64 (n,): 0 for an erasure, else ``clip(round(levels·c_i), 1, levels)``."""
    c = confidences(stats, margin)
    w = np.clip(np.rint(cfg.levels * c), 1, cfg.levels).astype(np.int64)
    w[c < cfg.erase] = 0
    return w


def subset_sum_counts(weights: np.ndarray) -> list[int]:
    """Coefficients of ``Π_i (1 + z^{w_i})`` (non-negative integer weights): entry ``s`` is the
    number of subsets whose weights sum to ``s``; length ``Σ w + 1``.  Exact (Python ints)."""
    w = [int(x) for x in np.asarray(weights).ravel()]
    if any(x < 0 for x in w):
        raise BadInput("weights must be non-negative integers")
    counts = np.zeros(sum(w) + 1, dtype=object)
    counts[:] = 0
    counts[0] = 1
    top = 0
    for x in w:
        if x == 0:
            counts[: top + 1] *= 2  # an erased bit: both values add nothing
            continue
        counts[x: top + x + 1] = counts[x: top + x + 1] + counts[: top + 1]
        top += x
    return [int(v) for v in counts]


class NullTail:
    """``P(S ≥ s)`` under the innocent-codeword null for fixed weights (exact, as a float from an
    integer ratio).  ``tail(s)`` accepts an int or an int array."""

    def __init__(self, weights: np.ndarray):
        counts = subset_sum_counts(weights)
        total = 1 << len(np.asarray(weights).ravel())
        # upper cumulative counts: cum[s] = #{subsets with sum ≥ s}
        cum = [0] * (len(counts) + 1)
        for s in range(len(counts) - 1, -1, -1):
            cum[s] = cum[s + 1] + counts[s]
        self._cum, self._total, self.max_score = cum, total, len(counts) - 1
        self._tail = np.array([c / total for c in cum], dtype=np.float64)  # int / int: correctly rounded

    def tail(self, s):
        s = np.clip(np.asarray(s, dtype=np.int64), 0, self.max_score + 1)
        return self._tail[s]

    def tail_exact(self, s: int) -> tuple[int, int]:
        """(numerator, denominator) of ``P(S ≥ s)``."""
        s = min(max(int(s), 0), self.max_score + 1)
        return self._cum[s], self._total


def scores(codes: np.ndarray, bits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``S(x_c) = Σ_i w_i [x_ci = b_i]`` for every codeword row: int64 (N,)."""
    codes = np.asarray(codes, dtype=np.uint8)
    agree = codes == np.asarray(bits, dtype=np.uint8)[None, :]
    return (agree * np.asarray(weights, dtype=np.int64)[None, :]).sum(1).astype(np.int64)


def attribute(ids: list[str], codes: np.ndarray, stats: np.ndarray, margin: float, alpha: float,
              cfg: SoftConfig = SoftConfig()) -> dict:
    """Score every registered codeword against a suspect's statistics and name those that clear
    ``alpha`` after the Bonferroni correction.

    ``codes``: uint8 (N, n); ``stats``: float (n,).  Returns ``named`` (list of
    ``{customer, p_value, score}`` sorted by p then id), ``best`` (the highest-scoring customer or
    None), ``best_p`` (its corrected p-value; 1.0 for an empty registry), ``kept`` (bits not
    erased), ``max_score`` (Σ w), ``weights`` (list of int)."""
    stats = np.asarray(stats, dtype=np.float64)
    bits = (stats > 0).astype(np.uint8)
    w = soft_weights(stats, margin, cfg)
    null = NullTail(w)
    out = {"named": [], "best": None, "best_p": 1.0, "best_score": None, "kept": int(np.count_nonzero(w)),
           "max_score": int(w.sum()), "weights": [int(x) for x in w]}
    if not ids:
        return out
    s = scores(codes, bits, w)
    p = np.minimum(1.0, len(ids) * null.tail(s))
    order = sorted(range(len(ids)), key=lambda i: (p[i], -int(s[i]), ids[i]))
    out["best"], out["best_p"], out["best_score"] = ids[order[0]], float(p[order[0]]), int(s[order[0]])
    out["named"] = [{"customer": ids[i], "p_value": float(p[i]), "score": int(s[i])} for i in order if p[i] < alpha]
    return out
