"""CPU vs CUDA solvers on MiniLM (issue #12): do they agree, and how much faster is the GPU?

One script for a lent GPU machine.  It runs, with ``--device cpu`` and then ``--device cuda``:

* **fisher** — the data-aware output Fisher of every Linear (``output_fisher``); agreement: the
  relative Frobenius difference of each matrix's Fisher;
* **lq** — the whole LQ candidate table (every format × rank of every Linear: LQ-LoRA's
  alternating SVD / quantisation); agreement: each candidate's error, relative;
* **gptq** — ``compress --method gptq`` (W4, block 64); agreement: the share of integer codes that
  differ, and each matrix's reconstruction error ‖W − Ŵ‖ on CUDA against the CPU's;
* **cbq** — ``compress --method cbq`` (W4A8, GPTQ start, ``--cbq-steps`` per window); Adam through
  hard rounding is chaotic, so the two devices' codes drift apart: agreement is each matrix's
  reconstruction error ‖W − Ŵ‖ and the mean final window loss, CUDA against the CPU, within a
  looser tolerance (the share of differing codes is reported);
* **board** — ``board train`` (16 bits) on an RTN checkpoint made on the CPU; agreement: both
  boards meet the margin on every branch with every trigger bit right, and their smallest
  signed statistics are within a tolerance of each other.

It writes ``benchmarks/results/gpu_check.json``: per stage the seconds on each device, the
speed-up, the agreement numbers and whether they are within tolerance.  Without CUDA it says so and exits with code 2;
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

TOL = {"fisher_rel": 1e-3, "lq_error_rel": 1e-2, "gptq_code_share": 0.02, "gptq_error_rel": 0.02,
       "cbq_error_rel": 0.05, "cbq_loss_rel": 0.25, "board_min_stat_rel": 0.5}


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


def cbq_stage(model: Path, device: str, samples: int, steps: int, work: Path):
    from quantseal import checkpoint as ckpt
    from quantseal.compress.calibrated import CalibratedConfig, calibrated_compress

    out = work / f"cbq_{device.replace(':', '_')}"
    calibrated_compress(CalibratedConfig(output=out, model=model, method="cbq", abits=8, steps=steps,
                                         calib_samples=samples, device=device))
    return ckpt.read_checkpoint(out)


def board_stage(checkpoint: Path, key: bytes, device: str):
    from quantseal.compress.markboard import BoardConfig, train_board

    return train_board(checkpoint, key, BoardConfig(bits=16), device=device).manifest["training"]


def compare_board(a: dict, b: dict) -> dict:
    rel = abs(a["min_signed_stat"] - b["min_signed_stat"]) / max(abs(a["min_signed_stat"]), 1e-30)
    keys = ("train_bit_accuracy", "train_trigger_accuracy", "min_signed_stat", "branches_below_margin", "steps_run")
    return {"cpu": {k: a[k] for k in keys}, "second": {k: b[k] for k in keys}, "min_stat_rel_diff": rel,
            "ok": (a["branches_below_margin"] == b["branches_below_margin"] == 0 and b["train_trigger_accuracy"] == 1.0
                   and rel <= TOL["board_min_stat_rel"])}


def compare_gptq(model: Path, a, b, code_tol: float | None = None, error_tol: float | None = None) -> dict:
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
    code_tol = TOL["gptq_code_share"] if code_tol is None else code_tol
    error_tol = TOL["gptq_error_rel"] if error_tol is None else error_tol
    return {"code_share_differing": differ / total, "max_rel_error_change": worst,
            "ok": differ / total <= code_tol and worst <= error_tol}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled MiniLM)")
    ap.add_argument("--second", default="cuda", help="the device compared with the CPU (default cuda)")
    ap.add_argument("--samples", type=int, default=64, help="calibration texts for fisher and gptq")
    ap.add_argument("--cbq-steps", type=int, default=50, help="cbq: training steps per window")
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

    runs = {d: timed(lambda d=d: cbq_stage(model, d, a.samples, a.cbq_steps, work), d) for d in devices}
    cmp = compare_gptq(model, runs["cpu"][0], runs[a.second][0], code_tol=1.0, error_tol=TOL["cbq_error_rel"])
    la = runs["cpu"][0][0].extra["window_losses"]
    lb = runs[a.second][0][0].extra["window_losses"]
    loss_rel = abs(sum(lb) - sum(la)) / max(sum(la), 1e-30)
    res["stages"]["cbq"] = {"seconds": {d: round(runs[d][1], 3) for d in devices}, "steps": a.cbq_steps, **cmp,
                            "mean_window_loss": {"cpu": sum(la) / len(la), a.second: sum(lb) / len(lb)},
                            "loss_rel_diff": loss_rel, "ok": cmp["ok"] and loss_rel <= TOL["cbq_loss_rel"]}

    from quantseal.compress.pipeline import CompressConfig, compress
    from quantseal.keys import generate_key

    ck = work / "rtn"
    compress(CompressConfig(output=ck, model=model, budget_bits=4.5, method="rtn", workers=1, device="cpu"))
    key = generate_key()
    runs = {d: timed(lambda d=d: board_stage(ck, key, d), d) for d in devices}
    res["stages"]["board"] = {"seconds": {d: round(runs[d][1], 3) for d in devices},
                              **compare_board(runs["cpu"][0], runs[a.second][0])}

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
