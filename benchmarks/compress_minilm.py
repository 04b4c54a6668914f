"""Compression quality vs stored bits on the bundled all-MiniLM-L6-v2, in one run.

quantseal LQ + ILP (data-free and data-aware) at several budgets, against uniform baselines
(RTN INT4 blocks 32 and 128 as onnxruntime's quantiser writes them, NF4, INT8), all evaluated
in torch on the held-out half of ``pydoc_data.topics``:

    embedding error = 1 − mean cosine(compressed, float32)      (DESIGN §7)

The candidate table (Fisher + every candidate's error) is built once per mode; each budget is
then one ILP solve (timed) plus the rebuild of the chosen candidates.

    python benchmarks/compress_minilm.py            # writes results/compress_minilm.{json,png}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantseal import checkpoint as ckpt
from quantseal.compress.formats import DEFAULT_FAMILIES, FormatSpec
from quantseal.compress.pipeline import (CompressConfig, build_candidate_table, make_manifest, materialize,
                                         plan)
from quantseal.models import default_model_path, load_model
from quantseal.quality import embed_texts, embedding_error, nn_agreement
from quantseal.text import TextTokenizer, pydoc_sentences

HERE = Path(__file__).resolve().parent
BUDGETS = (3.0, 3.5, 4.0, 4.5, 5.0, 5.125, 6.0)
# uniform baselines: (label, format, bits per parameter as onnxruntime's quantiser stores it)
BASELINES = (
    ("RTN INT4 b32", "int4_b32", 4 + 32 / 32 + 4 / 32),  # float32 scales, 4-bit zero points
    ("RTN INT4 b128", "int4_b128", 4 + 32 / 128 + 4 / 128),
    ("NF4 b64", "nf4_b64", None),
    ("RTN INT8 b128", "int8_b128", None),
)


def evaluate(tensors, entries, table, cfg, tok, texts, ref, workdir: Path, name: str) -> dict:
    """Write the plan as a real checkpoint, load it back, embed, compare to float32."""
    out = workdir / name
    ckpt.write_checkpoint(out, make_manifest(table, cfg, entries, tensors), tensors, cfg.model)
    model, _, manifest = ckpt.load_compressed(out)
    emb = embed_texts(model, tok, texts)
    lin = [e for e in entries.values() if e.kind == "linear"]
    bits = sum(e.bytes for e in lin) * 8 / sum(e.shape[0] * e.shape[1] for e in lin)
    formats: dict[str, int] = {}
    for e in lin:
        key = e.format + (f"+r{e.rank}" if e.rank else "")
        formats[key] = formats.get(key, 0) + 1
    return {"bits_per_param": bits, "embedding_error": embedding_error(ref, emb),
            "nn_agreement": nn_agreement(ref, emb), "formats": formats}


def run_quantseal(data_aware: bool, formats, tok, texts, ref, workdir: Path, log) -> dict:
    cfg = CompressConfig(output=workdir / "unused", budget_bits=4.0, method="lq", data_aware=data_aware,
                         formats=tuple(formats), workers=2)
    t0 = time.perf_counter()
    table = build_candidate_table(cfg)
    table_seconds = time.perf_counter() - t0
    log(f"candidate table ({'data-aware' if data_aware else 'data-free'}): {table_seconds:.1f} s")
    rows = []
    for b in BUDGETS:
        t1 = time.perf_counter()
        choice = plan(table, budget_bits=b)
        solve = time.perf_counter() - t1
        tensors, entries = materialize(table, choice)
        row = evaluate(tensors, entries, table, cfg, tok, texts, ref, workdir, f"lq_{data_aware}_{b}")
        row.update(budget=b, solver_seconds=solve)
        log(f"  budget {b}: {row['bits_per_param']:.3f} bits, error {row['embedding_error']:.5f}")
        rows.append(row)
    return {"candidate_table_seconds": table_seconds, "rows": rows}


def run_baseline(label, fmt, ort_bits, tok, texts, ref, workdir: Path, log) -> dict:
    cfg = CompressConfig(output=workdir / "unused", budget_bits=32.0, method="rtn", formats=(fmt,),
                         ranks=(0,), workers=1)
    table = build_candidate_table(cfg)
    tensors, entries = materialize(table, plan(table, budget_bits=32.0))
    row = evaluate(tensors, entries, table, cfg, tok, texts, ref, workdir, fmt)
    row.update(label=label, format=fmt, ort_bits_per_param=ort_bits)
    log(f"  {label}: {row['bits_per_param']:.3f} bits (onnxruntime: {ort_bits}), error {row['embedding_error']:.5f}")
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("data_free", "quantseal LQ+ILP, data-free", "o-"),
                              ("data_aware", "quantseal LQ+ILP, data-aware", "s-")):
        rows = result["quantseal"][key]["rows"]
        ax.plot([r["bits_per_param"] for r in rows], [r["embedding_error"] for r in rows], style, label=label)
    for b in result["baselines"]:
        bits = b["ort_bits_per_param"] or b["bits_per_param"]
        ax.scatter([bits], [b["embedding_error"]], marker="x", s=60, zorder=3)
        ax.annotate(b["label"], (bits, b["embedding_error"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per parameter (compressible matrices)")
    ax.set_ylabel("embedding error: 1 − mean cosine to float32")
    ax.set_title("all-MiniLM-L6-v2, held-out pydoc_data sentences")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(DEFAULT_FAMILIES))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compress_minilm.json")
    args = ap.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    model_path = default_model_path()
    tok = TextTokenizer(model_path)
    texts = pydoc_sentences("evaluation")
    float_model, _ = load_model(model_path)
    ref = embed_texts(float_model, tok, texts)
    result = {"model": "all-MiniLM-L6-v2", "eval_sentences": len(texts), "formats": args.formats,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": "python benchmarks/compress_minilm.py", "quantseal": {}, "baselines": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key, aware in (("data_free", False), ("data_aware", True)):
            result["quantseal"][key] = run_quantseal(aware, args.formats.split(","), tok, texts, ref, work, log)
        for label, fmt, ort_bits in BASELINES:
            FormatSpec.parse(fmt)
            result["baselines"].append(run_baseline(label, fmt, ort_bits, tok, texts, ref, work, log))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
