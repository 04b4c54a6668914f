"""Collusion rows for the MiniLM watermark (issue 14): customers who average their files.

The collusion part of ``watermark_minilm.py`` on its own, with soft-decision attribution
(:mod:`quantseal.runtime.attribution`): the same compression (RTN 4.5 bits), a 64-bit board, a
registry of ``--customers`` customers, each exported by ``export_marked`` (template path).  Then

* ``--pairs`` random pairs: the two files' token tables (where the mark lives; every other
  initialiser is identical) averaged into one file;
* ``--triples`` random triples averaged the same way;
* ``--mixes`` random pairs mixed row by row: each table row taken from one of the two files
  (a fair coin per row);
* the unmarked export (no customer may be named).

Each suspect goes through ``verify`` (soft decoding, Bonferroni over the registry, alpha 1e-6)
and, for comparison, the hard decision the earlier verify used (Hamming to the nearest codeword,
binomial p × registry size) recomputed from the same statistics.  Reported per row: colluders
named, innocents named (must be 0), best p, erased bits, queries.

    python benchmarks/watermark_collusion_minilm.py [--customers 20 --pairs 10 --triples 5 --mixes 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from watermark_minilm import (ALPHA, BASE_BUDGET, BITS, HERE, compress, effective_table, log,  # noqa: E402
                              save_proto, with_table)

from quantseal import keys as qk  # noqa: E402
from quantseal.cli import main as cli_main  # noqa: E402
from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board  # noqa: E402
from quantseal.export.watermark import export_marked  # noqa: E402
from quantseal.models import default_model_path  # noqa: E402
from quantseal.runtime.verify import onnx_embed_fn, ownership_p_value, verify  # noqa: E402
from quantseal.text import TextTokenizer  # noqa: E402


def hard_decision(res: dict, reg: qk.Registry) -> dict:
    """The earlier verify's verdict from the same bits: nearest codeword by Hamming, binomial tail."""
    ids, codes = reg.matrix()
    bits = np.array([int(x) for x in res["bits"]], dtype=np.uint8)
    dist = np.count_nonzero(codes != bits[None], axis=1)
    best = int(np.argmin(dist))
    p = ownership_p_value(len(bits), len(bits) - int(dist[best]), len(ids))
    return {"owner": ids[best] if p < ALPHA else None, "p_value": p, "bit_errors": int(dist[best])}


def row(res: dict, reg: qk.Registry, coalition: list[str]) -> dict:
    named = res["owners"]
    hard = hard_decision(res, reg)
    return {"coalition": coalition, "named": named, "colluders_named": [c for c in named if c in coalition],
            "innocents_named": [c for c in named if c not in coalition], "p_value": res["p_value"],
            "best": res["best"], "erased": res["erased"], "queries": res["queries"], "seconds": res["seconds"],
            "errors_vs_each": [qk.hamming(np.array([int(x) for x in res["bits"]]), reg.codeword(c)) for c in coalition],
            "agreement_of_coalition": int(np.all([reg.codeword(c) == reg.codeword(coalition[0]) for c in coalition],
                                                 axis=0).sum()),
            "hard_owner": hard["owner"], "hard_p_value": hard["p_value"], "hard_bit_errors": hard["bit_errors"],
            "statistics": [round(x, 6) for x in res["statistics"]]}


def aggregate(rows: list[dict]) -> dict:
    return {"n": len(rows), "a_colluder_named": sum(bool(r["colluders_named"]) for r in rows),
            "innocents_named": sum(len(r["innocents_named"]) for r in rows),
            "hard_decision_named": sum(r["hard_owner"] is not None for r in rows),
            "p_value_median": float(np.median([r["p_value"] for r in rows])) if rows else None,
            "p_value_max": max((r["p_value"] for r in rows), default=None),
            "erased_mean": float(np.mean([r["erased"] for r in rows])) if rows else None,
            "queries_mean": float(np.mean([r["queries"] for r in rows])) if rows else None}


def table(R: dict) -> str:
    lines = ["| suspect | runs | a colluder named (p ≤ 1e-6) | innocents named | median p | max p | erased bits (mean) "
             "| queries (mean) | hard decision named |", "|---|---|---|---|---|---|---|---|---|"]
    for name, agg in R["summary"].items():
        fmt = (lambda x: "–" if x is None else f"{x:.2g}")
        lines.append(f"| {name} | {agg['n']} | {agg['a_colluder_named']}/{agg['n']} | {agg['innocents_named']} "
                     f"| {fmt(agg['p_value_median'])} | {fmt(agg['p_value_max'])} | {agg['erased_mean']:.1f} "
                     f"| {agg['queries_mean']:.0f} | {agg['hard_decision_named']}/{agg['n']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--triples", type=int, default=5)
    ap.add_argument("--mixes", type=int, default=3)
    ap.add_argument("--bits", type=int, default=BITS)
    ap.add_argument("--all-triggers", action="store_true", help="query every trigger of every bit (verify stop=None)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept; checkpoint and board are reused)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "watermark_collusion_minilm.json")
    args = ap.parse_args()
    t_all = time.perf_counter()
    torch.manual_seed(0)
    work = args.work or Path(tempfile.mkdtemp(prefix="quantseal-coll-"))
    work.mkdir(parents=True, exist_ok=True)
    model_path = default_model_path()
    tok = TextTokenizer(model_path)
    key_file = work / "owner.key"
    key = qk.read_key(key_file) if key_file.is_file() else qk.write_key(key_file)
    ck = work / f"rtn_{BASE_BUDGET}"
    compress(model_path, ck, BASE_BUDGET, "rtn")
    board_dir = work / f"board_{args.bits}"
    if not (board_dir / qk.BOARD_MANIFEST).is_file():
        log(f"training a {args.bits}-bit board")
        save_board(train_board(ck, key, BoardConfig(bits=args.bits)), board_dir, ck)
    board = load_board(board_dir)
    reg = qk.Registry(key, args.bits)
    customers = [f"customer-{i:03d}" for i in range(args.customers)]
    for c in customers:
        reg.add(c)
    R: dict = {"model": "all-MiniLM-L6-v2", "command": "python benchmarks/watermark_collusion_minilm.py " +
               " ".join(sys.argv[1:]), "machine": f"{platform.machine()}, onnxruntime CPU", "alpha": ALPHA,
               "bits": args.bits, "customers": len(reg), "all_triggers": args.all_triggers, "board_seconds": board.manifest["training"]["seconds"],
               "rows": {}}
    files = {}

    def file_of(c: str) -> Path:
        if c not in files:
            files[c] = Path(export_marked(ck, work / "customers" / c / "model.onnx", board_dir, key, reg, c)["path"])
        return files[c]

    def check(name: str, path: Path, coalition: list[str]) -> None:
        res = verify(onnx_embed_fn(path, provider="cpu"), key, reg, board.manifest, tok, alpha=ALPHA,
                     **({"stop": None} if args.all_triggers else {}))
        r = row(res, reg, coalition)
        R["rows"].setdefault(name, []).append(r)
        log(f"{name} {coalition}: named {r['named']} (p {r['p_value']:.2g}, {r['erased']} erased, "
            f"{r['queries']} queries); hard decision {r['hard_owner']} (p {r['hard_p_value']:.2g})")

    rng = np.random.default_rng(0)
    single = customers[0]
    check("one customer's file", file_of(single), [single])
    groups = ([("average of 2 customers", list(rng.choice(customers, 2, replace=False))) for _ in range(args.pairs)]
              + [("average of 3 customers", list(rng.choice(customers, 3, replace=False))) for _ in range(args.triples)]
              + [("2 customers mixed row by row", list(rng.choice(customers, 2, replace=False)))
                 for _ in range(args.mixes)])
    for name, coalition in groups:
        coalition = [str(c) for c in coalition]
        protos = [onnx.load(str(file_of(c))) for c in coalition]
        tables = [effective_table(p) for p in protos]
        if name.startswith("average"):
            mixed = sum(tables) / len(tables)
        else:
            pick = rng.integers(0, 2, tables[0].shape[0]).astype(bool)
            mixed = np.where(pick[:, None], tables[0], tables[1])
        check(name, save_proto(with_table(protos[0], mixed), work / "suspect" / "model.onnx"), coalition)
    plain = work / "plain" / "model.onnx"
    if not plain.is_file():
        cli_main(["export", str(ck), "-o", str(plain)])
    check("unmarked export", plain, [])
    R["summary"] = {name: aggregate(rows) for name, rows in R["rows"].items()}
    R["total_seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(R) + "\n")
    print(table(R))


if __name__ == "__main__":
    main()
