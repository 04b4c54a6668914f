"""Per-token cost of each storage format's onnxruntime op at batch 1 (one decoded token), on CPU.

For every format the ILP can choose, one single-node graph (``MatMulNBits`` at accuracy level 4 and
0, ``MatMulBnb4`` for nf4, ``MatMul`` for a float matrix, which an fp16 file runs in float32 after
onnxruntime folds the Cast) is timed on ``x: (1, 1, K)`` for a few (K, N) shapes, one thread, CPU
time (``time.process_time``, so other load on the machine inflates it little), best of several
repeats.  The fitted cost per million weights is what :mod:`quantseal.compress.decode_cost`
stores: rerun this script on a new machine and copy the ``us_per_mparam`` column there.

    .venv/bin/python benchmarks/decode_cost.py
    .venv/bin/python benchmarks/decode_cost.py --formats int4_b32,int4f_b32 --shapes smollm2 --out decode_cost_int4f

``int4f_b32`` (float block offsets) runs as MatMulNBits without zero points + Reshape/ReduceSum +
a float32 MatMul of the folded ``M' = m + 8s`` + Add (export/lowbit.py); the file holds float16
offsets, cast and folded at session load.  ``--shapes smollm2``: SmolLM2-135M's four products
(576→576 o, 576→960 packed q/k/v, 576→3072 gate/up, 1536→576 down), formats interleaved per repeat.

``--cold``: the way a real decoder runs.  One matrix's weights stay in the caches between runs, but
a model's (86 MB for SmolLM2 at 4 bits) never do: every decoded token streams them from memory,
and the cost follows the bytes the kernel reads (codes, scales, zero points and its packed block
sums).  With ``--cold`` each session holds copies of the matrix under distinct names, ~``--cold-mb``
MB in all (well above the L3 cache), every copy applied to ``x`` and summed; the cost is wall µs per
million weights at ``--threads``, median of interleaved repeats.

    .venv/bin/python benchmarks/decode_cost.py --cold --shapes smollm2 --formats int4_b32,... --threads 1,2 --out decode_cost_cold

Writes ``benchmarks/results/decode_cost.json`` (``--out NAME``: NAME.json).  Not a test.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((576, 1536), (1536, 576), (2048, 2048))
SMOLLM2_SHAPES = ((576, 576), (576, 960), (576, 1536), (1536, 576))  # (K, N): o, q/k/v, gate|up, down
HEAD_SHAPES = ((576, 49152), (960, 49152), (2048, 32000))  # (K, N): tied LM heads (SmolLM2 135M / 360M, a 1B)
FORMATS = ["int2_b32", "int4_b32", "int4_b64", "int4_b128", "int4s_b32", "int4f_b32", "int8_b32", "int8_b64",
           "int8_b128", "nf4_b64", "fp16", "fp32"]


def _session(k: int, n: int, fmt: str, level: int, threads: int = 1, cold_mb: float = 0.0):
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from quantseal.checkpoint import matrix_tensors
    from quantseal.compress.formats import FormatSpec
    from quantseal.compress.quantizers import quantize
    from quantseal.export.lowbit import MS_DOMAIN, OPSET, StoredMatrix, linear_nodes

    spec = FormatSpec.parse(fmt)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    qt = None if spec.kind == "fp" else quantize(w, spec, clip_search=False)
    tensors = {key.rsplit(".", 1)[1]: v.numpy() for key, v in matrix_tensors("w", spec, qt, w, None, None).items()}
    copies = 1
    if cold_mb:
        copies = max(2, int(np.ceil(cold_mb * 1e6 / sum(v.nbytes for v in tensors.values()))))
    nodes, inits = [], []
    for c in range(copies):
        g = linear_nodes(StoredMatrix(f"w{c}", spec, (n, k), tensors), "x", "y" if copies == 1 else f"y{c}", level)
        nodes += g.nodes
        inits += g.initializers
    if copies > 1:
        nodes.append(helper.make_node("Sum", [f"y{c}" for c in range(copies)], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, copies


def wall_us(sess, k: int, runs: int) -> float:
    """Median wall µs of ``runs`` runs (after two warm-up runs)."""
    x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
    for _ in range(2):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times))


def cold(args, formats: list[str], shapes) -> list[dict]:
    """Per-format wall µs per million weights with the weights streamed from memory (``--cold``)."""
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for t in threads:
        per: dict = {}
        sessions = {}
        for fmt in formats:
            for k, n in shapes:
                sessions[fmt, k, n] = _session(k, n, fmt, 4 if fmt.startswith("int") else 0, t, args.cold_mb)
        for _ in range(args.repeats):  # interleaved: a burst of other load hits every format alike
            for (fmt, k, n), (sess, copies) in sessions.items():
                per.setdefault((fmt, k, n), []).append(wall_us(sess, k, args.runs) / (copies * k * n / 1e6))
        del sessions
        for fmt in formats:
            shape_rows = [{"K": k, "N": n, "us_per_mparam": round(float(np.median(per[fmt, k, n])), 2),
                           "repeats": [round(v, 2) for v in per[fmt, k, n]]} for k, n in shapes]
            fit = float(np.median([r["us_per_mparam"] for r in shape_rows]))
            rows.append({"format": fmt, "accuracy_level": 4 if fmt.startswith("int") else 0, "threads": t,
                         "us_per_mparam": round(fit, 2), "shapes": shape_rows})
            print(f"{fmt:10s} {t} thread(s): {fit:8.1f} us per M weights "
                  f"({', '.join(str(r['us_per_mparam']) for r in shape_rows)})", file=sys.stderr, flush=True)
    return rows


def time_us(sess, k: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` mean CPU µs of one run, each repeat at least ~0.2 s of work."""
    x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
    c = time.process_time()
    sess.run(None, {"x": x})
    first = max(time.process_time() - c, 1e-5)
    n = int(min(50, max(2, 0.2 / first)))
    for _ in range(2):
        sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        c = time.process_time()
        for _ in range(n):
            sess.run(None, {"x": x})
        best = min(best, (time.process_time() - c) / n)
    return 1e6 * best


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default="default", choices=["default", "smollm2", "head"],
                    help="smollm2: SmolLM2-135M's four Linear products; head: tied LM heads (vocab-wide N)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes over every (format, shape); best kept")
    ap.add_argument("--out", default="decode_cost")
    ap.add_argument("--cold", action="store_true", help="weights streamed from memory, as in a real decoder")
    ap.add_argument("--cold-mb", type=float, default=96.0, help="--cold: MB of weight copies per session")
    ap.add_argument("--threads", default="1", help="--cold: thread counts, comma-separated")
    ap.add_argument("--runs", type=int, default=20, help="--cold: timed runs per repeat (median)")
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    shapes = {"default": SHAPES, "smollm2": SMOLLM2_SHAPES, "head": HEAD_SHAPES}[args.shapes]
    if args.cold:
        rows = cold(args, formats, shapes)
        RESULTS.mkdir(exist_ok=True)
        out = {"benchmark": "decode_cost", "mode": "cold", "cold_mb": args.cold_mb, "command": " ".join(sys.argv),
               "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg(), "rows": rows}
        (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    keys = [(fmt, level) for fmt in formats for level in ((4, 0) if fmt.startswith("int") else (0,))]
    sessions = {(fmt, level, k, n): _session(k, n, fmt, level)[0] for fmt, level in keys for k, n in shapes}
    best: dict = {}
    for _ in range(args.repeats):  # interleaved: load on a shared machine hits every format alike
        for key, sess in sessions.items():
            best[key] = min(best.get(key, float("inf")), time_us(sess, key[2], repeats=1))
    rows = []
    for fmt, level in keys:
        per = []
        for k, n in shapes:
            us = best[fmt, level, k, n]
            per.append({"K": k, "N": n, "us": round(us, 1), "us_per_mparam": round(us / (k * n / 1e6), 2)})
        fit = float(np.median([p["us_per_mparam"] for p in per]))
        rows.append({"format": fmt, "accuracy_level": level, "us_per_mparam": round(fit, 2), "shapes": per})
        print(f"{fmt:10s} acc{level}: {fit:8.1f} us per M weights", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "decode_cost", "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "load_avg": os.getloadavg(), "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
