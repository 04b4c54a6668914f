"""Cost against model size (issue 12, part 4): synthetic seeded LLaMA models of 135M / 360M / 1B
parameters (vocabulary 49152, tied; :mod:`synthetic_llama`), each command in its own process.

Per size:

* ``compress --method rtn --budget 4.5`` and ``compress --method gptq --wbits 4``: wall seconds,
  CPU seconds (``getrusage(RUSAGE_CHILDREN)`` around the child) and peak RSS (the child's own
  ``VmHWM``: Linux carries ``ru_maxrss`` across fork/exec, so a child would report its parent's);
* the LQ candidate table (``--method lq``'s slow step): every default (format, rank) candidate of
  the matrices of **layer 0** (q, k, v, o, gate, up, down), evaluated serially as ``compress
  --workers 1`` does (:func:`quantseal.compress.pipeline._evaluate`, one torch thread); every layer
  has the same shapes, so the model's table is extrapolated as ``layers ×`` that (random weights:
  LQ's iteration count barely varies between layers);
* ``export`` of the RTN checkpoint (default flags: one file under 1.8 GB) and ``export
  --external-data always``;
* decode CPU-ms per token of that export: onnxruntime, 1 intra-op thread, an 8-token prompt then
  32 greedy tokens through the KV cache, process CPU time of the 32 steps / 32;
* ``gptq_phases``: where streamed gptq's peak goes — the same compress of a 2-block model of the
  size's width (``llama-<size>-2blocks``), the resident set and its peak over each Linear's phase.

Then least-squares fits ``a + b·P`` (P = parameters in millions) per command, their 7B and 70B
values (CPU-hours, GB), and a plot.  The Ray rows (candidate table 1 vs 2 local workers vs Ray 2
CPUs; ``export-batch`` customers per minute for 100 customers) are ``benchmarks/scale_ray.py``'s
measurement on MiniLM, copied in from ``results/scale_ray.json`` (not re-run here).

Models and checkpoints live in ``/work/scale_models`` (``--models``), shared and reused.  Each
step's result is stored in ``results/scale_llama.json`` as soon as it is measured, with the git
commit that measured it, so steps can be re-run alone (``--steps``, ``--sizes``).

    .venv/bin/python benchmarks/scale_llama.py                       # everything
    .venv/bin/python benchmarks/scale_llama.py --sizes 1B --steps export,decode
    .venv/bin/python benchmarks/scale_llama.py --render               # fits, plot and table from the JSON
    .venv/bin/python benchmarks/report.py                             # the README block
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NAME = "scale_llama"
SIZES = ("135M", "360M", "1B")
STEPS = ("compress_rtn", "compress_gptq", "compress_cbq", "lq_table", "export", "export_external", "decode",
         "gptq_phases")
FIT_STEPS = ("compress_rtn", "compress_gptq", "compress_cbq", "lq_table", "export")
COMPRESS_STEPS = ("compress_rtn", "compress_gptq", "compress_cbq")
EXTRAPOLATE = {"7B": 7000.0, "70B": 70000.0}

# the child: run one quantseal command in-process, then report its own peak RSS (VmHWM)
_RUNNER = """
import json, sys
from quantseal.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print('SCALE_LLAMA ' + json.dumps({'rc': rc, 'peak_rss_mb': round(hwm / 1024, 1)}), file=sys.stderr)
sys.exit(rc)
"""

_LQ_LAYER = """
import json, sys, time
from pathlib import Path
import torch
from quantseal.compress.formats import expand_families
from quantseal.compress.pipeline import DEFAULT_RANKS, _evaluate, default_families, matrix_candidates
from quantseal.tensorfile import SafetensorsReader
torch.set_num_threads(1)
model = Path(sys.argv[1])
reader = SafetensorsReader(model / 'model.safetensors')
names = [n for n in reader.keys() if n.startswith('model.layers.0.') and n.endswith('_proj.weight')]
formats = expand_families(default_families(model))
rows = []
for n in sorted(names):
    w = reader.get(n).float()
    cands = matrix_candidates(w.shape[0], w.shape[1], formats, DEFAULT_RANKS)
    c0, t0 = time.process_time(), time.perf_counter()
    _evaluate((w, None, cands, True, 4))
    rows.append({'matrix': n, 'shape': list(w.shape), 'candidates': len(cands),
                 'cpu_seconds': round(time.process_time() - c0, 2), 'seconds': round(time.perf_counter() - t0, 2)})
print(json.dumps(rows))
"""

# where streamed gptq's peak goes: the same compress (gptq, W4, the CLI's defaults) of a 2-block model
# of the size's width, the resident set and its peak (VmHWM, reset through /proc/self/clear_refs after
# each reading) at the end of each Linear: each row's peak covers that Linear's phase (its Hessian's
# forward passes, solve, dequantisation and write; the first Linear of a block also the previous
# block's forward pass and this block's load)
_GPTQ_PHASES = """
import json, sys, time
from pathlib import Path
from quantseal.compress.calibrated import CalibratedConfig, calibrated_compress
def mb(field):
    return round(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field)) / 1024, 1)
def reset():
    open('/proc/self/clear_refs', 'w').write('5')
rows = []
def cb(stage, done, total, info):
    rows.append({'layer': info.get('layer'), 'rss_mb': mb('VmRSS'), 'peak_mb': mb('VmHWM')})
    reset()
c0 = time.process_time()
calibrated_compress(CalibratedConfig(model=Path(sys.argv[1]), output=Path(sys.argv[2]), method='gptq', wbits=4,
                                     activation_mb=float(sys.argv[3])), cb)
rows.append({'layer': 'end (table copied through, published)', 'rss_mb': mb('VmRSS'), 'peak_mb': mb('VmHWM')})
print(json.dumps({'phases': rows, 'phase_cpu_seconds': round(time.process_time() - c0, 1),
                  'peak_rss_mb': max(r['peak_mb'] for r in rows)}))
"""

_DECODE = """
import json, sys, time
import numpy as np, onnxruntime as ort
path, prompt_len, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
t0 = time.perf_counter()
s = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
load_s = time.perf_counter() - t0
past = [i for i in s.get_inputs() if i.name.startswith('past_key_values')]
kv, hd = past[0].shape[1], past[0].shape[3]
feeds = {i.name: np.zeros((1, kv, 0, hd), np.float32) for i in past}
ids = (np.arange(prompt_len, dtype=np.int64) * 7919 + 101) % 30000
feeds['input_ids'] = ids[None, :]
feeds['attention_mask'] = np.ones((1, prompt_len), np.int64)
outs = [o.name for o in s.get_outputs()]
def step(feeds):
    res = dict(zip(outs, s.run(outs, feeds)))
    nxt = int(res['logits'][0, -1].argmax())
    total = feeds['attention_mask'].shape[1] + 1
    f = {p.name: res[p.name.replace('past_key_values', 'present')] for p in past}
    f['input_ids'] = np.array([[nxt]], np.int64); f['attention_mask'] = np.ones((1, total), np.int64)
    return f
feeds = step(feeds)
c0, t0 = time.process_time(), time.perf_counter()
for _ in range(new):
    feeds = step(feeds)
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({'cpu_ms_per_token': round(1000 * cpu / new, 2), 'wall_ms_per_token': round(1000 * wall / new, 2),
                  'load_seconds': round(load_s, 2), 'peak_rss_mb': round(hwm / 1024, 1), 'tokens': new}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(argv: list[str], code: str | None = None, timeout: float | None = None) -> dict:
    """Run ``python -c RUNNER argv`` (a quantseal command) or ``python -c code argv`` in a fresh
    process: wall, CPU seconds, the child's peak RSS, and its last JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cpu0, t0, load0 = _children_cpu(), time.perf_counter(), round(os.getloadavg()[0], 2)
    p = subprocess.run([sys.executable, "-c", code or _RUNNER, *argv], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    out = {"wall_seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_children_cpu() - cpu0, 2),
           "load_before": load0, "load_after": round(os.getloadavg()[0], 2), "rc": p.returncode}
    for line in p.stderr.splitlines():
        if line.startswith("SCALE_LLAMA "):
            out.update(json.loads(line[len("SCALE_LLAMA "):]))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("{", "["))]
    if lines:
        out["report"] = json.loads(lines[-1])
    if p.returncode != 0:
        out["stderr_tail"] = p.stderr[-600:]
    return out


def model_folder(models: Path, size: str) -> Path:
    folder = models / f"llama-{size.lower()}"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(HERE))
        from synthetic_llama import make_synthetic

        log(f"making {folder}")
        make_synthetic(size, folder, seed=0)
    return folder


def params_of(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * i
    return {"layers": n, "hidden": h, "params": per_layer * n + v * h + (2 * n + 1) * h,
            "linear_params": per_layer * n, "params_m": round((per_layer * n + v * h + (2 * n + 1) * h) / 1e6, 1)}


def run_step(step: str, size: str, models: Path, work: Path, ck_dir: Path, given: dict[str, Path],
             activation_mb: float = 1024.0, cbq_steps: int = 200) -> dict:
    src = model_folder(models, size)
    ck = {m: ck_dir / f"ck-{size.lower()}-{m}" for m in ("rtn", "gptq", "cbq")}
    if size in given and step not in COMPRESS_STEPS:
        ck["rtn"] = given[size]  # an RTN checkpoint made elsewhere (e.g. by another branch's compress)
    if step in COMPRESS_STEPS:
        method = step.split("_")[1]
        extra = {"rtn": ["--budget", "4.5"], "gptq": ["--wbits", "4", "--activation-mb", f"{activation_mb:g}"],
                 "cbq": ["--wbits", "4", "--activation-mb", f"{activation_mb:g}", "--steps", str(cbq_steps)]}[method]
        res = measured(["compress", str(src), "-o", str(ck[method]), "--method", method, "--workers", "1",
                        "--json", *extra])
        return {**res, "cbq_steps": cbq_steps} if method == "cbq" else res
    if step == "gptq_phases":
        two = models / f"llama-{size.lower()}-2blocks"
        if not (two / "config.json").is_file():
            sys.path.insert(0, str(HERE))
            from synthetic_llama import make_synthetic

            log(f"making {two}")
            make_synthetic(size, two, seed=0, num_hidden_layers=2)
        res = measured([str(two), str(ck_dir / f"ck-{size.lower()}-2blocks-gptq"), f"{activation_mb:g}"],
                       code=_GPTQ_PHASES)
        res.update(res.pop("report", {}))
        return {**res, "model": str(two), "blocks": 2}
    if step == "lq_table":
        res = measured([str(src)], code=_LQ_LAYER)
        rows = res.pop("report", [])
        layer_cpu = sum(r["cpu_seconds"] for r in rows)
        layers = params_of(src)["layers"]
        return {**res, "layer0": rows, "layer_cpu_seconds": round(layer_cpu, 2),
                "cpu_seconds_model": round(layer_cpu * layers, 1),
                "extrapolated": f"layers ({layers}) x layer 0's {len(rows)} matrices"}
    if not (ck["rtn"] / "quantseal.json").is_file():
        raise SystemExit(f"{ck['rtn']}: run the compress_rtn step first")
    out = work / size / step
    if step in ("export", "export_external"):
        extra = ["--external-data", "always"] if step == "export_external" else []
        res = measured(["export", str(ck["rtn"]), "-o", str(out / "model.onnx"), "--json", *extra])
        res["files_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.iterdir())} if out.is_dir() else {}
        return res
    if step == "decode":
        onnx = work / size / "export" / "model.onnx"
        if not onnx.is_file():
            run_step("export", size, models, work, ck_dir, given)
        res = measured([str(onnx), "8", "32"], code=_DECODE)
        res.update(res.pop("report", {}))
        return res
    raise ValueError(step)


# ----------------------------------------------------------------------------- fits
def _lstsq(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def _metric(step: str, row: dict, what: str) -> float | None:
    if row.get("rc", 0) != 0:
        return None
    if what == "cpu" and row.get("partial"):  # a run stopped before its end: its peak, not its CPU total
        return None
    if what == "cpu":
        return row.get("cpu_seconds_model") if step == "lq_table" else row.get("cpu_seconds")
    return None if step == "lq_table" else row.get("peak_rss_mb")


def fits(res: dict) -> dict:
    """Least-squares ``a + b·P`` of CPU seconds and peak RSS (MB) per step, and 7B / 70B values."""
    out = {}
    for step in FIT_STEPS:
        for what in ("cpu", "rss"):
            pts = [(res["models"][s]["params_m"], _metric(step, res["runs"].get(s, {}).get(step, {}), what))
                   for s in SIZES if s in res["runs"] and step in res["runs"][s]]
            pts = [(p, y) for p, y in pts if y is not None]
            if len(pts) < 2:
                continue
            a, b = _lstsq([p for p, _ in pts], [y for _, y in pts])
            ext = {k: (round((a + b * p) / 3600, 2) if what == "cpu" else round((a + b * p) / 1000, 1))
                   for k, p in EXTRAPOLATE.items()}
            out[f"{step}.{what}"] = {"a": round(a, 2), "b": round(b, 4), "points": len(pts),
                                     "unit": "CPU-hours" if what == "cpu" else "GB", **ext}
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what, label in ((axes[0], "cpu", "CPU seconds"), (axes[1], "rss", "peak RSS (MB)")):
        for step in FIT_STEPS:
            pts = [(res["models"][s]["params_m"], _metric(step, res["runs"].get(s, {}).get(step, {}), what))
                   for s in SIZES if step in res["runs"].get(s, {})]
            pts = [(p, y) for p, y in pts if y is not None]
            if not pts:
                continue
            color = f"C{FIT_STEPS.index(step)}"  # one colour per command in both panels
            ax.plot([p for p, _ in pts], [y for _, y in pts], "o", color=color, label=step)
            f = res["fits"].get(f"{step}.{what}")
            if f:
                xs = [0, max(p for p, _ in pts)]
                ax.plot(xs, [f["a"] + f["b"] * x for x in xs], "-", color=color, alpha=0.6)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("CPU seconds against size (LQ table: layer 0 x layers)")
    axes[1].set_title("peak RSS against size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict) -> None:
    _ray_rows(res)
    res["fits"] = fits(res)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    if any(res["runs"].values()):
        plot(res, RESULTS / f"{NAME}.png")


def _ray_rows(res: dict) -> None:
    """The Ray rows, from scale_ray.py's measurement (MiniLM), not re-run here."""
    ray = RESULTS / "scale_ray.json"
    if ray.is_file():
        r = json.loads(ray.read_text())
        res["ray"] = {"source": "results/scale_ray.json (benchmarks/scale_ray.py, MiniLM)",
                      "table_seconds": {k: v["seconds"] for k, v in r["table"].items()},
                      "export_customers_per_minute": {k: v["customers_per_minute"] for k, v in r["export"].items()},
                      "customers": next(iter(r["export"].values()))["customers"],
                      "identical": {"table": r.get("table_identical"), "export": r.get("export_identical")}}


def _load() -> dict:
    path = RESULTS / f"{NAME}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"models": {}, "runs": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/work/scale_models"))
    ap.add_argument("--work", type=Path, default=None, help="export folders (default: a temporary folder)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--ck-dir", type=Path, default=Path("/work/scale_models/stream-export"),
                    help="where the compress steps write their checkpoints")
    ap.add_argument("--rtn-checkpoint", action="append", default=[], metavar="SIZE=PATH",
                    help="export/decode this RTN checkpoint for SIZE instead of ck-dir's")
    ap.add_argument("--activation-mb", type=float, default=1024.0,
                    help="compress gptq/cbq --activation-mb (the CLI's default: calibration activations held in memory)")
    ap.add_argument("--cbq-steps", type=int, default=200, help="compress cbq --steps (the CLI's default)")
    ap.add_argument("--render", action="store_true", help="only recompute fits, plot and table from the JSON")
    ap.add_argument("--note", help="a line stored with the results (which code measured what), shown under the table")
    ap.add_argument("--gptq-memory", help="a paragraph stored with the results: where gptq's peak goes (shown under "
                                          "the gptq_phases table)")
    a = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    res = _load()
    _ray_rows(res)
    if a.note is not None:
        res["note"] = a.note
    if a.gptq_memory is not None:
        res["gptq_memory"] = a.gptq_memory
    if a.render:
        render(res)
        return
    sizes = [s for s in a.sizes.split(",") if s]
    steps = [s for s in a.steps.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES] + [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown size or step {unknown[0]!r}")
    work = a.work or Path(tempfile.mkdtemp(prefix="scale_llama."))
    given = {k: Path(v) for k, v in (x.split("=", 1) for x in a.rtn_checkpoint)}
    a.ck_dir.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        folder = model_folder(a.models, size)
        res["models"][size] = {**params_of(folder), "folder": str(folder)}
        for step in steps:
            log(f"{size} {step} ...")
            code = commit()  # the code the step's process runs
            row = run_step(step, size, a.models, work, a.ck_dir, given, a.activation_mb, a.cbq_steps)
            if size in given and step not in COMPRESS_STEPS:
                row["checkpoint"] = str(given[size])
            row.update({"commit": code, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
            res = _load()  # another run may have stored rows meanwhile: update only this one
            res["models"][size] = {**params_of(folder), "folder": str(folder)}
            res["runs"].setdefault(size, {})[step] = row
            log(f"{size} {step}: rc {row.get('rc')}, {row.get('cpu_seconds')} CPU s, "
                f"{row.get('peak_rss_mb')} MB peak, {row.get('wall_seconds')} s wall")
            render(res)
    render(res)


if __name__ == "__main__":
    main()
