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
SMOLLM2_SHAPES = ((576, 576), (576, 960), (576, 3072), (1536, 576))  # (K, N): o, q/k/v, gate/up, down
FORMATS = ["int2_b32", "int4_b32", "int4_b64", "int4_b128", "int4s_b32", "int4f_b32", "int8_b32", "int8_b64",
           "int8_b128", "nf4_b64", "fp16", "fp32"]


def _session(k: int, n: int, fmt: str, level: int):
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
    g = linear_nodes(StoredMatrix("w", spec, (n, k), tensors), "x", "y", level)
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


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
    ap.add_argument("--shapes", default="default", choices=["default", "smollm2"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes over every (format, shape); best kept")
    ap.add_argument("--out", default="decode_cost")
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    shapes = SHAPES if args.shapes == "default" else SMOLLM2_SHAPES
    keys = [(fmt, level) for fmt in formats for level in ((4, 0) if fmt.startswith("int") else (0,))]
    sessions = {(fmt, level, k, n): _session(k, n, fmt, level) for fmt, level in keys for k, n in shapes}
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
