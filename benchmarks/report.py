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


def watermark_decoder_table(res: dict) -> str:
    """benchmarks/watermark_smollm2.py: attribution, false claims, fidelity, float16 robustness."""
    b, at = res["board"], res["attribution"]
    done, asked = at["customers_done"], res["customers_requested"]
    ps = sorted(at["p_values"])
    scope = (f"registry of {res['registry']['size']} customers (min distance {res['registry']['min_distance']}), "
             f"{done} of them exported and verified" + ("" if done == asked else " (time-limited run)"))
    lines = ["### Per-customer watermark on a decoder (SmolLM2-135M-Instruct, target-token pairs)", "",
             f"`{res['command']}` — `{res['compress']}`, one {b['bits']}-bit board trained once "
             f"({b['steps']} steps + {b['polish_steps']} polish steps, {b['seconds']:.0f} s, {b['triggers_per_bit']} "
             f"triggers per bit, margin {b['margin_logits']:.2f} logits = 2 × the unmarked model's own spread), "
             f"{scope}; verification from next-token logits through onnxruntime at alpha = {res['alpha']:g} "
             f"(a claim needs ≤ {res['registry']['max_errors_for_claim']} bit errors), {res['threads']} thread(s).", "",
             "| measure | value |", "|---|---|",
             f"| customers attributed correctly | {at['correct']} / {done} |",
             f"| bit errors (total / max per customer) | {at['bit_errors_total']} / {at['bit_errors_max']} |",
             f"| p-value (min / median / max) | {ps[0]:.3g} / {ps[len(ps) // 2]:.3g} / {ps[-1]:.3g} |",
             f"| per-customer export: traced (first) / template swap mean, max | "
             f"{', '.join(f'{x:.1f} s' for x in at['export_seconds_traced'])} / "
             + (f"{at['export_seconds_template_mean']:.1f} s, {at['export_seconds_template_max']:.1f} s |"
                if at.get("export_seconds_template_mean") is not None else "– |"),
             f"| verification: queries, seconds (mean / max) | {at['queries']}, {at['verify_seconds_mean']:.1f} s / "
             f"{at['verify_seconds_max']:.1f} s |"]
    fc = res.get("false_claims")
    if fc:
        lines.append(f"| false claims on innocent models | {fc['claims']} of {len(fc['rows'])} "
                     f"(smallest p = {fc['min_p_value']:.3g}) |")
    fid = res.get("fidelity")
    if fid:
        cs = fid["customers"]
        lines.append(f"| perplexity unmarked → marked ({fid['sentences']} held-out sentences, {fid['tokens']} tokens) | "
                     f"{fid['ppl_unmarked']:.4f} → " + ", ".join(f"{c['ppl']:.4f}" for c in cs) + " |")
        lines.append("| next-token KL(unmarked ‖ marked), nats per position; top-1 agreement | "
                     + ", ".join(f"{c['kl_unmarked_to_marked']:.2e}; {c['top1_agreement']:.4f}" for c in cs) + " |")
    for r in res.get("robustness", []):
        if "error" in r:
            lines.append(f"| {r['attack']}, {r['customer']} | not measured: {r['error'][:120]} |")
            continue
        ppl = f", perplexity {r['ppl']:.2f}" if r.get("ppl") is not None else ""
        lines.append(f"| {r['attack']}, {r['customer']} | owner {r['owner'] or 'none'}, {r['bit_errors']} bit errors, "
                     f"p = {r['p_value']:.3g}{ppl} |")
    if fc:
        lines += ["", "Innocent models (any claim is a false claim):", "",
                  "| model | read with | claimed | bit errors | p-value |", "|---|---|---|---|---|"]
        for r in fc["rows"]:
            lines.append(f"| {r['model']} | {r['read_with']} | {r['owner'] or 'none'} | {r['bit_errors']} | "
                         f"{r['p_value']:.3g} |")
    lines += ["", "Plot: `results/watermark_smollm2.png`. Times were measured on 2 cores shared with other jobs."]
    return "\n".join(lines)


RENDERERS = {"compress_minilm.json": compress_table, "decoder_smollm2.json": decoder_table,
             "watermark_smollm2.json": watermark_decoder_table}


def main() -> None:
    parts = []
    for name, render in RENDERERS.items():
        path = RESULTS / name
        if path.is_file():
            parts.append(render(json.loads(path.read_text())))
    for path in sorted(RESULTS.glob("*.md")):  # other scripts may render their own table fragments
        if path.with_suffix(".json").name not in RENDERERS:  # those with a renderer above are already in
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
