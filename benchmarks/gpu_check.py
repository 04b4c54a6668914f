"""CPU vs CUDA solvers on MiniLM (issue #12): do they agree, and how much faster is the GPU?

One script for a lent GPU machine.  It runs, with ``--device cpu`` and then ``--device cuda``:

* **fisher** — the data-aware output Fisher of every Linear (``output_fisher``); agreement: the
  relative Frobenius difference of each matrix's Fisher;
* **lq** — the whole LQ candidate table (every format × rank of every Linear: LQ-LoRA's
  alternating SVD / quantisation); agreement: each candidate's error, relative;
* **gptq** — ``compress --method gptq`` (W4, block 64); agreement: the share of integer codes that
  differ, and each matrix's reconstruction error ‖W − Ŵ‖ on CUDA against the CPU's.

It writes ``benchmarks/results/gpu_check.json``: per stage the seconds on each device, the
speed-up, the agreement numbers and whether they are within tolerance.  CBQ and board training
compute on the CPU (not measured here).  Without CUDA it says so and exits with code 2;
``--second cpu`` runs the whole script with the CPU twice (a self-check of the script: every
difference is then zero).

    python benchmarks/gpu_check.py            # on a machine with CUDA
    python benchmarks/gpu_check.py --second cpu --model DIR --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = {"fisher_rel": 1e-3, "lq_error_rel": 1e-2, "gptq_code_share": 0.02, "gptq_error_rel": 0.02}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def fisher_stage(model: Path, device: str, samples: int):
    from quantseal.compress.pipeline import CompressConfig, build_candidate_table

    cfg = CompressConfig(output=Path(tempfile.mkdtemp()) / "x", model=model, budget_bits=4.0, data_aware=True,
                         calib_samples=samples, ranks=(0,), formats=("int4",), workers=1, device=device)
    table = build_candidate_table(cfg)
    return {n: f for n, f in table.fisher.items()}


def lq_stage(model: Path, device: str):
    from quantseal.compress.pipeline import CompressConfig, build_candidate_table

    cfg = CompressConfig(output=Path(tempfile.mkdtemp()) / "x", model=model, budget_bits=4.0, method="lq",
                         ranks=(0, 8, 16, 32), workers=1, device=device)
    table = build_candidate_table(cfg)
    return {o.name: list(o.errors) for o in table.options}


def gptq_stage(model: Path, device: str, samples: int, work: Path):
    from quantseal import checkpoint as ckpt
    from quantseal.compress.calibrated import CalibratedConfig, calibrated_compress

    out = work / f"gptq_{device.replace(':', '_')}"
    calibrated_compress(CalibratedConfig(output=out, model=model, method="gptq", calib_samples=samples, device=device))
    manifest, tensors = ckpt.read_checkpoint(out)
    return manifest, tensors


def compare_gptq(model: Path, a, b) -> dict:
    from quantseal import checkpoint as ckpt
    from quantseal.lazy_source import open_source
    from quantseal.models import load_model

    (ma, ta), (mb, tb) = a, b
    source = open_source(model)
    if source is not None:
        weights = {n: source.get(n + ".weight") for n in ma.matrices}
    else:
        full = load_model(model)[0]
        weights = {n: full.get_submodule(n).weight.detach() for n in ma.matrices}
    differ = total = 0
    worst = 0.0
    for name, e in ma.matrices.items():
        qa, qb = ckpt.stored_quantized(name, e, ta), ckpt.stored_quantized(name, mb.matrices[name], tb)
        differ += int((qa.codes != qb.codes).sum())
        total += qa.codes.numel()
        wa, _, _ = ckpt.dequantized_matrix(name, e, ta)
        wb, _, _ = ckpt.dequantized_matrix(name, mb.matrices[name], tb)
        ea, eb = float((weights[name] - wa).norm()), float((weights[name] - wb).norm())
        worst = max(worst, abs(eb - ea) / max(ea, 1e-30))
    return {"code_share_differing": differ / total, "max_rel_error_change": worst,
            "ok": differ / total <= TOL["gptq_code_share"] and worst <= TOL["gptq_error_rel"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled MiniLM)")
    ap.add_argument("--second", default="cuda", help="the device compared with the CPU (default cuda)")
    ap.add_argument("--samples", type=int, default=64, help="calibration texts for fisher and gptq")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    a = ap.parse_args(argv)
    if a.second.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available to torch (torch.cuda.is_available() is False); run it on a "
              "machine with a GPU (or --second cpu to self-check the script)", file=sys.stderr)
        return 2
    from quantseal.models import default_model_path

    model = a.model or default_model_path()
    torch.manual_seed(0)
    devices = ["cpu", a.second]
    res: dict = {"model": str(model), "devices": devices, "torch": torch.__version__, "tolerances": TOL,
                 "gpu": torch.cuda.get_device_name(0) if a.second.startswith("cuda") else None, "stages": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))

    runs = {d: timed(lambda d=d: fisher_stage(model, d, a.samples), d) for d in devices}
    fa, fb = runs["cpu"][0], runs[a.second][0]
    rel = max(float((fa[n] - fb[n]).norm() / fa[n].norm().clamp(min=1e-30)) for n in fa)
    res["stages"]["fisher"] = {"seconds": {d: round(runs[d][1], 3) for d in devices},
                               "max_rel_diff": rel, "ok": rel <= TOL["fisher_rel"]}

    runs = {d: timed(lambda d=d: lq_stage(model, d), d) for d in devices}
    ea, eb = runs["cpu"][0], runs[a.second][0]
    rel = max(abs(x - y) / max(abs(x), 1e-30) for n in ea for x, y in zip(ea[n], eb[n]))
    res["stages"]["lq"] = {"seconds": {d: round(runs[d][1], 3) for d in devices}, "candidates": sum(map(len, ea.values())),
                           "max_rel_error_diff": rel, "ok": rel <= TOL["lq_error_rel"]}

    runs = {d: timed(lambda d=d: gptq_stage(model, d, a.samples, work), d) for d in devices}
    res["stages"]["gptq"] = {"seconds": {d: round(runs[d][1], 3) for d in devices},
                             **compare_gptq(model, runs["cpu"][0], runs[a.second][0])}

    for st in res["stages"].values():
        s = st["seconds"]
        st["speedup"] = round(s["cpu"] / s[a.second], 3) if s[a.second] > 0 else None
    res["ok"] = all(st["ok"] for st in res["stages"].values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: {"speedup": v["speedup"], "ok": v["ok"]} for k, v in res["stages"].items()}))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
