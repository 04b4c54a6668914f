"""Which code names averaging colluders: uniform codewords + soft decoding vs Tardos-biased codes.

A simulation of the averaging channel the watermark actually sees (issue 14): when ``k``
customers average their token tables, bit ``i``'s statistic is (to first order) the mean of their
signed marks, ``t_i = μ · 1.4 · mean_c (2 x_ci − 1) + noise`` (a marked file's bits sit at about
1.4 margins; noise 0.3 μ per bit).  Registry of ``N = 100``; alpha 1e-6, Bonferroni.

* **uniform**: codewords uniform on {0,1}^n, scored by :func:`quantseal.runtime.attribution.attribute`
  (soft weights, erasures, exact subset-sum null);
* **tardos**: bits biased by Tardos' arcsine density (cut-off 1/64, biases on a 1/64 grid),
  scored by Škorić's symmetric score with the same soft weights (``w_i · g(x_i, y_i, p_i)``,
  ``g = √((1−p)/p)`` for a 1-match, ``−√(p/(1−p))`` for a mismatch, symmetric for 0), its null
  (innocent ``x_i ~ Bernoulli(p_i)``) computed by a float64 convolution of the quantised
  per-bit scores.

Reported: the fraction of ``--trials`` random coalitions where a colluder is named, and the
innocents named (over all trials).  Tardos codes are built for the binary marking assumption
(colluders can only output a bit one of them has); averaging reveals much more (how many of
them have a 1), which the matched-filter score on uniform codewords uses and the biased code
wastes.

    python benchmarks/collusion_codes.py [--trials 100]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from quantseal.runtime.attribution import SoftConfig, attribute, soft_weights

HERE = Path(__file__).resolve().parent
MU, STRENGTH, NOISE, N, ALPHA = 0.15, 1.4, 0.3, 100, 1e-6


def tardos_biases(n: int, rng, cutoff: float = 1 / 64, grid: int = 64) -> np.ndarray:
    """Tardos' arcsine density on [cutoff, 1 − cutoff], rounded to multiples of 1/grid."""
    r = rng.uniform(math.asin(math.sqrt(cutoff)), math.asin(math.sqrt(1 - cutoff)), n)
    return np.clip(np.round(np.sin(r) ** 2 * grid), 1, grid - 1) / grid


def observe(colluders: np.ndarray, rng) -> np.ndarray:
    sig = (2.0 * colluders - 1).mean(0) * STRENGTH * MU
    return sig + rng.normal(0, NOISE * MU, sig.shape)


def tardos_p_values(codes: np.ndarray, stats: np.ndarray, p: np.ndarray, q: int = 8) -> np.ndarray:
    """Bonferroni p-values of Škorić's symmetric score with soft weights (module docstring)."""
    y = (stats > 0).astype(int)
    w = soft_weights(stats, MU, SoftConfig())
    g1, g0 = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
    hit = np.rint(q * w * np.where(y == 1, g1, g0)).astype(int)
    miss = np.rint(-q * w * np.where(y == 1, g0, g1)).astype(int)
    pm = np.where(y == 1, p, 1 - p)  # P(an innocent bit equals y)
    dist = np.zeros(int((hit - miss).sum()) + 1)
    dist[0] = 1.0
    for a, b, pi in zip(hit, miss, pm):
        d = a - b
        new = dist * (1 - pi)
        if d > 0:
            new[d:] += dist[:-d] * pi
        else:
            new += dist * pi
        dist = new
    tail = np.cumsum(dist[::-1])[::-1]
    s = np.clip(np.where(codes == y, hit, miss).sum(1) - miss.sum(), 0, len(tail) - 1)
    return np.minimum(1.0, len(codes) * tail[s])


def run(n: int, k: int, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = [f"c{j}" for j in range(N)]
    out = {"uniform": {"named": 0, "innocents": 0}, "tardos": {"named": 0, "innocents": 0}}
    for _ in range(trials):
        coal = set(rng.choice(N, k, replace=False).tolist())
        uni = rng.integers(0, 2, (N, n)).astype(np.uint8)
        res = attribute(ids, uni, observe(uni[sorted(coal)], rng), MU, ALPHA)
        named = {int(x["customer"][1:]) for x in res["named"]}
        out["uniform"]["named"] += bool(named & coal)
        out["uniform"]["innocents"] += len(named - coal)
        p = tardos_biases(n, rng)
        tar = (rng.random((N, n)) < p).astype(np.uint8)
        pv = tardos_p_values(tar, observe(tar[sorted(coal)], rng), p)
        named = set(np.flatnonzero(pv < ALPHA).tolist())
        out["tardos"]["named"] += bool(named & coal)
        out["tardos"]["innocents"] += len(named - coal)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "collusion_codes.json")
    args = ap.parse_args()
    rows = []
    for n in (64, 128, 256):
        for k in (2, 3, 4):
            r = run(n, k, args.trials, seed=1000 * n + k)
            rows.append({"bits": n, "colluders": k, **r})
            print(f"n={n} k={k}: uniform+soft {r['uniform']['named']}/{args.trials} (innocents "
                  f"{r['uniform']['innocents']}), tardos {r['tardos']['named']}/{args.trials} "
                  f"(innocents {r['tardos']['innocents']})", flush=True)
    R = {"command": "python benchmarks/collusion_codes.py", "trials": args.trials, "registry": N, "alpha": ALPHA,
         "channel": {"mark_margins": STRENGTH, "noise_margins": NOISE}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    md = ["| bits | colluders averaged | uniform + soft: a colluder named | innocents named | Tardos + Škorić: named "
          "| innocents named |", "|---|---|---|---|---|---|"]
    md += [f"| {r['bits']} | {r['colluders']} | {r['uniform']['named']}/{args.trials} | {r['uniform']['innocents']} "
           f"| {r['tardos']['named']}/{args.trials} | {r['tardos']['innocents']} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
