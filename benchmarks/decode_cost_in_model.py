"""Per-format decode cost measured inside a whole decoder: what ``compress --max-decode-ms`` plans with.

One matrix timed alone says little about a decoder: a model's weights stream from memory every
token, through kernels whose cost depends on the bytes, the block and the shape.  This script
takes onnxruntime-genai's int4 export of SmolLM2 (every Linear and the tied head MatMulNBits int4
at block 32) and writes, for each format F, two copies of it: ``lin-F`` with the 150 Linears
re-quantised to F (round to nearest from the dequantised weights; the head unchanged) and
``head-F`` with only the head re-quantised (its own copy; the lookup keeps the original table).
Everything else (attention, norms, the KV cache) is the same graph.  All variants are loaded in one
process and one decode step (past 40) of each is timed in turn, ``--rounds`` rounds in a shuffled
order, each round the median of ``--steps`` steps (CPU time at 1 thread, wall time otherwise).

The per-weight cost of F follows from the time it adds or saves against the original:
``u(F) = u(int4_b32) + (t(F) − t(ref)) / weights``, anchored by onnxruntime's profile of the
original (the MatMulNBits kernels' share of the step, split between the Linears and the head).

    .venv/bin/python benchmarks/decode_cost_in_model.py --builder /tmp/smol/builder-int4

Writes ``benchmarks/results/decode_cost_in_model.json``.  Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("int4_b64", "int4_b128", "int8_b32", "int8_b64", "int8_b128")
HEAD_MIN_N = 8192


# ----------------------------------------------------------------------------- MatMulNBits codes
def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, n: int, k: int, bits: int,
               block: int) -> np.ndarray:
    """float32 (N, K) of a MatMulNBits weight (codes (N, blocks, block·bits/8), zero points packed
    two per byte at 4 bits, one per byte at 8, default 2^(bits−1))."""
    nb = -(-k // block)
    b = codes.reshape(n, nb, -1)
    q = b if bits == 8 else np.stack([b & 15, b >> 4], -1).reshape(n, nb, block)
    s = scales.reshape(n, nb, 1).astype(np.float32)
    if zeros is None:
        z = np.full((n, nb, 1), 2.0 ** (bits - 1), np.float32)
    elif bits == 8:
        z = zeros.reshape(n, nb, 1).astype(np.float32)
    else:
        zz = zeros.reshape(n, -1)
        z = np.stack([zz & 15, zz >> 4], -1).reshape(n, -1)[:, :nb, None].astype(np.float32)
    return ((q.astype(np.float32) - z) * s).reshape(n, nb * block)[:, :k]


def quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round to nearest in MatMulNBits' layout: (codes, scales, zero points)."""
    n, k = w.shape
    nb = -(-k // block)
    w = np.concatenate([w, np.zeros((n, nb * block - k), w.dtype)], 1).reshape(n, nb, block)
    top = 2 ** bits - 1
    lo, hi = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    s = np.maximum((hi - lo) / top, 1e-8)
    z = np.clip(np.round(-lo / s), 0, top)
    q = np.clip(np.round(w / s[..., None] + z[..., None]), 0, top).astype(np.uint8)
    if bits == 8:
        return q, s.astype(np.float32).reshape(-1), z.astype(np.uint8).reshape(-1)
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zq = z.astype(np.uint8)
    if nb % 2:
        zq = np.concatenate([zq, np.zeros((n, 1), np.uint8)], 1)
    return codes, s.astype(np.float32).reshape(-1), (zq[:, 0::2] | (zq[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def requantized_copy(src: Path, dst: Path, fmt: str, head: bool) -> int:
    """``src``'s model with its Linears (``head=False``) or its head re-quantised to ``fmt``; the
    number of weights moved."""
    import onnx
    from onnx import numpy_helper as nh

    bits, block = int(fmt.split("_b")[0][3:]), int(fmt.split("_b")[1])
    m = onnx.load(str(src / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    moved = 0
    for nd in m.graph.node:
        if nd.op_type != "MatMulNBits":
            continue
        a = {x.name: x for x in nd.attribute}
        n, k = a["N"].i, a["K"].i
        if (n >= HEAD_MIN_N) != head:
            continue
        zeros = nh.to_array(inits[nd.input[3]]) if len(nd.input) > 3 and nd.input[3] else None
        w = dequantize(nh.to_array(inits[nd.input[1]]), nh.to_array(inits[nd.input[2]]), zeros, n, k, a["bits"].i,
                       a["block_size"].i)
        while len(nd.input) < 4:
            nd.input.append("")
        for j, arr in zip((1, 2, 3), quantize(w, bits, block)):  # new names: the lookup may share the head's
            name = f"{nd.name}.requantized.{j}"
            m.graph.initializer.append(nh.from_array(arr, name))
            nd.input[j] = name
        a["bits"].i, a["block_size"].i = bits, block
        moved += n * k
    used = {i for nd in m.graph.node for i in nd.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst / "model.onnx"))
    shutil.copy(src / "genai_config.json", dst / "genai_config.json")
    return moved


# ----------------------------------------------------------------------------- timing
def decode_session(folder: Path, threads: int, profile: str | None = None):
    """An onnxruntime session of ``folder`` and the feeds of one decode step after 40 tokens."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    past, feeds = 40, {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.full((1, 1), 100, np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + 1), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.array([[past]], np.int64)
        else:
            shape = (1, cfg["num_key_value_heads"], past, cfg["head_size"])
            feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        s.run(None, feeds)
    return s, feeds


def matmul_shares(folder: Path) -> tuple[float, float, float]:
    """From onnxruntime's profile of ``folder``'s decode step: the Linears' and the head's
    MatMulNBits shares of the summed kernel time, and the head's weights."""
    import onnx

    s, feeds = decode_session(folder, 1, profile=str(folder / "profile"))
    for _ in range(30):
        s.run(None, feeds)
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    heads = {nd.name for nd in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
             if nd.op_type == "MatMulNBits" and any(a.name == "N" and a.i >= HEAD_MIN_N for a in nd.attribute)}
    total = lin = head = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total += e["dur"]
            if e["args"]["op_name"] == "MatMulNBits":
                if e["name"][: -len("_kernel_time")] in heads:
                    head += e["dur"]
                else:
                    lin += e["dur"]
    return lin / total, head / total


def time_variants(folders: dict[str, Path], threads: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per variant, the median ms of ``steps`` decode steps in each of ``rounds`` shuffled rounds."""
    clock = time.process_time if threads == 1 else time.perf_counter
    sessions = {name: decode_session(f, threads) for name, f in folders.items()}
    out: dict[str, list[float]] = {name: [] for name in folders}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(folders)
        rng.shuffle(order)
        for name in order:
            s, feeds = sessions[name]
            ts = []
            for _ in range(steps):
                t = clock()
                s.run(None, feeds)
                ts.append(clock() - t)
            out[name].append(1e3 * float(np.median(ts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builder", type=Path, required=True, help="onnxruntime-genai's int4 export (MatMulNBits b32)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantseal-decode-cost"))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="decode_cost_in_model")
    args = ap.parse_args()
    ref = args.work / "ref"
    if not (ref / "model.onnx").is_file():
        ref.mkdir(parents=True, exist_ok=True)
        import onnx
        onnx.save(onnx.load(str(args.builder / "model.onnx")), str(ref / "model.onnx"))  # inline, like the variants
        shutil.copy(args.builder / "genai_config.json", ref / "genai_config.json")
    folders, weights = {"ref": ref}, {}
    for fmt in [f for f in args.formats.split(",") if f]:
        for part in ("lin", "head"):
            folders[f"{part}-{fmt}"] = args.work / f"{part}-{fmt}"
            weights[f"{part}-{fmt}"] = requantized_copy(ref, folders[f"{part}-{fmt}"], fmt, head=part == "head")
            print(f"wrote {part}-{fmt} ({weights[f'{part}-{fmt}'] / 1e6:.1f} M weights)", file=sys.stderr, flush=True)
    lin_share, head_share = matmul_shares(ref)
    w_lin, w_head = next(v for k, v in weights.items() if k.startswith("lin")), next(
        v for k, v in weights.items() if k.startswith("head"))
    rows = []
    for t in [int(x) for x in args.threads.split(",")]:
        times = time_variants(folders, t, args.rounds, args.steps)
        t_ref = float(np.median(times["ref"]))
        u_ref = {"lin": 1e3 * lin_share * t_ref / (w_lin / 1e6), "head": 1e3 * head_share * t_ref / (w_head / 1e6)}
        for name, ts in times.items():
            ratio = float(np.median(np.array(times["ref"]) / np.array(ts)))  # per round: > 1 is faster
            row = {"variant": name, "threads": t, "ms_median": round(float(np.median(ts)), 3),
                   "speed_vs_ref": round(ratio, 3), "ms_rounds": [round(x, 3) for x in ts]}
            if name != "ref":
                part = name.split("-")[0]
                # u(F) = u(ref) + Δt / weights, Δt from the per-round ratio (robust to drift over the run)
                dt = t_ref * (1 / ratio - 1)
                row["us_per_mparam"] = round(u_ref[part] + 1e3 * dt / (weights[name] / 1e6), 1)
            else:
                row["us_per_mparam_lin"], row["us_per_mparam_head"] = round(u_ref["lin"], 1), round(u_ref["head"], 1)
            rows.append(row)
            print(f"{t}t {name:16s} {row['ms_median']:7.2f} ms  speed {ratio:.3f}  "
                  f"{row.get('us_per_mparam', '')}", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "decode_cost_in_model", "command": " ".join(sys.argv), "builder": str(args.builder),
           "machine": platform.processor() or platform.machine(), "load_avg_at_end": os.getloadavg(),
           "matmul_share": {"linears": round(lin_share, 4), "head": round(head_share, 4)},
           "weights": {"linears": w_lin, "head": w_head}, "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
