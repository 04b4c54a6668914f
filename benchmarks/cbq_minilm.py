"""CBQ vs RTN vs GPTQ (and onnxruntime HQQ) on all-MiniLM-L6-v2: W4A16, W3A16, W2A16, W4A8, W4A4.

Every (setting, method) runs in a fresh subprocess (so its peak RSS is its own):
- ``rtn``: round-to-nearest INT-w (MSE clip search), blockwise, float16 scales;
- ``gptq``: sequential GPTQ (quantseal.compress.gptq) on the calibration text;
- ``cbq-rtn``: CBQ as in the paper, starting from round-to-nearest (LoRA-Rounding rank ``--rank``);
- ``cbq``: CBQ starting from GPTQ's codes (``quantseal compress --method cbq``, the default
  ``--init gptq``);
- ``hqq`` (W4 only): onnxruntime's ``MatMulNBitsQuantizer`` HQQ on the float32 ONNX, run in onnxruntime;
- ``lq`` / ``lq+cbq`` (A16 only): the data-aware LQ + ILP plan over integer formats and ranks at
  exactly the stored bits of uniform INT-w (so the same bytes), and that plan refined by CBQ with
  the low-rank branches in the loop (``quantseal compress --method lq+cbq``).
With A8/A4, RTN and GPTQ get static per-tensor activation scales (MSE range search on the
calibration activations, no training); CBQ learns them (LSQ) after CFP has scaled the outlier
channels down (folded into the producer where that is exact, else an explicit x / s in front of
the Linear: quantseal/compress/smoothing.py).

Embedding error = 1 − mean cosine to the float32 model over the held-out ``pydoc_data``
sentences (torch, fake-quantised weights and activations; HQQ in onnxruntime).  Calibration:
128 calibration-half sentences, block 64.  Writes ``results/cbq_minilm.json``, ``.md`` and ``.png``.

    .venv/bin/python benchmarks/cbq_minilm.py && .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SETTINGS = ("W4A16", "W3A16", "W2A16", "W4A8", "W4A4")
METHODS = ("rtn", "gptq", "cbq-rtn", "cbq", "hqq", "lq", "lq+cbq")
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "cbq-rtn": "CBQ (RTN init, as in the paper)",
          "cbq": "CBQ (GPTQ init, quantseal default)", "hqq": "onnxruntime HQQ",
          "lq": "LQ+ILP data-aware (int2/4/8, ranks 0/8/16) at RTN's bits",
          "lq+cbq": "LQ+CBQ (that plan, refined by CBQ)"}


def parse_setting(s: str) -> tuple[int, int]:
    w, a = s.upper().removeprefix("W").split("A")
    return int(w), int(a)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- one run (child)
def static_activation_scales(model, fam, batches, bits: int) -> dict:
    """Per-Linear static activation quantisers (MSE range search, CBQ's ActQuantizer init) from
    the calibration activations of ``model`` as it is (weights already quantised)."""
    import torch

    from quantseal.compress.calibration import _model_kwargs
    from quantseal.compress.cbq_linear import ActQuantizer
    from quantseal.models import compressible_linears

    lins = compressible_linears(model, fam)
    seen: dict[str, list] = {n: [] for n in lins}
    hooks = []
    mask_box = {}
    for name, lin in lins.items():
        def hook(_m, args, _n=name):
            seen[_n].append(args[0][mask_box["m"]].float())
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                mask_box["m"] = b["attention_mask"].bool()
                model(**_model_kwargs(fam, b))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, xs in seen.items():
        q = ActQuantizer(bits)
        q.init_from(torch.cat(xs))
        out[name] = q.export()
    return out


def quantize_in_place(model, fam, batches, method: str, spec, abits: int, args) -> tuple[dict, dict]:
    """RTN, GPTQ or CBQ (``cbq``: GPTQ init; ``cbq-rtn``: the paper's RTN init) on ``model`` in
    place; returns (activation quantisers for A < 16, extra report fields).  Shared with
    ``cbq_smollm2.py``."""
    import torch

    from quantseal.compress.calibration import capture_block_inputs
    from quantseal.compress.cbq import CBQConfig, cbq_quantize_model, gptq_init
    from quantseal.compress.gptq import gptq_quantize_model
    from quantseal.compress.quantizers import dequantize, quantize_int
    from quantseal.models import compressible_linears

    if method in ("rtn", "gptq"):
        if method == "rtn":
            for lin in compressible_linears(model, fam).values():
                lin.weight.data = dequantize(quantize_int(lin.weight.data, spec))
        else:
            gptq_quantize_model(model, fam, capture_block_inputs(model, fam, batches, torch.float32), spec)
        return (static_activation_scales(model, fam, batches, abits) if abits < 16 else {}), {}
    cfg = CBQConfig(wbits=spec.bits, abits=abits, block=spec.block, rank=args.rank, steps=args.steps,
                    init="gptq" if method == "cbq" else "rtn", seed=0)
    inputs = capture_block_inputs(model, fam, batches, torch.float16)
    init = gptq_init(model, fam, inputs, cfg)[0] if cfg.init == "gptq" else None
    res = cbq_quantize_model(model, fam, inputs, cfg, init=init)
    return res.activations, {"window_losses": [round(x, 6) for x in res.losses], "rank": args.rank,
                             "steps": args.steps, "cfp_channels": sum(len(v) for v in res.folded.values())}


def run_one(setting: str, method: str, args) -> dict:
    return {**_run_one(setting, method, args), "threads": args.threads}


def _run_one(setting: str, method: str, args) -> dict:
    import torch

    from quantseal.compress.calibration import calibration_batches
    from quantseal.compress.cbq import CBQConfig, attach_activation_quant
    from quantseal.compress.formats import FormatSpec
    from quantseal.models import compressible_linears, default_model_path, load_model
    from quantseal.quality import embed_texts, embedding_error, nn_agreement
    from quantseal.text import TextTokenizer, calibration_texts, pydoc_sentences

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    wbits, abits = parse_setting(setting)
    spec = FormatSpec("int", wbits, args.block)
    mp = default_model_path()
    tok = TextTokenizer(mp)
    evals = pydoc_sentences("evaluation")[: args.eval]
    ref = np.load(args.ref)
    t0 = time.perf_counter()
    if method == "hqq":
        sys.path.insert(0, str(HERE))
        from export_minilm import build_float32, ort_embed, ort_quantize

        work = Path(args.work)
        fp = work / "float32.onnx"
        if not fp.is_file():
            build_float32(mp, fp)
        out = work / f"hqq_w{wbits}_b{args.block}.onnx"
        ort_quantize(fp, out, "HQQ", args.block, False)
        calib_s = time.perf_counter() - t0
        test = ort_embed(str(out), tok, evals, threads=args.threads)
        return {"error": embedding_error(ref, test), "nn_agreement": nn_agreement(ref, test),
                "calibration_seconds": calib_s, "peak_rss_mb": peak_rss_mb(), "evaluated_in": "onnxruntime"}
    if method in ("lq", "lq+cbq"):
        from quantseal.checkpoint import load_compressed
        from quantseal.compress.lqcbq import lq_cbq_compress
        from quantseal.compress.pipeline import CompressConfig, compress

        shapes = [tuple(m.weight.shape) for m in compressible_linears(*load_model(mp)).values()]
        bits = sum(spec.stored_bytes(n, k) for n, k in shapes) * 8 / sum(n * k for n, k in shapes)
        out = Path(args.work) / f"{method}_{setting}"
        cfg = CompressConfig(output=out, model=mp, budget_bits=bits, formats=("int2", "int4", "int8"),
                             ranks=(0, 8, 16), data_aware=True, calib_samples=args.calib_samples, workers=1)
        if method == "lq":
            rep = compress(cfg)
        else:
            rep = lq_cbq_compress(cfg, CBQConfig(rank=args.rank, steps=args.steps, seed=0))
        calib_s = time.perf_counter() - t0
        model = load_compressed(out)[0]
        test = embed_texts(model, tok, evals)
        return {"error": embedding_error(ref, test), "nn_agreement": nn_agreement(ref, test),
                "calibration_seconds": calib_s, "peak_rss_mb": peak_rss_mb(), "evaluated_in": "torch",
                "bits_per_param": rep["bits_per_param"], "formats": rep["formats"]}
    model, fam = load_model(mp)
    batches = calibration_batches(mp, calibration_texts(None, args.calib_samples), 16)
    acts, extra = quantize_in_place(model, fam, batches, method, spec, abits, args)
    calib_s = time.perf_counter() - t0
    if acts:
        attach_activation_quant(model, acts)
    test = embed_texts(model, tok, evals)
    return {"error": embedding_error(ref, test), "nn_agreement": nn_agreement(ref, test),
            "calibration_seconds": calib_s, "peak_rss_mb": peak_rss_mb(), "evaluated_in": "torch", **extra}


# ----------------------------------------------------------------------------- parent
def float_reference(path: Path, n: int) -> None:
    from quantseal.models import default_model_path, load_model
    from quantseal.quality import embed_texts
    from quantseal.text import TextTokenizer, pydoc_sentences

    mp = default_model_path()
    model, _ = load_model(mp)
    np.save(path, embed_texts(model, TextTokenizer(mp), pydoc_sentences("evaluation")[:n]))


def render(res: dict) -> str:
    settings = res["settings"]
    lines = ["### CBQ vs RTN / GPTQ / HQQ on MiniLM (weights W, activations A)", "",
             f"`{res['command']}` — embedding error (1 − mean cosine to float32) on {res['eval_sentences']} "
             f"held-out sentences; block {res['block']}; calibration {res['calib_samples']} sentences; CBQ "
             f"{res['steps']} steps per window, LoRA-Rounding rank {res['rank']}, windows of 2 blocks (overlap 1); "
             f"torch threads per run in the JSON; calibration seconds / peak RSS of each run's own process "
             f"(load average {res['loadavg_start']} → {res['loadavg_end']})"
             + (f"; runs from {res['invocations']} invocations of the script" if res.get("invocations") else "")
             + ".", "",
             "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in res["methods"]:
        cells = []
        for s in settings:
            r = res["runs"].get(f"{s}/{m}")
            if r is None:
                cells.append("–")
            elif "error" not in r or r.get("status") == "failed":
                cells.append(f"failed ({r.get('reason', '')[:60]})")
            else:
                cells.append(f"{r['error']:.5f} ({r['calibration_seconds']:.0f} s/{r.get('threads', 1)}T, "
                             f"{r['peak_rss_mb']:.0f} MB)")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    d = res.get("done_when", {})
    if d:
        lines += ["", "Done when: " + "; ".join(f"{k}: {'yes' if v else '**no**'}" for k, v in d.items()) + "."]
    return "\n".join(lines)


def done_when(runs: dict) -> dict:
    def e(s, m):
        r = runs.get(f"{s}/{m}")
        return r.get("error") if r else None

    out = {}
    for s, factor in (("W2A16", 0.5), ("W4A16", 0.5)):
        cbq, rtn, gptq = e(s, "cbq"), e(s, "rtn"), e(s, "gptq")
        if None not in (cbq, rtn, gptq):
            out[f"{s} CBQ ≤ ½ RTN"] = cbq <= factor * rtn
            out[f"{s} CBQ {'<' if s == 'W2A16' else '≤'} GPTQ"] = cbq < gptq if s == "W2A16" else cbq <= gptq
    a8, a16 = e("W4A8", "cbq"), e("W4A16", "cbq")
    if a8 is not None and a16 is not None:
        out["W4A8 ≤ 1.2 × W4A16 (CBQ)"] = a8 <= 1.2 * a16
    secs = [r["calibration_seconds"] for k, r in runs.items() if k.endswith("/cbq") and "calibration_seconds" in r]
    if secs:
        out["CBQ calibration < 10 min"] = max(secs) < 600
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, methods = res["settings"], res["methods"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [res["runs"].get(f"{s}/{m}", {}).get("error", np.nan) for s in settings]
        ax.bar(np.arange(len(settings)) + i * width, ys, width, label=LABELS[m])
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
    ax.set_yscale("log")
    ax.set_ylabel("embedding error (1 − cos), log")
    ax.set_title("MiniLM: CBQ vs RTN / GPTQ / HQQ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip", default="W3A16/cbq-rtn,W4A8/cbq-rtn,W4A4/cbq-rtn",
                    help="setting/method pairs not run (time)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval", type=int, default=423)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "cbq_minilm.json")
    ap.add_argument("--one", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only re-render .md/.png from the JSON")
    ap.add_argument("--merge", action="store_true", help="add these runs to the existing results JSON")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)), flush=True)
        return
    if args.render:
        res = json.loads(args.out.read_text())
        args.out.with_suffix(".md").write_text(render(res) + "\n")
        plot(res, args.out.with_suffix(".png"))
        return
    settings = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = set(x.strip() for x in args.skip.split(",") if x.strip())
    res = {"command": "python benchmarks/cbq_minilm.py", "settings": settings, "methods": methods,
           "block": args.block, "rank": args.rank, "steps": args.steps, "calib_samples": args.calib_samples,
           "eval_sentences": args.eval, "threads": args.threads, "runs": {},
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    if args.merge and args.out.is_file():  # add runs to an earlier invocation's results
        old = json.loads(args.out.read_text())
        res["runs"] = old["runs"]
        res["settings"] = old["settings"] + [x for x in settings if x not in old["settings"]]
        res["methods"] = old["methods"] + [x for x in methods if x not in old["methods"]]
        res["loadavg_start"] = old["loadavg_start"]
        res["invocations"] = old.get("invocations", 1) + 1
    work = Path(tempfile.mkdtemp(prefix="quantseal_cbq_bench."))
    ref = work / "ref.npy"
    float_reference(ref, args.eval)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for s in settings:
        for m in methods:
            if f"{s}/{m}" in skip or (m == "hqq" and (not s.endswith("A16") or parse_setting(s)[0] != 4)):
                continue
            if m in ("lq", "lq+cbq") and not s.endswith("A16"):
                continue
            cmd = [sys.executable, __file__, "--one", s, m, "--ref", str(ref), "--work", str(work),
                   "--block", str(args.block), "--rank", str(args.rank), "--steps", str(args.steps),
                   "--calib-samples", str(args.calib_samples), "--eval", str(args.eval), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                r = {"status": "failed", "reason": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
            r["wall_seconds"] = round(time.perf_counter() - t0, 1)
            res["runs"][f"{s}/{m}"] = r
            print(f"[{time.strftime('%H:%M:%S')}] {s} {m}: {json.dumps(r)[:200]}", file=sys.stderr, flush=True)
            res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            res["done_when"] = done_when(res["runs"])
            args.out.write_text(json.dumps(res, indent=1) + "\n")  # keep what was measured so far
    args.out.with_suffix(".md").write_text(render(res) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print(render(res))


if __name__ == "__main__":
    main()
