"""Start time and peak memory of ``quantseal run model.onnx --text hi`` (issue 13, part 7).

Each variant is a fresh process; the wall time is from spawn to exit (interpreter start, imports,
onnxruntime session, tokeniser, one embedding, output), the peak RSS is the child's ``ru_maxrss``
from ``os.wait4``.  Linux folds the launching process's high-water mark into a child's
``ru_maxrss`` at exec, so this script stays small (stdlib only, the model is built by
subprocesses) and records its own peak RSS to show that it is below every measured child.
Variants run round-robin, ``--repeats`` times each, so that load drift hits them alike; the table
gives medians (and min/max).

* ``after``: this checkout (``python -m quantseal.cli run ...``);
* ``before``: the same command on the package as it was at ``--before REV`` (extracted with
  ``git archive`` into a temporary folder put first on ``PYTHONPATH``), whose CLI imported
  transformers in every command;
* ``python``: ``python -c pass``, the interpreter's floor;
* ``runtime imports``: ``python -c "import numpy, onnxruntime, tokenizers"``, the libraries' floor.

The model is the bundled all-MiniLM-L6-v2 compressed by RTN at 4.5 bits and exported
(``--model`` to use another file).

    python benchmarks/start_time.py [--before c969ff8] [--repeats 9]   # results/start_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_BEFORE = "c969ff8"  # main before the fast-start change


def build_model(work: Path) -> Path:
    """Compress the bundled MiniLM (RTN, 4.5 bits) and export it, in subprocesses."""
    ck, out = work / "ck", work / "onnx" / "model.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["compress", "-o", str(ck), "--budget", "4.5", "--method", "rtn", "--workers", "1", "--json"],
                 ["export", str(ck), "-o", str(out), "--json"]):
        subprocess.run([sys.executable, "-m", "quantseal.cli", *argv], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return out


def extract_revision(rev: str, dest: Path) -> Path:
    """``quantseal/`` as it was at ``rev``, unpacked under ``dest`` (for PYTHONPATH)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "quantseal"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one fresh process; it must exit 0."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {err[-500:]}")
    return wall, usage.ru_maxrss / 1024.0


def summarise(walls: list[float], rss: list[float]) -> dict:
    return {"wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
            "wall_s_max": round(max(walls), 3), "peak_rss_mb_median": round(statistics.median(rss), 1),
            "wall_s": [round(w, 3) for w in walls], "peak_rss_mb": [round(r, 1) for r in rss]}


def render(res: dict) -> str:
    rows = ["| variant | wall s (median) | min–max | peak RSS MB (median) |", "|---|---:|---:|---:|"]
    for name, r in res["variants"].items():
        rows.append(f"| {name} | {r['wall_s_median']:.2f} | {r['wall_s_min']:.2f}–{r['wall_s_max']:.2f} "
                    f"| {r['peak_rss_mb_median']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an exported encoder (default: build MiniLM RTN 4.5 bits)")
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git revision for the 'before' variant ('' to skip)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "start_time.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quantseal-start.") as tmp:
        tmp = Path(tmp)
        model = args.model or build_model(tmp)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        run = [sys.executable, "-m", "quantseal.cli", "run", str(model), "--text", "hi"]
        variants = {"after": (run, env)}
        if args.before:
            old = extract_revision(args.before, tmp / "before")
            variants["before"] = (run, dict(env, PYTHONPATH=str(old)))
        variants["python -c pass"] = ([sys.executable, "-c", "pass"], env)
        variants["runtime imports"] = ([sys.executable, "-c", "import numpy, onnxruntime, tokenizers"], env)
        for argv, e in variants.values():  # warm the page cache once
            measure(argv, e)
        load_before = os.getloadavg()
        walls = {k: [] for k in variants}
        rss = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, (argv, e) in variants.items():
                w, r = measure(argv, e)
                walls[name].append(w)
                rss[name].append(r)
        load_after = os.getloadavg()
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res = {
        "command": "quantseal run model.onnx --text hi",
        "model": "bundled all-MiniLM-L6-v2, quantseal compress --method rtn --budget 4.5, export" if args.model is None
        else str(args.model),
        "before_revision": args.before or None,
        "repeats": args.repeats,
        "variants": {k: summarise(walls[k], rss[k]) for k in variants},
        "launcher_peak_rss_mb": round(own_rss, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "target_s": 1.2,
    }
    res["done_when"] = {"after_median_s": res["variants"]["after"]["wall_s_median"],
                        "target_met": res["variants"]["after"]["wall_s_median"] <= 1.2}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    tmp_out.replace(args.out)
    print(render(res))
    print(f"load average {res['load_average_before']} -> {res['load_average_after']}; launcher peak RSS "
          f"{own_rss:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
