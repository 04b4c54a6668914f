"""Render the tables of benchmarks/README.md from results/*.json (no number is typed by hand).

    python benchmarks/report.py            # rewrites the generated block of benchmarks/README.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BEGIN, END = "<!-- tables:begin (python benchmarks/report.py) -->", "<!-- tables:end -->"


def _fmt_formats(formats: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(formats.items(), key=lambda kv: -kv[1]))


def compress_table(res: dict) -> str:
    lines = ["### Compression quality vs stored bits (all-MiniLM-L6-v2, torch evaluation)", "",
             f"`{res['command']}` — {res['eval_sentences']} held-out sentences; embedding error = "
             "1 − mean cosine to float32; NN@1 = nearest-neighbour agreement; bits count codes, "
             "scales, zero points and low-rank factors of the 36 compressible matrices.", "",
             "| method | budget | stored bits/param | embedding error | NN@1 | ILP seconds | formats chosen |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("data_free", "LQ+ILP data-free"), ("data_aware", "LQ+ILP data-aware")):
        block = res["quantseal"][key]
        for r in block["rows"]:
            lines.append(f"| {label} | {r['budget']} | {r['bits_per_param']:.3f} | {r['embedding_error']:.5f} | "
                         f"{r['nn_agreement']:.3f} | {r['solver_seconds']:.3f} | {_fmt_formats(r['formats'])} |")
    for b in res["baselines"]:
        ort = f" ({b['ort_bits_per_param']:.3f} as onnxruntime stores it)" if b.get("ort_bits_per_param") else ""
        lines.append(f"| {b['label']} (uniform) | – | {b['bits_per_param']:.3f}{ort} | {b['embedding_error']:.5f} | "
                     f"{b['nn_agreement']:.3f} | – | {_fmt_formats(b['formats'])} |")
    free = res["quantseal"]["data_free"]["candidate_table_seconds"]
    aware = res["quantseal"]["data_aware"]["candidate_table_seconds"]
    lines += ["", f"Candidate table (all candidates of all matrices, 2 worker processes): data-free {free:.1f} s, "
              f"data-aware {aware:.1f} s (Fisher included). Plot: `results/compress_minilm.png`."]
    return "\n".join(lines)


def decoder_table(res: dict) -> str:
    lines = ["### SmolLM2-135M-Instruct: decoder export and generation", "",
             f"`python benchmarks/decoder_smollm2.py` — {res['model']}; perplexity over "
             f"{res['eval']['sentences']} held-out sentences ({res['eval']['tokens']} tokens); greedy "
             f"{res['max_new_tokens']} new tokens on {len(res['prompts'])} prompts; "
             f"formats {res['formats']}, ranks {res['ranks']}, {res['threads']} threads.", "",
             "| budget | bits/param | ONNX MB | ppl fp32 (torch) | ppl compressed (torch) | ppl compressed (ORT) "
             "| greedy ORT = torch | same text as fp32 | decode tok/s (ORT CPU) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        same = sum(g["same_as_fp32_text"] for g in r["generation"])
        lines.append(f"| {r['budget']} | {r['bits_per_param']:.3f} | {r['onnx_mb']:.1f} | {res['ppl_fp32_torch']:.3f} | "
                     f"{r['ppl_torch_compressed']:.4f} | {r['ppl_onnx_compressed']:.4f} | "
                     f"{r['greedy_equal_onnx_vs_torch']} | {same}/{len(r['generation'])} | {r['onnx_decode_tokens_per_s']} |")
    loads = [r["loadavg_at_speed"][0] for r in res["runs"] if r.get("loadavg_at_speed")]
    if loads:
        lines += ["", f"1-minute load average when decode speed was measured: {', '.join(f'{x:.1f}' for x in loads)} "
                      "(2 cores; a load above 2 means other jobs shared them, so tokens/s are low)."]
    else:
        lines += ["", "Decode speed was measured while other jobs shared the 2 cores: not representative."]
    labels = {32.0: "32 = float32 baseline (every matrix fp32, same export path)"}
    lines = [ln.replace("| 32.0 |", f"| {labels[32.0]} |") for ln in lines]
    return "\n".join(lines)


RENDERERS = {"compress_minilm.json": compress_table, "decoder_smollm2.json": decoder_table}


def main() -> None:
    parts = []
    for name, render in RENDERERS.items():
        path = RESULTS / name
        if path.is_file():
            parts.append(render(json.loads(path.read_text())))
    for path in sorted(RESULTS.glob("*.md")):  # other scripts may render their own table fragments
        parts.append(path.read_text().strip())
    block = f"{BEGIN}\n" + "\n\n".join(parts) + f"\n{END}"
    readme = HERE / "README.md"
    text = readme.read_text() if readme.is_file() else "# Benchmarks\n\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
