"""The whole job on the bundled all-MiniLM-L6-v2, through the real command line:

compress to 4.5 bits (data-aware LQ + ILP) → train a watermark board once → export one ONNX
model per customer (alice, bob, carol) → verify each black-box → print a table.

    make demo            (or: .venv/bin/python examples/demo.py [--out demo_out])
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CUSTOMERS = ("alice", "bob", "carol")


def quantseal(*args) -> dict:
    """Run ``quantseal ARGS --json`` and return its last-line JSON; stop the demo on failure."""
    cmd = [sys.executable, "-m", "quantseal", *map(str, args), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: `quantseal {' '.join(map(str, args))}` failed:\n{proc.stderr.strip()}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["_wall"] = time.perf_counter() - t0
    return res


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--budget", type=float, default=4.5)
    ap.add_argument("--bits", type=int, default=64, help="signature bits")
    args = ap.parse_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    step(f"compress all-MiniLM-L6-v2 to {args.budget} bits per parameter (data-aware LQ + ILP)")
    comp = quantseal("compress", "-o", out / "compressed", "--budget", args.budget, "--data-aware")
    print(f"    {comp['bits_per_param']:.3f} bits/param, plan {comp['formats']}, {comp['seconds']:.0f} s")

    step("owner set-up: key, registry, watermark board (trained once)")
    quantseal("keygen", "-o", out / "owner.key")
    for c in CUSTOMERS:
        quantseal("registry", "add", out / "registry.db", "--key", out / "owner.key", "--user", c,
                  "--bits", args.bits)
    board = quantseal("board", "train", out / "compressed", "-o", out / "board", "--key", out / "owner.key",
                      "--bits", args.bits)
    print(f"    {board['bits']}-bit board, {board['steps']} steps, {board['seconds']:.0f} s")

    step("export: an unmarked model and one marked model per customer")
    models = {"unmarked": quantseal("export", out / "compressed", "-o", out / "unmarked" / "model.onnx")}
    for c in CUSTOMERS:
        models[c] = quantseal("export", out / "compressed", "-o", out / c / "model.onnx", "--board", out / "board",
                              "--key", out / "owner.key", "--registry", out / "registry.db", "--user", c)

    step("quality in onnxruntime vs the float32 model (held-out pydoc_data sentences)")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from quantseal.models import default_model_path, load_model
    from quantseal.quality import embed_texts, embedding_error
    from quantseal.runtime.pipelines import Embedder
    from quantseal.text import TextTokenizer, pydoc_sentences

    texts = pydoc_sentences("evaluation")[:128]
    ref = embed_texts(load_model(default_model_path())[0], TextTokenizer(default_model_path()), texts)
    errors = {name: embedding_error(ref, Embedder(Path(r["path"])).embed(texts)) for name, r in models.items()}

    step("verify each model black-box (triggers in, embeddings out)")
    verdicts = {name: quantseal("verify", r["path"], "--board", out / "board", "--key", out / "owner.key",
                                "--registry", out / "registry.db") for name, r in models.items()}

    source_mb = sum(p.stat().st_size for p in default_model_path().glob("*.safetensors")) / 1e6
    print()
    print(f"source float32 checkpoint: {source_mb:.1f} MB; budget {args.budget} bits/param over the 36 Linears")
    head = f"{'model':<10} {'file MB':>8} {'emb. error':>11} {'export s':>9} {'verified owner':>15} {'bit errors':>11} {'p-value':>9}"
    print(head)
    print("-" * len(head))
    ok = True
    for name, r in models.items():
        v = verdicts[name]
        owner = v["owner"] or "none"
        expected = None if name == "unmarked" else name
        ok &= v["owner"] == expected
        print(f"{name:<10} {r['bytes'] / 1e6:>8.2f} {errors[name]:>11.5f} {r['seconds']:>9.1f} {owner:>15} "
              f"{v['bit_errors']:>7}/{v['n_bits']:<3} {v['p_value']:>9.2g}")
    print()
    print("every model attributed correctly" if ok else "ATTRIBUTION MISMATCH")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
