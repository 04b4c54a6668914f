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
* ``runtime imports``: ``python -c "import numpy, onnxruntime, tokenizers"``, the libraries' floor;
* ``after, --budget-mb 12 file``: ``after`` on the same model compressed to a 12 MB file (the
  token table quantised too): most of the session's load time is reading the weights.

The model is the bundled all-MiniLM-L6-v2 compressed by RTN at 4.5 bits and exported
(``--model`` to use another file).

    python benchmarks/start_time.py [--before c969ff8] [--repeats 9]   # results/start_time.json + README block
    python benchmarks/start_time.py --render   # rewrite the README block from the JSON only
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


def build_model(work: Path, budget: tuple[str, str] = ("--budget", "4.5")) -> Path:
    """Compress the bundled MiniLM (RTN under ``budget``) and export it, in subprocesses."""
    ck, out = work / "ck", work / "onnx" / "model.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["compress", "-o", str(ck), *budget, "--method", "rtn", "--workers", "1", "--json"],
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


def measure(argv: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one fresh process run in ``cwd``; it must exit 0.  ``cwd``
    must not hold a ``quantseal`` folder: ``python -m`` puts it first on ``sys.path``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


README_BEGIN = "<!-- start_time:begin (python benchmarks/start_time.py --render) -->"
README_END = "<!-- start_time:end -->"


def readme_block(res: dict) -> str:
    after = res["variants"]["after"]
    before = res["variants"].get("before")
    lines = [README_BEGIN, "### Start time of `quantseal run` (runtime commands import neither torch nor transformers)", "",
             f"`{res['command']}` on {res['model']}: wall time from spawn to exit and peak RSS of a fresh process, "
             f"median of {res['repeats']} runs per variant, round-robin. `before` is the package at "
             f"`{res['before_revision']}`, whose CLI imported transformers in every command."
             + "".join(f" `{k}`: {v / 1e6:.1f} MB file." for k, v in res.get("model_bytes", {}).items()), "",
             render(res), "",
             f"Target ≤ {res['target_s']} s: median {after['wall_s_median']:.2f} s "
             f"({'met' if res['done_when']['target_met'] else 'not met'} in this run)"
             + (f"; before {before['wall_s_median']:.2f} s / {before['peak_rss_mb_median']:.0f} MB" if before else "")
             + f". Load average {res['load_average_before'][0]:.1f} → {res['load_average_after'][0]:.1f} "
             f"on {res['cpus']} cores (shared with other jobs: wall times are load-bound; the floor rows show "
             f"what the interpreter and the runtime libraries alone take in the same run).", README_END]
    return "\n".join(lines)


def write_readme(res: dict, readme: Path) -> None:
    """Replace (or append) this benchmark's block in benchmarks/README.md."""
    text = readme.read_text(encoding="utf-8")
    block = readme_block(res)
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an exported encoder (default: build MiniLM RTN 4.5 bits)")
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git revision for the 'before' variant ('' to skip)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "start_time.json")
    ap.add_argument("--readme", default=str(HERE / "README.md"), help="README to put the table in ('' to skip)")
    ap.add_argument("--render", action="store_true", help="only rewrite the README block from --out")
    args = ap.parse_args()
    if args.render:
        write_readme(json.loads(args.out.read_text()), Path(args.readme))
        return
    with tempfile.TemporaryDirectory(prefix="quantseal-start.") as tmp:
        tmp = Path(tmp)
        model = args.model or build_model(tmp)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        run = [sys.executable, "-m", "quantseal.cli", "run", str(model), "--text", "hi"]
        variants = {"after": (run, env)}
        sizes = {"after": model.stat().st_size}
        if args.model is None:  # the same command on a file whose token table is quantised too
            small = build_model(tmp / "small", ("--budget-mb", "12"))
            variants["after, --budget-mb 12 file"] = (
                [sys.executable, "-m", "quantseal.cli", "run", str(small), "--text", "hi"], env)
            sizes["after, --budget-mb 12 file"] = small.stat().st_size
        if args.before:
            old = extract_revision(args.before, tmp / "before")
            variants["before"] = (run, dict(env, PYTHONPATH=str(old)))
        variants["python -c pass"] = ([sys.executable, "-c", "pass"], env)
        variants["runtime imports"] = ([sys.executable, "-c", "import numpy, onnxruntime, tokenizers"], env)
        which = "import quantseal, sys; print(quantseal.__file__)"
        for name, (argv, e) in variants.items():  # warm the page cache once; check which package runs
            measure(argv, e, tmp)
            if name.startswith("after") or name == "before":
                where = subprocess.run([sys.executable, "-c", which], env=e, cwd=tmp, capture_output=True,
                                       text=True, check=True).stdout.strip()
                expected = str(tmp / "before") if name == "before" else str(ROOT)
                if not where.startswith(expected):
                    raise RuntimeError(f"variant {name!r} imports quantseal from {where}, not {expected}")
        load_before = os.getloadavg()
        walls = {k: [] for k in variants}
        rss = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, (argv, e) in variants.items():
                w, r = measure(argv, e, tmp)
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
        "model_bytes": sizes,
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
    if args.readme:
        write_readme(res, Path(args.readme))
    print(render(res))
    print(f"load average {res['load_average_before']} -> {res['load_average_after']}; launcher peak RSS "
          f"{own_rss:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
