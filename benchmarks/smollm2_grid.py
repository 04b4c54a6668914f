"""Why 4-bit SmolLM2 results look the way they do: its weights already sit on a Q4_1 grid.

The float32 SmolLM2-135M-Instruct this project can load offline is dequantised from
``SmolLM2-135M-Instruct.Q4_1.gguf``: every Linear was stored as GGUF Q4_1 (per block of 32
weights ``w = d·q + m`` with a float16 step ``d``, a float16 minimum ``m`` and ``q ∈ {0..15}``);
the token table as Q8_0.  Two ways to round it to 4 bits, block 32, both min/max RTN:

* integer zero point (what ``int4_b32`` and the onnxruntime-genai builder's int4 store, the layout
  MatMulNBits runs fast): ``w ≈ s·(q − z)``, ``z`` a 4-bit integer, so the grid is shifted by up
  to ``s/2`` from the source's whenever ``m/d`` is not an integer;
* float zero point (MatMulNBits also accepts a float ``zero_points`` input): ``w ≈ s·q + m``,
  which reproduces a Q4_1 block exactly.

This script measures, on the linears only (the float token table is kept), the perplexity of both
(torch, 40 held-out pydoc sentences, the protocol of ``decoder_smollm2.py``) and the per-token cost
of MatMulNBits with packed-integer and with float zero points (one thread, CPU time, accuracy
level 4 and 0), so the benchmark tables can be read for what they are: on this model a 4-bit
method is scored on how well it recovers the source grid, not on 4-bit quantisation of a model
trained in float.

    .venv/bin/python benchmarks/smollm2_grid.py [--work /work/smolbench]

Writes ``benchmarks/results/smollm2_grid.json``.  Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def rtn_block32(w, float_zero: bool):
    """Min/max RTN, 4 bits, block 32 along the input dim; ``w: (N, K)`` float32 → dequantised."""
    import torch

    n, k = w.shape
    wb = w.reshape(n, k // 32, 32)
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-12).half().float()  # float16 step, as stored
    if float_zero:
        m = lo.half().float()
        return (((wb - m) / s).round().clamp(0, 15) * s + m).reshape(n, k)
    z = (-lo / s).round().clamp(0, 15)
    return ((((wb / s) + z).round().clamp(0, 15) - z) * s).reshape(n, k).to(torch.float32)


def perplexities(folder: Path, sentences: int) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from quantseal.text import pydoc_sentences

    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    seqs = [s for s in (tok.encode(t, add_special_tokens=False).ids for t in pydoc_sentences("evaluation")[:sentences])
            if len(s) >= 2]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def ppl() -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for s in seqs:
                ids = torch.tensor([s])
                logits = model(ids).logits[0, :-1].double()
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += len(s) - 1
        return math.exp(nll / count)

    params = dict(model.named_parameters())
    linears = {n: p.detach().clone() for n, p in params.items() if p.dim() == 2 and "embed" not in n}
    out = {"tokens": sum(len(s) - 1 for s in seqs), "float32": ppl()}
    for name, fz in (("int4_b32 integer zero point (linears)", False), ("int4_b32 float zero point (linears)", True)):
        with torch.no_grad():
            for n, w in linears.items():
                params[n].copy_(rtn_block32(w, fz))
        max_change = max(float((params[n] - w).abs().max()) for n, w in linears.items())
        out[name] = {"perplexity": ppl(), "max_abs_weight_change": max_change}
    return out


def matmulnbits_us(k: int, n: int, float_zero: bool, level: int) -> float:
    """CPU µs of one batch-1 MatMulNBits (4 bits, block 32) with packed uint8 or float zero points."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from decode_cost import time_us

    rng = np.random.default_rng(0)
    nb = k // 32
    codes = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (rng.random((n, nb)) * 0.01 + 0.001).astype(np.float32)
    if float_zero:
        zp = (rng.random((n, nb)) * 15).astype(np.float32)
    else:
        zi = rng.integers(0, 16, (n, nb + nb % 2), dtype=np.uint8)
        zp = zi[:, 0::2] | (zi[:, 1::2] << 4)
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
                               numpy_helper.from_array(zp, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return time_us(sess, k)


def main() -> None:
    from decoder_smollm2 import float_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantseal-smollm2"))
    ap.add_argument("--eval-sentences", type=int, default=40)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"benchmark": "smollm2_grid", "command": "python benchmarks/smollm2_grid.py", "load_avg_start": os.getloadavg()}
    res["perplexity"] = perplexities(float_folder(args.work), args.eval_sentences)
    rows = []
    for k, n in ((576, 1536), (1536, 576)):
        for level in (4, 0):
            row = {"K": k, "N": n, "accuracy_level": level}
            for fz in (False, True):
                us = matmulnbits_us(k, n, fz, level)
                row["float zero point" if fz else "uint8 zero point"] = {"us": round(us, 1),
                                                                          "us_per_mparam": round(us / (k * n / 1e6), 1)}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    res["matmulnbits"] = rows
    res["load_avg_end"] = os.getloadavg()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "smollm2_grid.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["perplexity"], indent=1))


if __name__ == "__main__":
    main()
