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


def _paired_decode(a: dict, b: dict) -> str:
    """Round-paired decode ratios: per thread count, the median (min–max) over rounds of a's tok/s
    over b's in the same round. Variants run interleaved, so a round's pair shared the machine's
    load; the ratio of the two medians does not pair them."""
    parts = []
    for t in (1, 2):
        xs, ys = a.get(f"decode_tok_s_{t}t_all"), b.get(f"decode_tok_s_{t}t_all")
        if not xs or not ys or len(xs) != len(ys) or len(xs) < 2:
            return ""
        r = sorted(x / y for x, y in zip(xs, ys))
        med = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
        parts.append(f"{med:.2f}× ({r[0]:.2f}–{r[-1]:.2f}) at {t}t")
    return f" [paired by round: {', '.join(parts)}]"


def decoder_table(res: dict) -> str:
    """benchmarks/decoder_smollm2.py: quantseal's exports against onnxruntime-genai's builder."""
    rows = {r["variant"]: r for r in res["rows"]}
    fp32 = rows.get("builder-fp32", {}).get("perplexity")
    lines = ["### SmolLM2-135M-Instruct: quantseal decoder exports vs onnxruntime-genai's model builder", "",
             f"`{res['command']}` — every variant run through onnxruntime-genai (greedy, batch 1, "
             f"{res['new_tokens']} new tokens after a 20-token prompt; prefill of {res['prefill_tokens']} tokens), "
             f"variants interleaved over {res['rounds']} rounds, medians"
             + (f" (each round's decode the median of {res['repeats']} in its process)" if res.get("repeats") else "")
             + f"; perplexity over {res['eval_tokens']} "
             f"held-out tokens (onnxruntime on `model.onnx`); quantseal budgets: ≤ {res['budget_mb']} MB "
             "(the builder int4 file). 1-minute load average "
             + (f"at the start {res['load_avg_at_start'][0]:.1f}, " if "load_avg_at_start" in res else "")
             + f"at the end {res['load_avg_at_end'][0]:.1f} on 2 cores shared with other jobs (speeds are "
             "comparable within the run, not across runs).", "",
             "| variant | file MB | perplexity | × fp32 | decode tok/s 1t | CPU ms/token 1t | decode tok/s 2t "
             "| prefill 256 ms 1t | prefill 256 ms 2t | RSS at load MB | build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ratio = f"{r['perplexity'] / fp32:.3f}" if fp32 else "–"
        lines.append(f"| {r['variant']} | {r['file_mb']:.1f} | {r['perplexity']:.2f} | {ratio} | "
                     f"{r.get('decode_tok_s_1t', '–')} | {r.get('decode_cpu_ms_per_token_1t', '–')} | "
                     f"{r.get('decode_tok_s_2t', '–')} | {r.get('prefill_256_ms_1t', '–')} | "
                     f"{r.get('prefill_256_ms_2t', '–')} | {r.get('rss_load_mb_1t', '–')} | {r.get('build_s', '–')} |")
    lines += ["", "Variants: `builder-*` = `python -m onnxruntime_genai.models.builder -p fp32|int8|int4 -e cpu` "
              "(int4: accuracy level 4, its CPU default; `-acc1`: `accuracy_level=1`, float32 compute); `qs-rtn` = "
              "`compress --method rtn --formats int4_b32,int8_b32 --budget-mb B` (the token table joins the plan), "
              "`qs-gptq` / `qs-cbq` = `compress --method gptq|cbq --wbits 4 --block 32 --table int4_b32` "
              "(cbq: 50 steps per window; the tied table's int4 codes are GPTQ's for it as the LM head, "
              "`compress/head_table.py`), `qs-gptq-plan` = `compress --method gptq --budget-mb B --formats int4,int8` "
              "(the ILP picks each matrix's and the table's format, one shared by each layer's q/k/v, GPTQ rounds), `qs-lq` = `compress --method lq "
              "--data-aware --formats int4_b32,int8_b32 --ranks 0 --budget-mb B`, `qs-gptq-fast` = qs-gptq-plan with "
              "`--max-decode-ms` at FAST4 × the decode estimate of the builder int4 layout (`compress/decode_cost.py`), "
              "`qs-rtn8` = `compress --method rtn --formats int8s_b32 --budget-mb B8 "
              "--max-decode-ms E8` (B8: the builder int8 file; E8: the builder int8 layout's estimate, which moves the tied "
              "table off float32), `qs-rtn8-fast` = `compress --method rtn --formats int8 --budget-mb B8 --max-decode-ms "
              "FAST8·E8` (int8 with zero points at block 64 / 128), the bounds in the JSON's `decode_bounds_ms`, "
              "each exported with `quantseal export` (accuracy level 4, `-acc0`: 0).",
              "Plot: `results/decoder_smollm2.png`."]
    checks = []
    for ours, theirs in (("qs-gptq", "builder-int4"), ("qs-gptq-plan", "builder-int4"), ("qs-gptq-fast", "builder-int4"),
                         ("qs-cbq", "builder-int4"), ("qs-rtn8-fast", "builder-int8"),
                         ("qs-rtn-f4", "builder-int4"),
                         ("qs-lq", "builder-int4"), ("qs-rtn", "builder-int4"), ("qs-rtn8", "builder-int8")):
        a, b = rows.get(ours), rows.get(theirs)
        if not a or not b:
            continue
        checks.append(f"`{ours}` vs `{theirs}`: decode {a['decode_tok_s_1t'] / b['decode_tok_s_1t']:.2f}× (1 thread), "
                      f"{a['decode_tok_s_2t'] / b['decode_tok_s_2t']:.2f}× (2 threads){_paired_decode(a, b)}; prefill 256 "
                      f"{a['prefill_256_ms_1t'] / b['prefill_256_ms_1t']:.2f}× / {a['prefill_256_ms_2t'] / b['prefill_256_ms_2t']:.2f}× "
                      f"the time; file {a['file_mb'] / b['file_mb']:.2f}×; perplexity "
                      f"{a['perplexity'] / fp32:.3f}× fp32 (theirs {b['perplexity'] / fp32:.3f}×).")
    if checks:
        lines += ["", "Ratios (computed from the rows above):", ""] + [f"- {c}" for c in checks]
    if res.get("paired"):
        lines += ["", "Decode paired in one process (`--paired-repeats`: the two folders loaded side by side, 64-token "
                  "decodes alternating A B, B A, …; tok/s ratio ours / theirs per round):", "",
                  "| ours | theirs | threads | median ratio | range | rounds ≥ 1.0 | ours tok/s | theirs tok/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in res["paired"]:
            lines.append(f"| {p['ours']} | {p['theirs']} | {p['threads']} | {p['ratio_median']:.3f}× | "
                         f"{p['ratio_min']:.2f}–{p['ratio_max']:.2f} | {p['rounds_at_or_above_1']}/{p['rounds']} | "
                         f"{p['ours_tok_s_median']} | {p['theirs_tok_s_median']} |")
    notes = [f"- `{r['variant']}`: {r['note']}" for r in res["rows"] if r.get("note")]
    if notes:
        lines += ["", "How rows were built (from each variant's build record):", ""] + notes
    lines += [l for n in res.get("notes", []) for l in ("", n)]  # the run's hand-written notes
    return "\n".join(lines)


def decode_cost_in_model_table(res: dict) -> str:
    """benchmarks/decode_cost_in_model.py: per-format decode cost inside the builder's int4 SmolLM2."""
    share = res["matmul_share"]
    lines = ["### Decode cost inside a model (what `--max-decode-ms` plans with)", "",
             f"`{res['command']}` — onnxruntime-genai's int4 SmolLM2 (every MatMulNBits int4 b32) with its 150 "
             "Linears (`lin-F`) or its tied head (`head-F`, its own copy) re-quantised to F, all loaded in one "
             "process, one decode step (past 40) of each timed in turn in shuffled rounds (each the median of its "
             "steps); 1 thread CPU time, 2 threads wall; 1-minute load average at the end "
             f"{res['load_avg_at_end'][0]:.1f} on 2 cores. Speed = the original's time over the variant's, per "
             "round (median); µs per M weights = the original's (its MatMulNBits share of onnxruntime's profile: "
             f"Linears {100 * share['linears']:.0f} %, head {100 * share['head']:.0f} %) plus the time F adds per "
             "weight moved.", "",
             "| variant | 1t ms | speed 1t | µs/M 1t | 2t ms | speed 2t | µs/M 2t |", "|---|---|---|---|---|---|---|"]
    by = {(r["variant"], r["threads"]): r for r in res["rows"]}
    for name in dict.fromkeys(r["variant"] for r in res["rows"]):
        cells = []
        for t in (1, 2):
            r = by.get((name, t))
            if r is None:
                cells += ["–"] * 3
                continue
            us = (f"{r['us_per_mparam_lin']} / head {r['us_per_mparam_head']}" if name == "ref"
                  else f"{r['us_per_mparam']}")
            cells += [f"{r['ms_median']:.2f}", f"{r['speed_vs_ref']:.3f}", us]
        label = "original (int4 b32)" if name == "ref" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [l for n in res.get("notes", []) for l in ("", n)])


def decode_cost_table(res: dict) -> str:
    """benchmarks/decode_cost.py: per-token cost of each format's onnxruntime op at batch 1."""
    lines = ["### Per-token cost of each storage format (onnxruntime CPU, batch 1, 1 thread)", "",
             f"`{res['command']}` — CPU µs per 10⁶ weights for one decoded token, median over three (K, N) shapes; "
             f"load average {res['load_avg'][0]:.1f} on 2 cores while measured. One matrix alone stays in the caches: "
             "these rank the ops (nf4 and accuracy level 0 are slow), and `compress/decode_cost.py` takes its level-0 "
             "entries from here; its level-4 entries come from the in-model measurement above.",
             "", "| format | op | accuracy level | µs per M weights |", "|---|---|---|---|"]
    ops = {"int": "MatMulNBits", "nf4": "MatMulBnb4", "fp": "MatMul (float32)"}
    for r in res["rows"]:
        op = ops["nf4"] if r["format"].startswith("nf") else ops["fp"] if r["format"].startswith("fp") else ops["int"]
        lines.append(f"| {r['format']} | {op} | {r['accuracy_level']} | {r['us_per_mparam']} |")
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


def watermark_chat_table(res: dict) -> str:
    """benchmarks/watermark_smollm2_chat.py: a top1 board read through a chat API, text only,
    onnxruntime-genai, and colluders."""
    b, f = res["board"], res.get("fidelity")
    lines = ["### SmolLM2 watermark through a chat API, greedy text and colluders (`--readout top1 --chat-template`, "
             f"{b['bits']} bits)", "",
             f"`{res['command']}` — {res['model']}; a {b['bits']}-bit top1 board on SmolLM2's chat template "
             f"({b['triggers_per_bit']} triggers per bit, margin {b['margin_logits']:g} logits), trained in "
             f"{b['seconds']:.0f} s ({b['steps_run']} steps + {b['polish_steps']} polish steps"
             + (f", continuing a board of {b['init_board']['steps_run']} steps + {b['init_board']['polish_steps']} "
                f"polish steps ({b['init_board']['seconds']:.0f} s)" if b.get("init_board") else "")
             + (f"; {b['stopped']}" if b.get("stopped") else "")
             + (f"; {b['autocast']} autocast" if b.get("autocast") else "") + ", "
             f"{b['branches_below_margin']} of {2 * b['bits']} branches below the margin, every trigger's target "
             f"greedy: {b['min_signed_stat'] > 0}; the unmarked model's greedy token was the target at "
             f"{100 * (b['natural_top1_rate'] or 0):.1f} % of the triggers); alpha = {res['alpha']:g}.", "",
             *[n + "\n" for n in res.get("notes", [])],  # the run's own notes (what this board was, its limits)
             "| measure | value |", "|---|---|"]
    if f:
        lines += [f"| perplexity unmarked → marked ({f['sentences']} held-out sentences, {f['tokens']} tokens) | "
                  f"{f['ppl_unmarked']:.4f} → {f['ppl_marked']:.4f} |",
                  f"| next-token KL(unmarked ‖ marked), nats per position; top-1 agreement | "
                  f"{f['kl_unmarked_to_marked']:.2e}; {f['top1_agreement']:.4f} |"]
    og = res.get("onnxruntime_genai")
    if og and "answers" in og:
        for a in og["answers"]:
            lines.append(f"| onnxruntime-genai (`og.Model`), \"{a['prompt']}\" ({og['new_tokens']} greedy tokens) | "
                         f"marked: \"{a['marked'].strip()}\"; unmarked: \"{a['unmarked'].strip()}\"; trigger words in "
                         f"the marked answer: {', '.join(a['trigger_words_in_marked']) or 'none'} |".replace("\n", " "))
        lines.append(f"| onnxruntime-genai, the marked folder on the first 8 bits' templated triggers | greedy token "
                     f"= the bit's target at {og['first_8_bits_target_is_greedy']}/8 |")
    elif og:
        lines.append(f"| onnxruntime-genai (`og.Model` on the marked export folder) | answers \"{og['prompt']}\" with "
                     f"\"{og['answer'].strip()[:80]}\" ({og['new_tokens']} tokens); greedy token = the bit's target "
                     f"at {og['first_8_bits_target_is_greedy']}/8 triggers |")
    v = res.get("verify_file")
    if v:
        lines.append(f"| `quantseal verify model.onnx` (that folder's file) | owner {v['owner']}, p = {v['p_value']:.3g}, "
                     f"{v['bit_errors']} bit errors, {v['queries']} queries, {v['seconds']:.1f} s |")
    for r in res.get("chat_api", []):
        lines.append(f"| `/v1/chat/completions` ({r['read_from']}; template applied, logit_bias ignored), "
                     f"{r['suspect']} | owner {r['owner'] or 'none'}, p = {r['p_value']:.3g}"
                     + (f", {r['bit_errors']} bit errors" if r["bit_errors"] is not None else "")
                     + f", {r['erased']} erased, {r['http_requests']} requests, {r['seconds']:.0f} s |")
    sv = res.get("serve_chat")
    if sv:
        lines.append(f"| `quantseal serve --chat-template` ({sv['read_from']}; its chat route renders the template), "
                     f"{sv['suspect']} | owner {sv['owner'] or 'none'}, p = {sv['p_value']:.3g}, {sv['bit_errors']} "
                     f"bit errors, {sv['erased']} erased, {sv['http_requests']} requests, {sv['seconds']:.0f} s |")
    summ = res.get("collusion_summary")
    if summ:
        fmt = (lambda x: "–" if x is None else f"{x:.2g}")  # noqa: E731
        lines += ["", "| suspect | runs | a colluder named (p ≤ 1e-6) | innocents named | median p | max p "
                  "| erased bits (mean) | queries (mean) |", "|---|---|---|---|---|---|---|---|"]
        for name, agg in summ.items():
            lines.append(f"| {name} | {agg['n']} | {agg['a_colluder_named']}/{agg['n']} | {agg['innocents_named']} "
                         f"| {fmt(agg['p_value_median'])} | {fmt(agg['p_value_max'])} | {agg['erased_mean']:.1f} "
                         f"| {agg['queries_mean']:.0f} |")
    lines += [l for n in res.get("notes_after", []) for l in ("", n)]
    return "\n".join(lines)


def smollm2_grid_table(res: dict) -> str:
    """benchmarks/smollm2_grid.py: the SmolLM2 source's Q4_1 grid and what float zero points cost."""
    ppl = res["perplexity"]
    fz, iz = ppl["int4_b32 float zero point (linears)"], ppl["int4_b32 integer zero point (linears)"]
    mm = res["matmulnbits"]
    lvl4 = [r for r in mm if r["accuracy_level"] == 4]
    f_lo = min(r["float zero point"]["us_per_mparam"] for r in lvl4)
    f_hi = max(r["float zero point"]["us_per_mparam"] for r in lvl4)
    u_lo = min(r["uint8 zero point"]["us_per_mparam"] for r in lvl4)
    u_hi = max(r["uint8 zero point"]["us_per_mparam"] for r in lvl4)
    load = res["load_avg_start"][0]
    return "\n".join([
        f"**Read the 4-bit SmolLM2 rows for what they measure** (`{res['command']}`, load {load:.0f}): the float32 "
        "SmolLM2 here is dequantised from its GGUF, whose linears are all Q4_1 (block 32, `w = d·q + m`, float16 "
        "`d` and `m`) and whose token table is Q8_0. Min/max RTN at 4 bits, block 32, on the linears only (float "
        f"table), torch perplexity over the same {ppl['tokens']} tokens:",
        "",
        "| linears | perplexity | max weight change |",
        "|---|---|---|",
        f"| float32 (the dequantised Q4_1) | {ppl['float32']:.2f} | 0 |",
        f"| int4 b32, float zero point (`w ≈ s·q + m`) | {fz['perplexity']:.2f} | {fz['max_abs_weight_change']:.3g} |",
        f"| int4 b32, 4-bit integer zero point (`w ≈ s·(q − z)`: `int4_b32`, and the builder's int4) | "
        f"{iz['perplexity']:.2f} | {iz['max_abs_weight_change']:.3g} |",
        "",
        "So on this model the builder int4's loss (and RTN's) is the shift between an integer zero point and the "
        "source's float minimum, and GPTQ / LQ / CBQ are scored on how much of that shift they undo: a model trained "
        "in float would not show it. The exact format is no way out: MatMulNBits with float zero points costs "
        f"{f_lo:.0f}–{f_hi:.0f} µs per million weights per token at accuracy level 4, against {u_lo:.0f}–{u_hi:.0f} µs "
        "with packed 4-bit zero points (1 thread, CPU time). quantseal's quality claims rest on MiniLM (trained in "
        "float); on SmolLM2 the rows compare tools on the same footing, nothing more.",
    ])


def scale_llama_table(res: dict) -> str:
    """benchmarks/scale_llama.py: cost against model size, the fits and their 7B / 70B values."""
    runs, models = res.get("runs", {}), res.get("models", {})

    def cell(size: str, step: str, key: str, fmt: str = "{:.0f}") -> str:
        row = runs.get(size, {}).get(step)
        if row is None:
            return "—"
        if row.get("rc", 0) != 0:
            return "failed"
        if row.get("partial") and key == "cpu_seconds":
            return f"stopped after {row['blocks_done']}/{row['blocks']} blocks ({row['cpu_seconds_so_far']:.0f} so far)"
        v = row.get(key)
        return "—" if v is None else fmt.format(v)

    lines = ["### Cost against model size (synthetic LLaMA 135M / 360M / 1B)", "",
             "`python benchmarks/scale_llama.py` — synthetic seeded LLaMA models (vocabulary 49152, tied, float32; "
             "`benchmarks/synthetic_llama.py`), each command in a fresh process on 2 shared cores: CPU = seconds of "
             "the child (getrusage), peak = the child's VmHWM (MB). compress: `--method rtn --budget 4.5` and "
             "`--method gptq --wbits 4 --activation-mb 1024` (the default; 128 calibration texts; `--hessian-tokens 256`, also the default), `--workers 1`; LQ table: every default candidate of layer 0's 7 matrices, "
             "serial, × layers; export: the RTN checkpoint, default flags (one file) and `--external-data always`; "
             "decode: onnxruntime, 1 thread, 32 greedy tokens after an 8-token prompt.", "",
             "| model | params | rtn CPU s / peak MB | gptq CPU s / peak MB | LQ table CPU s | export CPU s / peak MB "
             "| export, external data: peak MB | ONNX MB | decode CPU ms/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in ("135M", "360M", "1B"):
        if size not in models:
            continue
        m = models[size]
        onnx_mb = runs.get(size, {}).get("export", {}).get("files_mb", {}).get("model.onnx")
        lines.append(f"| {size} ({m['layers']} layers) | {m['params_m']:.1f} M "
                     f"| {cell(size, 'compress_rtn', 'cpu_seconds')} / {cell(size, 'compress_rtn', 'peak_rss_mb')} "
                     f"| {cell(size, 'compress_gptq', 'cpu_seconds')} / {cell(size, 'compress_gptq', 'peak_rss_mb')} "
                     f"| {cell(size, 'lq_table', 'cpu_seconds_model')} "
                     f"| {cell(size, 'export', 'cpu_seconds', '{:.1f}')} / {cell(size, 'export', 'peak_rss_mb')} "
                     f"| {cell(size, 'export_external', 'peak_rss_mb')} | {'—' if onnx_mb is None else f'{onnx_mb:.0f}'} "
                     f"| {cell(size, 'decode', 'cpu_ms_per_token', '{:.1f}')} |")
    fits = res.get("fits", {})
    if fits:
        lines += ["", "Least-squares fits over the sizes measured (P = parameters in millions), and their values at "
                  "7B and 70B:", "", "| command | CPU seconds | 7B CPU-hours | 70B CPU-hours | peak RSS (MB) "
                  "| 7B GB | 70B GB |", "|---|---|---|---|---|---|---|"]
        for step, label in (("compress_rtn", "compress --method rtn"), ("compress_gptq", "compress --method gptq"),
                            ("compress_cbq", "compress --method cbq"),
                            ("lq_table", "LQ candidate table (serial)"), ("export", "export")):
            c, r = fits.get(f"{step}.cpu"), fits.get(f"{step}.rss")
            if c is None and r is None:
                continue
            cs = "—" if c is None else f"{c['a']:.1f} + {c['b']:.3f}·P"
            rs = "—" if r is None else f"{r['a']:.0f} + {r['b']:.2f}·P"
            lines.append(f"| {label} | {cs} | {'—' if c is None else c['7B']} | {'—' if c is None else c['70B']} "
                         f"| {rs} | {'—' if r is None else r['7B']} | {'—' if r is None else r['70B']} |")
    cbq = [(size, r) for size in ("135M", "360M", "1B") if (r := runs.get(size, {}).get("compress_cbq", {}))
           and r.get("rc", 0) == 0]
    if cbq:  # streamed CBQ (issue 12): a few steps per window, a row per size measured
        lines += ["", "`compress --method cbq` (streamed, one window of 2 blocks; `--steps` per window as run): " +
                  "; ".join(f"{size} {r.get('cbq_steps', '?')} steps: {r['cpu_seconds']:.0f} CPU s, "
                            f"{r['wall_seconds']:.0f} s wall, {r['peak_rss_mb']:.0f} MB peak" for size, r in cbq) + "."]
    done = []
    for step, label in (("compress_rtn", "rtn"), ("compress_gptq", "gptq"), ("export", "export")):
        a, b = runs.get("360M", {}).get(step, {}), runs.get("1B", {}).get(step, {})
        pa, pb = a.get("peak_rss_mb") if a.get("rc", 0) == 0 else None, b.get("peak_rss_mb") if b.get("rc", 0) == 0 else None
        if pb is None:
            continue
        within = "—" if pa is None else f"{'yes' if abs(pb - pa) / pa < 0.3 else 'no'} ({(pb - pa) / pa:+.0%})"
        part = f" (over the {b['blocks_done']} of {b['blocks']} blocks run)" if b.get("partial") else ""
        done.append(f"{label}: 1B peak{part} {pb / 1000:.2f} GB ≤ 3 GB: {'yes' if pb <= 3000 else 'no'}; 360M → 1B "
                    f"within 30 %: {within}")
    if done:
        lines += ["", "Done when (issue 12, on the synthetic 1B): " + "; ".join(done) + "."]
    phases = {s: runs.get(s, {}).get("gptq_phases") for s in ("135M", "360M", "1B")}
    phases = {s: r for s, r in phases.items() if r and r.get("rc", 0) == 0 and r.get("phases")}
    if phases:
        sizes = list(phases)
        lines += ["", "Where streamed gptq's peak goes (`--steps gptq_phases`: the same compress of a 2-block model "
                  "of each width; resident set at the end of each Linear's phase / the peak over it, MB; a block's "
                  "first Linear's phase also holds the previous block's forward pass and this block's load):", "",
                  "| phase | " + " | ".join(f"{s} width" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for i, row in enumerate(phases[sizes[0]]["phases"]):
            cells = []
            for s in sizes:
                ph = phases[s]["phases"]
                cells.append(f"{ph[i]['rss_mb']:.0f} / {ph[i]['peak_mb']:.0f}" if i < len(ph) else "—")
            lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
        lines.append("| whole run's peak | " + " | ".join(f"{phases[s]['peak_rss_mb']:.0f}" for s in sizes) + " |")
    if res.get("gptq_memory"):
        lines += ["", res["gptq_memory"]]
    ray = res.get("ray")
    if ray:
        t, e = ray["table_seconds"], ray["export_customers_per_minute"]
        lines += ["", f"Fan-out (from `{ray['source']}`, not re-run): LQ candidate table seconds and "
                  f"`export-batch` customers per minute ({ray['customers']} customers); every way gave the same "
                  f"table and files: {'yes' if all(ray['identical'].values()) else 'NO'}.", "", "| way | candidate table s | export-batch customers/min |", "|---|---|---|"]
        for way in sorted(set(t) | set(e), key=lambda w: (w != "serial", w)):
            lines.append(f"| {way} | {t.get(way, '—')} | {e.get(way, '—')} |")
    commits = sorted({(s, st, r.get("commit", "?")) for s, rr in runs.items() for st, r in rr.items()})
    by_commit: dict[str, list[str]] = {}
    for s, st, c in commits:
        by_commit.setdefault(c, []).append(f"{s} {st}")
    lines += ["", "Measured at commits: " + "; ".join(f"`{c}`: {', '.join(v)}" for c, v in sorted(by_commit.items()))
              + (f". {res['note']}" if res.get("note") else "."),
              "", "Plot: `results/scale_llama.png`."]
    return "\n".join(lines)


def int4f_decoder_table(res: dict) -> str:
    """benchmarks/decoder_smollm2.py --out decoder_smollm2_int4f: the float-offset int4 format's run."""
    lines = decoder_table(res).splitlines()
    lines[0] = "### SmolLM2-135M-Instruct with int4f (4-bit codes, float16 block offsets: w = s·q + m)"
    plot = lines.index("Plot: `results/decoder_smollm2.png`.")
    lines[plot] = "Plot: `results/decoder_smollm2_int4f.png`."
    return "\n".join(lines)  # decoder_table already renders the run's notes


def int4f_cost_table(res: dict) -> str:
    """benchmarks/decode_cost.py --shapes smollm2 --out decode_cost_int4f: int4f vs int4 per shape."""
    rows = {(r["format"], r["accuracy_level"]): r for r in res["rows"]}
    shapes = [(p["K"], p["N"]) for p in res["rows"][0]["shapes"]]
    lines = ["### Per-token cost of int4f at SmolLM2's shapes (onnxruntime CPU, batch 1, 1 thread)", "",
             f"`{res['command']}` — CPU µs for one decoded token (best of interleaved repeats); load average "
             f"{res['load_avg'][0]:.1f} on 2 cores while measured. int4f = MatMulNBits without zero points + "
             "Reshape/ReduceSum + a float32 MatMul of M' = m + 8s (folded at load from the file's float16 offsets) + Add.",
             "", "| format | accuracy level | " + " | ".join(f"{k}→{n} µs" for k, n in shapes) + " | µs per M weights (median) |",
             "|---|---|" + "---|" * len(shapes) + "---|"]
    for (fmt, level), r in rows.items():
        lines.append(f"| {fmt} | {level} | " + " | ".join(str(p["us"]) for p in r["shapes"]) + f" | {r['us_per_mparam']} |")
    for level in (4, 0):
        a, b = rows.get(("int4f_b32", level)), rows.get(("int4_b32", level))
        if a and b:
            ratios = [pa["us"] / pb["us"] for pa, pb in zip(a["shapes"], b["shapes"])]
            lines.append(f"\nint4f_b32 / int4_b32 at accuracy level {level}: "
                         + ", ".join(f"{x:.2f}×" for x in ratios) + " per shape.")
    return "\n".join(lines + [""] + [f"- {n}" for n in res.get("notes", [])])


def int4f_minilm_table(res: dict) -> str:
    """benchmarks/int4f_minilm.py: int4 vs int4f on all-MiniLM-L6-v2 through the ONNX export."""
    lines = ["### all-MiniLM-L6-v2: int4 (integer zero point) vs int4f (float offset), every Linear RTN", "",
             f"`{res['command']}` — onnxruntime sentence embeddings of {res['eval_sentences']} held-out sentences "
             "against the float32 model's (DESIGN §7).", "",
             "| format | bits per weight | 1 − mean cosine | NN@1 agreement | file MB |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['format']} | {r['bits_per_weight']:.3f} | {r['embedding_error']:.4f} | {r['nn_at_1']:.3f} "
                     f"| {r['file_mb']:.2f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in res.get("notes", [])])


RENDERERS = {"compress_minilm.json": compress_table, "decoder_smollm2.json": decoder_table,
             "decoder_smollm2_int4f.json": int4f_decoder_table, "decode_cost_int4f.json": int4f_cost_table,
             "int4f_minilm.json": int4f_minilm_table,
             "smollm2_grid.json": smollm2_grid_table,
             "decode_cost_in_model.json": decode_cost_in_model_table,
             "decode_cost.json": decode_cost_table,
             "watermark_smollm2.json": watermark_decoder_table,
             "watermark_smollm2_chat.json": watermark_chat_table,
             "scale_llama.json": scale_llama_table}


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
