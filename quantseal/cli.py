"""Command line: argv → configs → API calls.

The only place that owns argv, logging set-up, progress bars and exit codes.  A
:class:`~quantseal.errors.QuantsealError` becomes one line on stderr and exit code 2.
``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import BadInput, QuantsealError


# ----------------------------------------------------------------------------- helpers
def _progress_factory(enabled: bool):
    """A ``progress(total, desc) -> tick(n)`` backed by tqdm on stderr."""

    def make(total: int, desc: str):
        if not enabled:
            return lambda n=1: None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

        def tick(n: int = 1) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return tick

    return make


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(human)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _quiet_libraries() -> None:
    """Quiet transformers and the hub through their environment variables, which they read when
    (and only if) a command imports them: importing transformers here would cost every command,
    ``run`` / ``serve`` / ``verify`` included, its 1–2 s import (issue 13, fast start)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:  # already imported (e.g. main() called in-process): quiet it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- compress
def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a checkpoint to a memory budget")
    p.add_argument("model", nargs="?", type=Path, help="Hugging Face model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint folder")
    g = p.add_mutually_exclusive_group(required=False)  # required for lq/rtn: checked in _cmd_compress
    g.add_argument("--budget", type=float, help="average stored bits per compressible parameter")
    g.add_argument("--budget-mb", type=float, help="whole-file budget in MB (10^6 bytes)")
    p.add_argument("--method", default="lq", choices=["lq", "rtn", "gptq", "cbq", "lq+cbq"],
                   help="lq/rtn: budgeted plan; gptq/cbq: calibrated uniform int{wbits}_b{block}; "
                        "lq+cbq: the lq plan, then CBQ refines its integer matrices")
    p.add_argument("--wbits", type=int, default=4, choices=[2, 3, 4, 8], help="gptq/cbq weight bits (3 is stored as 4)")
    p.add_argument("--abits", type=int, default=16, choices=[4, 8, 16], help="cbq activation bits (16: float)")
    p.add_argument("--block", type=int, default=64, help="gptq/cbq block size along the input dimension")
    p.add_argument("--window", type=int, default=2, help="cbq: blocks per reconstruction window (overlap 1)")
    p.add_argument("--rank", type=int, default=8, help="cbq: rank of the LoRA-Rounding factors (0: learned scales only)")
    p.add_argument("--steps", type=int, default=200, help="cbq: Adam steps per window")
    p.add_argument("--init", default="gptq", choices=["gptq", "rtn"],
                   help="cbq: starting codes (gptq: GPTQ's, then refined; rtn: round-to-nearest, as in the paper)")
    p.add_argument("--table", default=None, metavar="FORMAT",
                   help="gptq/cbq: also store the token table in FORMAT (e.g. int4_b32, int8_b32, fp16); a tied LM "
                        "head reads the same codes (default: kept as is)")
    p.add_argument("--gptq-order", default="act", choices=["act", "natural"],
                   help="gptq (and cbq's gptq init): the column order, act = descending input energy (diag H) "
                        "with static groups (default), natural = left to right")
    p.add_argument("--table-method", default="gptq", choices=["gptq", "rtn"],
                   help="gptq/cbq with --table: a tied integer table's codes from GPTQ on the table as the LM head "
                        "(its inputs from the quantised model; default), or round-to-nearest")
    p.add_argument("--data-aware", action="store_true", help="weight errors by the output-sensitivity Fisher")
    p.add_argument("--calib", type=Path, help="calibration text file, one text per line (default: pydoc_data.topics)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration texts (default 256; gptq/cbq 128)")
    p.add_argument("--ranks", type=_int_list, default=None, help="low-rank candidates, e.g. 0,8,16,32,64")
    p.add_argument("--formats", default=None, help="format families or names, e.g. int2,int4,int8,nf4,fp16 "
                        "(int4f / int4f_b32: 4-bit codes with float16 block offsets, w = s·q + m)")
    p.add_argument("--max-decode-ms", type=float, default=None,
                   help="lq/rtn: bound the plan's estimated per-token CPU time of its matrices (ms, batch 1, "
                        "onnxruntime at accuracy level 4; the per-format costs of compress/decode_cost.py)")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="lq/rtn: PEFT adapter folder (repeatable) folded into the plan; its SVD-truncated ranks "
                        "r, r/2, ..., 0 are candidates whose bytes count toward the budget")
    p.add_argument("--adapter-rank", default="auto",
                   help="with --adapter: 'auto' (the ILP picks each matrix's rank) or a fixed rank R")
    p.add_argument("--workers", type=int, default=2)
    _add_ray_flag(p, "the per-matrix candidate table")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the Fisher, LQ (SVD + quantisation) and GPTQ compute; auto: cuda when torch sees a "
                        "GPU (results are written from the CPU in the same format; cbq computes on the CPU)")
    p.add_argument("--activation-mb", type=float, default=None, metavar="MB",
                   help="gptq/cbq on a streamed decoder: calibration activations held in memory (default 1024), "
                        "the rest spilled to a temporary folder")
    p.add_argument("--hessian-tokens", type=int, default=None, metavar="N",
                   help="gptq: padded calibration tokens per forward pass of its Hessian passes and block replays "
                        "(default 256: a few MB of MLP intermediates, not a whole batch of 16 texts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compress)


def _add_ray_flag(p, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"run {what} as Ray tasks (pip install 'quantseal[ray]'): a local Ray instance with "
                        "--workers CPUs, or the cluster at ADDRESS (default: $QUANTSEAL_RAY_ADDRESS, which alone "
                        "also turns Ray on)")


def _ray_address(args):
    from .distributed import ray_address

    return ray_address(args.ray)


def _step_progress(enabled: bool):
    """A ``callback(stage, done, total, info)`` backed by one tqdm bar per stage."""
    bars: dict = {}

    def callback(stage: str, done: int, total: int, info: dict) -> None:
        if not enabled:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        if done >= total:
            bar.close()

    return callback


def _cmd_compress_calibrated(args) -> int:
    from .compress.calibrated import CalibratedConfig, calibrated_compress

    if args.budget is not None:
        raise BadInput(f"--method {args.method} quantises every matrix to int{args.wbits}_b{args.block}, or plans "
                       "formats under --budget-mb MB: drop --budget")
    if args.hessian_tokens is not None and args.method != "gptq":
        raise BadInput("--hessian-tokens applies to --method gptq")
    cfg = CalibratedConfig(
        output=args.output, model=args.model, method=args.method, wbits=args.wbits, abits=args.abits,
        block=args.block, window=args.window, rank=args.rank, steps=args.steps, init=args.init, calib=args.calib,
        calib_samples=args.calib_samples if args.calib_samples is not None else 128, seed=args.seed,
        table=args.table, table_method=args.table_method, budget_mb=args.budget_mb, max_decode_ms=args.max_decode_ms,
        formats=tuple(args.formats.split(",")) if args.formats else ("int4", "int8"), workers=args.workers,
        device=args.device, gptq_order=args.gptq_order,
        **({} if args.activation_mb is None else {"activation_mb": args.activation_mb}),
        **({} if args.hessian_tokens is None else {"hessian_tokens": args.hessian_tokens}),
    )
    res = calibrated_compress(cfg, _step_progress(not args.json and sys.stderr.isatty()))
    human = (f"wrote {res['output']}: {res['matrices']} matrices as {res['format']} (A{res['abits']}), "
             f"{res['bits_per_param']:.4f} bits/param, {res['bytes'] / 1e6:.2f} MB of tensors, "
             f"calibration {res['calibration_seconds']:.1f} s, {res['seconds']:.1f} s")
    _emit(res, args.json, human)
    return 0


def _cmd_compress(args) -> int:
    from .checkpoint import MANIFEST
    from .publish import check_output_folder

    check_output_folder(args.output, MANIFEST, "checkpoint")  # before any compute
    if args.adapter and args.method not in ("lq", "rtn"):
        raise BadInput(f"--adapter at compress time is planned by --method lq or rtn, not {args.method}")
    if args.adapter_rank != "auto" and not args.adapter:
        raise BadInput("--adapter-rank needs at least one --adapter")
    if args.method in ("gptq", "cbq"):
        return _cmd_compress_calibrated(args)
    if args.budget is None and args.budget_mb is None:
        raise BadInput(f"--method {args.method} needs one of --budget BITS and --budget-mb MB")
    if args.activation_mb is not None:
        raise BadInput("--activation-mb applies to --method gptq|cbq")
    if args.hessian_tokens is not None:
        raise BadInput("--hessian-tokens applies to --method gptq")
    adapter_rank = args.adapter_rank
    if adapter_rank != "auto":
        try:
            adapter_rank = int(adapter_rank)
        except ValueError:
            raise BadInput(f"--adapter-rank must be 'auto' or an integer, not {adapter_rank!r}") from None
    from .compress.pipeline import DEFAULT_RANKS, CompressConfig, compress, default_families

    cfg = CompressConfig(
        output=args.output, model=args.model, budget_bits=args.budget, budget_mb=args.budget_mb,
        method="lq" if args.method == "lq+cbq" else args.method, data_aware=args.data_aware, calib=args.calib,
        calib_samples=args.calib_samples if args.calib_samples is not None else 256,
        ranks=args.ranks if args.ranks is not None else DEFAULT_RANKS,
        formats=tuple(args.formats.split(",")) if args.formats else default_families(args.model),
        workers=args.workers, ray=_ray_address(args), seed=args.seed, max_decode_ms=args.max_decode_ms,
        adapters=tuple(args.adapter), adapter_rank=adapter_rank,
        device=args.device,
    )
    if args.method == "lq+cbq":
        from .compress.cbq import CBQConfig
        from .compress.lqcbq import lq_cbq_compress

        if args.abits != 16:
            raise BadInput("--method lq+cbq refines weights only: use --abits 16 (or --method cbq)")
        cbq = CBQConfig(window=args.window, overlap=1 if args.window > 1 else 0, rank=args.rank,
                        steps=args.steps, seed=args.seed)
        res = lq_cbq_compress(cfg, cbq, _progress_factory(not args.json and sys.stderr.isatty()),
                              _step_progress(not args.json and sys.stderr.isatty()))
    else:
        res = compress(cfg, _progress_factory(not args.json and sys.stderr.isatty()))
    human = (f"wrote {res['output']}: {res['matrices']} matrices, {res['bits_per_param']:.4f} bits/param "
             f"(budget {res['budget']} {res['budget_kind']}), {res['bytes'] / 1e6:.2f} MB of tensors, "
             f"{res['seconds']:.1f} s")
    if "adapter_rank" in res:
        ar = res["adapter_rank"]
        kept = sum(ar["ranks"].values())
        human += (f"\nadapter ranks under the budget: {kept} of {sum(ar['full_ranks'].values())} kept over "
                  f"{len(ar['ranks'])} matrices ({ar['bytes'] / 1e6:.3f} MB), truncation error {ar['error']:.4g}")
    _emit(res, args.json, human)
    return 0


# ----------------------------------------------------------------------------- inspect
def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint or ONNX file holds")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from .inspect import inspect_path

    res = inspect_path(args.path)
    _emit(res, args.json, res.pop("text") if not args.json else "")
    return 0


# ----------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a compressed checkpoint to one ONNX file")
    p.add_argument("checkpoint", type=Path, help="compressed checkpoint folder (quantseal compress)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx file (tokenizer.json is written beside it)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (0: float32 compute; 4: int8 activations, faster on CPU; "
                        "default: 4 for decoders, whose 8-bit matrices run ~80x slower per token at 0, else 0)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="decoder compute type: fp32 (CPU) or fp16 (for the CUDA execution provider)")
    p.add_argument("--external-data", default="auto", choices=["auto", "always", "never"],
                   help="keep the weights in <output>.data beside the .onnx file: always, never, or auto "
                        "(when they pass 1.8 GB; protobuf cannot hold 2 GiB in one file)")
    p.add_argument("--board", type=Path, help="watermark board folder (quantseal board train); with --key --registry --user")
    p.add_argument("--key", type=Path, help="watermark key file")
    p.add_argument("--registry", help="customer registry: an SQLite file or postgresql:// URL (quantseal registry add), or a legacy JSON file")
    p.add_argument("--user", help="customer id whose watermark the exported model carries")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="PEFT adapter folder (LoRA/DoRA/AdaLoRA/VeRA/IA3/LoHa/LoKr/MiSS) to fold exactly "
                        "(repeatable, in order)")
    p.add_argument("--adapter-rank", type=int, help="re-compress each folded branch to this rank by SVD (reports the error)")
    p.add_argument("--switchable", action="store_true",
                   help="keep each --adapter ([NAME=]DIR) a separate branch chosen at run time by the int64 input "
                        "adapter_id (0: base, j: the j-th adapter; run/serve --adapter NAME); default: fold")
    p.add_argument("--adapter-dtype", choices=("float16", "float32"), default="float16",
                   help="storage of the folded low-rank factors (float32: exact to float32)")
    p.add_argument("--seed", type=int, help="watermarked export: seed of the low-rank obfuscation, mixed with --user "
                                            "(reproducible bytes, as export-batch --seed; default: OS randomness)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .export.onnx import default_accuracy_level, export_onnx

    if args.accuracy_level is None:
        args.accuracy_level = default_accuracy_level(args.checkpoint)
    if args.external_data != "auto" and (args.adapter or args.board is not None):
        raise BadInput(f"--external-data {args.external_data} with --adapter or --board is not supported yet")
    if args.dtype != "fp32" and args.board is not None and not args.adapter:  # adapters: their exporters decide
        raise BadInput(f"--dtype {args.dtype} with --board is not supported yet; export in fp32")

    mark = (args.board, args.key, args.registry, args.user)
    if args.adapter_rank is not None and not args.adapter:
        raise BadInput("--adapter-rank needs at least one --adapter")
    watermark = None
    if args.adapter and any(x is not None for x in mark):  # the mark in the table, the adapters beside it
        if any(x is None for x in mark):
            raise BadInput("a watermarked export needs all of --board, --key, --registry and --user")
        from .export.batch import obfuscation_seed
        from .keys import read_key
        from .registry import check_customer_id, open_registry

        check_customer_id(args.user)
        key = read_key(args.key)
        watermark = {"board": args.board, "key": key, "registry": open_registry(args.registry, key),
                     "customer": args.user, "seed": obfuscation_seed(args.seed, args.user)}
    elif args.adapter and args.seed is not None:
        raise BadInput("--seed seeds a watermarked export's obfuscation: it needs --board --key --registry --user")
    if args.switchable:
        from .export.adapters.switchable import export_switchable

        import torch

        if args.adapter_rank is not None:
            raise BadInput("--adapter-rank truncates folded branches; it does not apply with --switchable")
        res = export_switchable(args.checkpoint, args.output, args.adapter, accuracy_level=args.accuracy_level,
                                dtype=getattr(torch, args.adapter_dtype), mark=watermark, compute=args.dtype)
    elif args.adapter:
        from .export.adapters import export_with_adapters

        import torch

        res = export_with_adapters(args.checkpoint, args.output, args.adapter, rank=args.adapter_rank,
                                   accuracy_level=args.accuracy_level, dtype=getattr(torch, args.adapter_dtype),
                                   compute=args.dtype, mark=watermark)
    elif any(x is not None for x in mark):
        if any(x is None for x in mark):
            raise BadInput("a watermarked export needs all of --board, --key, --registry and --user")
        from .export.batch import obfuscation_seed
        from .export.watermark import export_marked
        from .keys import read_key
        from .registry import check_customer_id, open_registry

        check_customer_id(args.user)
        key = read_key(args.key)
        res = export_marked(args.checkpoint, args.output, args.board, key, open_registry(args.registry, key),
                            args.user, accuracy_level=args.accuracy_level, seed=obfuscation_seed(args.seed, args.user))
    else:
        if args.seed is not None:
            raise BadInput("--seed seeds a watermarked export's obfuscation: it needs --board --key --registry --user")
        res = export_onnx(args.checkpoint, args.output, accuracy_level=args.accuracy_level, dtype=args.dtype,
                          external_data=args.external_data)
    lowbit = {op: res["ops"].get(op, 0) for op in ("MatMulNBits", "MatMulBnb4", "GatherBlockQuantized")}
    human = (f"wrote {res['path']}: {res['bytes'] / 1e6:.2f} MB, {res['matrices']} compressed matrices "
             f"({res['matrix_bytes'] / 1e6:.3f} MB), low-bit ops {lowbit}, {res['seconds']:.1f} s")
    if res.get("adapters", {}).get("switchable"):
        ad = res["adapters"]
        human += (f"\nswitchable adapters (input adapter_id; 0 = base): "
                  + ", ".join(f"{a['id']} = {a['name']}" for a in ad["adapters"])
                  + f"; {len(ad['matrices'])} matrices, {res['adapter_bytes'] / 1e6:.3f} MB of branches")
    elif res.get("adapters", {}).get("xlora"):
        human += (f"\nX-LoRA routed over {len(res['adapters']['experts'])} experts on "
                  f"{len(res['adapters']['matrices'])} matrices (two passes; no genai_config.json)")
    elif "adapters" in res:
        ad = res["adapters"]
        rounding = max(a["fold_rel_error"] for a in ad["adapters"])
        human += (f"\nfolded {len(ad['adapters'])} adapter(s) into {len(ad['matrices'])} matrices, {ad['dtype']} "
                  f"factors (rounding: relative error {rounding:.1e} of s·B·A)")
        if "adapter_rank" in ad:
            human += (f"; rank {ad['adapter_rank']['rank']}: SVD truncation error {ad['adapter_rank']['error']:.4g} "
                      f"(relative {ad['adapter_rank']['rel_error']:.2e})")
    if res.get("mark_check"):  # export --adapter --board: the mark read back at every adapter_id before publishing
        human += ("\nwatermark read back: " + ", ".join(
            f"adapter_id {c['adapter_id']}: {c['bit_errors']} bit errors (p = {c['p_value']:.2g})" for c in res["mark_check"]))
    _emit(res, args.json, human)
    return 0


def _add_export_batch(sub) -> None:
    p = sub.add_parser("export-batch", help="export one watermarked model folder per customer, DIR/<id>/model.onnx")
    p.add_argument("checkpoint", type=Path, help="compressed checkpoint folder (quantseal compress)")
    p.add_argument("--customers", type=Path, required=True, help="file of customer ids, one per line")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder: DIR/<id>/ holds each customer's model.onnx and its companion files")
    p.add_argument("--board", type=Path, required=True, help="watermark board folder (quantseal board train)")
    p.add_argument("--key", type=Path, required=True, help="watermark key file")
    p.add_argument("--registry", type=Path, required=True, help="customer registry holding every id")
    p.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4], help="MatMulNBits accuracy_level")
    p.add_argument("--workers", type=int, default=2, help="local processes (or local Ray CPUs / Ray actors)")
    _add_ray_flag(p, "the per-customer exports")
    p.add_argument("--seed", type=int, help="seed of the obfuscation, mixed with each id (files equal to "
                                            "export --user ID --seed SEED); default: OS randomness")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export_batch)


def _cmd_export_batch(args) -> int:
    from .distributed import Fanout
    from .export.batch import export_batch

    res = export_batch(args.checkpoint, args.customers, args.output, args.board, args.key, args.registry,
                       accuracy_level=args.accuracy_level, seed=args.seed,
                       fanout=Fanout(workers=args.workers, ray=_ray_address(args)),
                       progress=_progress_factory(not args.json and sys.stderr.isatty()))
    human = (f"wrote {res['customers']} models to {res['output_dir']} ({res['bytes'] / 1e6:.1f} MB) on "
             f"{res['fanout']}: {res['seconds']:.1f} s, {res['customers_per_minute']:.1f} customers per minute")
    _emit(res, args.json, human)
    return 0


# ----------------------------------------------------------------------------- run
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="embed texts, or generate text from a prompt, with an exported ONNX model "
                                   "(onnxruntime, no torch)")
    p.add_argument("model", type=Path, help="exported .onnx file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", help="a text to embed (repeatable)")
    g.add_argument("--text-file", type=Path, help="UTF-8 file, one text per line")
    g.add_argument("--prompt", help="decoders: a prompt to continue greedily (prints the generated text)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="decoders: tokens to generate at most")
    p.add_argument("-o", "--output", type=Path, help="write the embeddings (n, H) float32 to this .npy file")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json or its folder (default: beside the model)")
    p.add_argument("--max-length", type=int, default=None,
                   help="embedders: truncate texts at this many tokens (default: the model's max_seq_length)")
    p.add_argument("--adapter", help="a switchable export's adapter to use, by name (default: the base model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_run)


def _save_npy(path: Path, array) -> None:
    """Write ``array`` to ``path`` atomically (temporary file beside it, then rename)."""
    import tempfile

    import numpy as np

    if path.is_dir():
        raise BadInput(f"{path}: is a directory")
    if path.suffix != ".npy":
        raise BadInput(f"{path}: the output file name must end in .npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write there ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cmd_run(args) -> int:
    import logging
    import time

    from .runtime.pipelines import Embedder
    from .text import read_text_file, utf8_text

    logging.basicConfig(level=logging.WARNING, format="quantseal: %(message)s", stream=sys.stderr)
    if args.prompt is not None:
        utf8_text(args.prompt, "--prompt")
        return _run_generate(args)
    texts = [utf8_text(t, "--text") for t in args.text] if args.text else read_text_file(args.text_file)
    if any(not t.strip() for t in texts):
        raise BadInput("empty --text")
    t0 = time.perf_counter()
    emb = Embedder(args.model, tokenizer=args.tokenizer, provider=args.provider, threads=args.threads,
                   max_length=args.max_length, adapter=args.adapter)
    vectors = emb.embed(texts)
    res = {"model": str(args.model), "provider": emb.provider, "n": int(vectors.shape[0]),
           "dim": int(vectors.shape[1]), "max_length": emb.max_length, "seconds": round(time.perf_counter() - t0, 3)}
    if emb.switchable:
        res["adapter"] = args.adapter
    if args.output is not None:
        _save_npy(args.output, vectors)
        res["output"] = str(args.output)
    elif args.json:
        res["embeddings"] = vectors.tolist()
    lines = [f"{res['n']} embeddings of dimension {res['dim']} on {res['provider']}"
             + (f" -> {args.output}" if args.output is not None else "")]
    if args.output is None:
        for t, v in zip(texts, vectors):
            lines.append(f"{t[:40]!r:<44} [{', '.join(f'{x:+.4f}' for x in v[:6])}, ...]")
    _emit(res, args.json, "\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an exported model over HTTP (embedders: POST /embed, /v1/embeddings; decoders: POST /generate, /logits, /v1/completions, /v1/chat/completions; GET /health)")
    p.add_argument("model", type=Path, help="exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one); the bound URL is the first line of stdout")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json or its folder (default: beside the model)")
    p.add_argument("--max-batch", type=int, default=256, help="most texts (or token rows) per request")
    p.add_argument("--max-chars", type=int, default=100_000, help="most characters per text, checked before tokenising")
    p.add_argument("--token-file", type=Path, help="a file holding a bearer token every route but /health then needs")
    p.add_argument("--workers", type=int, default=4, help="worker threads answering requests (default 4)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's line and headers")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body")
    p.add_argument("--max-length", type=int, default=None,
                   help="embedders: truncate texts at this many tokens (default: the model's max_seq_length)")
    p.add_argument("--adapter", help="a switchable export's default adapter, by name (a request's \"adapter\" "
                                     "overrides it; default: the base model)")
    p.add_argument("--chat-template", default="auto", metavar="FILE|auto|none",
                   help="decoders: the template /v1/chat/completions renders messages with (a .jinja file or a "
                        "tokenizer_config.json; auto: the model folder's chat_template.jinja or tokenizer_config.json; "
                        "none: contents joined by newlines)")
    p.set_defaults(func=_cmd_serve)


def _serve_limits(args):
    """The HTTP layer's limits from serve's flags, checked before the model loads."""
    import math

    from .runtime.http_server import Limits

    for flag in ("header_timeout", "body_timeout"):
        v = getattr(args, flag)
        if not (math.isfinite(v) and 0 < v <= 3600):
            raise BadInput(f"--{flag.replace('_', '-')} must be in (0, 3600] seconds, not {v}")
    if not 1 <= args.workers <= 256:
        raise BadInput(f"--workers must be in 1..256, not {args.workers}")
    if args.max_chars < 1 or args.max_batch < 1:
        raise BadInput("--max-chars and --max-batch must be at least 1")
    return Limits(header_timeout=args.header_timeout, body_timeout=args.body_timeout, workers=args.workers)


def _cmd_serve(args) -> int:
    import logging
    import signal

    from .runtime.server import make_server, describe_routes, server_url, service_for

    logging.basicConfig(level=logging.WARNING, format="quantseal: %(message)s", stream=sys.stderr)
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port must be in 0..65535, not {args.port}")
    limits = _serve_limits(args)
    token = None
    if args.token_file is not None:
        from .runtime.transport import read_api_key

        token = read_api_key(args.token_file)[1].removeprefix("Bearer ")
    service = service_for(args.model, provider=args.provider, threads=args.threads, tokenizer=args.tokenizer,
                          max_batch=args.max_batch, max_chars=args.max_chars, max_length=args.max_length,
                          adapter=args.adapter, chat_template=args.chat_template)
    server = make_server(service, args.host, args.port, token=token, limits=limits)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(server_url(server), flush=True)
    print(f"serving {args.model} on {service.provider}: {describe_routes(service)}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _run_generate(args) -> int:
    """``quantseal run MODEL --prompt P [--max-new-tokens N]``: greedy generation with the KV cache."""
    import time

    from .runtime.pipelines import CausalLM

    if not args.prompt.strip():
        raise BadInput("empty --prompt")
    if args.max_length is not None:
        raise BadInput("--max-length applies to embedding models (--text); use --max-new-tokens with --prompt")
    if args.max_new_tokens < 0:
        raise BadInput(f"--max-new-tokens must be non-negative, not {args.max_new_tokens}")
    lm = CausalLM(args.model, tokenizer=args.tokenizer, provider=args.provider, threads=args.threads,
                  adapter=args.adapter)
    prompt_ids = lm.encode(args.prompt)
    t0 = time.perf_counter()
    ids = lm.generate_ids(prompt_ids, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    text = lm.decode(ids)
    res = {"model": str(args.model), "provider": lm.provider, "prompt": args.prompt, "text": text,
           "token_ids": ids, "prompt_tokens": len(prompt_ids), "new_tokens": len(ids), "seconds": round(seconds, 3),
           "tokens_per_second": round(len(ids) / seconds, 2) if seconds > 0 else None}
    _emit(res, args.json, text)
    return 0


# ----------------------------------------------------------------------------- watermark
def _add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="make a secret watermark key (32 random bytes, mode 0600)")
    p.add_argument("-o", "--output", type=Path, required=True, help="key file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args) -> int:
    from .keys import key_id, write_key

    if args.output.exists() and not args.force:
        raise BadInput(f"{args.output}: exists; refusing to overwrite a key (models marked with it "
                       "could no longer be verified); pass --force")
    key = write_key(args.output)
    res = {"key": str(args.output), "key_id": key_id(key)}
    _emit(res, args.json, f"wrote key {args.output} (id {res['key_id']}); keep it secret and backed up")
    return 0


def _add_board(sub) -> None:
    p = sub.add_parser("board", help="the watermark board (Hot-Swap MarkBoard)")
    bsub = p.add_subparsers(dest="board_command", required=True)
    t = bsub.add_parser("train", help="train a board once on a compressed checkpoint")
    t.add_argument("checkpoint", type=Path, help="compressed checkpoint folder")
    t.add_argument("-o", "--output", type=Path, required=True, help="board folder to write")
    t.add_argument("--key", type=Path, required=True, help="key file (quantseal keygen)")
    t.add_argument("--bits", type=int, default=64, help="signature bits n (a multiple of 8)")
    t.add_argument("--calib", type=Path, help="clean text, one per line, for the fidelity term (default: pydoc_data)")
    t.add_argument("--steps", type=int, default=200, help="upper bound on training steps")
    t.add_argument("--rank", type=int, default=16, help="rank of the embedding LoRA the branches share")
    t.add_argument("--triggers-per-bit", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--readout", choices=["diff", "top1"], default="diff",
                   help="decoders: diff (a target pair's logit difference; needs logits or logit_bias) or top1 "
                        "(the bit's target is the greedy next token: readable from top_logprobs or text alone)")
    t.add_argument("--chat-template", metavar="FILE|auto",
                   help="top1 decoders: train and read on the chat-templated trigger (a .jinja file, a "
                        "tokenizer_config.json, or auto: the checkpoint folder's)")
    t.add_argument("--margin", type=float, default=None, help="decoders: the hinge margin in logits")
    t.add_argument("--init", type=Path, default=None, metavar="BOARD",
                   help="decoders: continue training an earlier board (same checkpoint, key, triggers, settings)")
    t.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="decoders: stop training and polish after S seconds (the board records where it stopped)")
    t.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="decoders: run the training steps' forward/backward under bfloat16 autocast (about 2x "
                        "less CPU time on AVX512-BF16; the statistics the board reports stay float32)")
    t.add_argument("--mark-side", choices=["tied", "input"], default=None,
                   help="decoders: where a customer's mark goes: input (the default for a tied head: a "
                        "correction at the token lookup, the head reads the unmarked table, so text without "
                        "trigger tokens is unchanged) or tied (folded into the token table, which a tied head reads too)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where an encoder board trains (auto: cuda when torch sees a GPU; the board is written from "
                        "the CPU); decoder boards train on the CPU")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_cmd_board_train)


def _cmd_board_train(args) -> int:
    from .compress.markboard import BoardConfig, save_board, train_board
    from .keys import BOARD_MANIFEST, read_key
    from .publish import check_output_folder

    check_output_folder(args.output, BOARD_MANIFEST, "board")  # before any compute
    key = read_key(args.key)
    template = None
    if args.chat_template is not None:
        from .compress.markboard_top1 import read_chat_template

        template = read_chat_template(args.checkpoint if args.chat_template == "auto" else args.chat_template)
    cfg = BoardConfig(bits=args.bits, calib=args.calib, steps=args.steps, rank=args.rank,
                      triggers_per_bit=args.triggers_per_bit, seed=args.seed, readout=args.readout,
                      chat_template=template, decoder_margin=args.margin, init_board=args.init,
                      time_limit=args.time_limit, autocast=None if args.autocast == "none" else args.autocast,
                      mark_side=args.mark_side)
    board = train_board(args.checkpoint, key, cfg, _progress_factory(not args.json and sys.stderr.isatty()),
                        device=args.device)
    save_board(board, args.output, args.checkpoint)
    tr = board.manifest["training"]
    res = {"output": str(args.output), "bits": cfg.bits, "steps": tr["steps_run"], "seconds": tr["seconds"],
           "train_bit_accuracy": tr["train_bit_accuracy"], "min_signed_stat": tr["min_signed_stat"]}
    human = (f"wrote board {args.output}: {cfg.bits} bits, {tr['steps_run']} steps, train bit accuracy "
             f"{tr['train_bit_accuracy']:.3f} (smallest signed statistic {tr['min_signed_stat']:+.3f}), "
             f"{tr['seconds']:.1f} s")
    _emit(res, args.json, human)
    return 0


def _add_registry(sub) -> None:
    p = sub.add_parser("registry", help="the owner's customer → codeword registry (an SQLite file of mode 0600, or postgresql://)")
    rsub = p.add_subparsers(dest="registry_command", required=True)
    a = rsub.add_parser("add", help="register a customer (the registry file is created on first use)")
    a.add_argument("registry", help="registry database: an SQLite file or a postgresql:// URL")
    a.add_argument("--key", type=Path, required=True)
    a.add_argument("--user", required=True, help="customer id: 1-128 characters from A-Z a-z 0-9 . _ @ + -, the first a letter or digit")
    a.add_argument("--bits", type=int, default=None,
                   help="codeword bits for a new registry (the board's --bits; 16..1024, default 64)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_registry_add)
    ls = rsub.add_parser("list", help="list the registered customers")
    ls.add_argument("registry", help="registry database: an SQLite file or a postgresql:// URL")
    ls.add_argument("--key", type=Path, required=True)
    ls.add_argument("--all", action="store_true", help="also list removed customers")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_registry_list)
    sh = rsub.add_parser("show", help="one customer's row: sequence number, status, codeword")
    sh.add_argument("registry", help="registry database: an SQLite file or a postgresql:// URL")
    sh.add_argument("--key", type=Path, required=True)
    sh.add_argument("--user", required=True)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=_cmd_registry_show)
    rm = rsub.add_parser("remove", help="retire a customer (kept as a tombstone: the id and codeword are never reused)")
    rm.add_argument("registry", help="registry database: an SQLite file or a postgresql:// URL")
    rm.add_argument("--key", type=Path, required=True)
    rm.add_argument("--user", required=True)
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=_cmd_registry_remove)
    im = rsub.add_parser("import", help="copy a JSON registry (earlier versions) into a registry database")
    im.add_argument("source", type=Path, help="JSON registry file")
    im.add_argument("registry", help="registry database, an SQLite file or a postgresql:// URL (created when absent)")
    im.add_argument("--key", type=Path, required=True)
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=_cmd_registry_import)


def _registry_name(target) -> str:
    from .registry_store import display_name

    return display_name(target)


def _cmd_registry_add(args) -> int:
    from .keys import read_key
    from .registry import RegistryDB

    db = RegistryDB(args.registry, read_key(args.key))
    row, new = db.add(args.user, args.bits)
    view = db.snapshot()
    res = {"registry": _registry_name(args.registry), "user": args.user, "new": new, "customers": len(view), "bits": view.bits}
    _emit(res, args.json, f"{'registered' if new else 'already registered:'} {args.user} "
                          f"({len(view)} customers, {view.bits}-bit codewords)")
    return 0


def _cmd_registry_list(args) -> int:
    from .keys import read_key
    from .registry import open_registry

    reg = open_registry(args.registry, read_key(args.key))
    removed = reg.removed() if hasattr(reg, "removed") else []
    res = {"registry": _registry_name(args.registry), "customers": reg.customers(), "bits": reg.bits}
    human = "\n".join(reg.customers()) or "(no customers)"
    if args.all:
        res["removed"] = removed
        human += "".join(f"\n{c} (removed)" for c in removed)
    _emit(res, args.json, human)
    return 0


def _cmd_registry_show(args) -> int:
    from .keys import bits_to_hex, read_key
    from .registry import check_customer_id, open_registry

    check_customer_id(args.user)
    reg = open_registry(args.registry, read_key(args.key))
    if hasattr(reg, "row"):
        row = reg.row(args.user)
        seq, status, code = row.seq, row.status, row.codeword
    else:  # a JSON registry
        code = reg.codeword(args.user)
        seq, status = reg.customers().index(args.user) + 1, "active"
    res = {"registry": _registry_name(args.registry), "user": args.user, "seq": seq, "status": status, "bits": reg.bits,
           "codeword": bits_to_hex(code)}
    _emit(res, args.json, f"{args.user}: #{seq}, {status}, {reg.bits}-bit codeword {res['codeword']}")
    return 0


def _cmd_registry_remove(args) -> int:
    from .keys import read_key
    from .registry import RegistryDB

    row = RegistryDB(args.registry, read_key(args.key)).remove(args.user)
    res = {"registry": _registry_name(args.registry), "user": args.user, "seq": row.seq, "status": row.status}
    _emit(res, args.json, f"removed {args.user} (#{row.seq}; its id and codeword stay reserved)")
    return 0


def _cmd_registry_import(args) -> int:
    from .keys import read_key
    from .registry import import_registry

    added, same = import_registry(args.source, args.registry, read_key(args.key))
    res = {"registry": _registry_name(args.registry), "source": str(args.source), "added": added, "already_present": same}
    _emit(res, args.json, f"imported {added} customers from {args.source} into {args.registry}"
                          + (f" ({same} already present)" if same else ""))
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="black-box ownership verification of a suspect model")
    p.add_argument("suspect", help="a suspect ONNX file or an http://HOST:PORT endpoint (quantseal serve)")
    p.add_argument("--board", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--registry", required=True, help="registry database (SQLite file or postgresql:// URL) or legacy JSON")
    p.add_argument("--alpha", type=float, default=1e-6)
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-triggers", type=int, default=None,
                   help="at most this many triggers per bit (1: at most 2 queries per bit)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--adapter", help="a switchable suspect: read this adapter (a file: name or adapter_id, default "
                                     "the base model; --api quantseal: sent as 'adapter'; OpenAI APIs: use --model)")
    g = p.add_argument_group("HTTP suspects")
    g.add_argument("--api", default="quantseal",
                   choices=["quantseal", "openai-embeddings", "openai-completions", "openai-chat"],
                   help="what the endpoint speaks (quantseal: POST /embed or /logits)")
    g.add_argument("--model", help="the 'model' field of OpenAI-style requests")
    g.add_argument("--text-only", action="store_true",
                   help="decoders: read the greedy text only, do not ask for log-probabilities")
    g.add_argument("--no-logit-bias", action="store_true",
                   help="decoders: do not send logit_bias (for APIs that refuse it; the mark is then rarely visible)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per query, retries included (default 60)")
    g.add_argument("--deadline", type=float, default=None, help="seconds for the whole verification")
    g.add_argument("--max-response-mb", type=float, default=64.0, help="largest answer accepted (default 64 MB)")
    g.add_argument("--qps", type=float, default=None, help="at most this many queries per second")
    g.add_argument("--retries", type=int, default=5, help="retries of HTTP 429/503 answers (default 5)")
    g.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="an HTTP header for every query (repeatable), e.g. 'Authorization: Bearer ...'")
    g.add_argument("--api-key-file", type=Path, help="a file holding a bearer token for the Authorization header")
    p.set_defaults(func=_cmd_verify)


def _endpoint_options(args) -> dict:
    """Transport keywords from verify's HTTP flags (checked before any query)."""
    import math

    from .runtime.transport import Deadline, parse_header, read_api_key

    for flag in ("timeout", "deadline", "max_response_mb", "qps"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise BadInput(f"--{flag.replace('_', '-')} must be a positive number, not {v}")
    if not 0 <= args.retries <= 100:
        raise BadInput(f"--retries must be in 0..100, not {args.retries}")
    headers = dict(parse_header(h) for h in args.header)
    if args.api_key_file is not None:
        name, value = read_api_key(args.api_key_file)
        headers[name] = value
    return {"timeout": args.timeout, "deadline": Deadline(args.deadline), "qps": args.qps, "headers": headers,
            "max_bytes": int(args.max_response_mb * 1e6), "retries": args.retries}


def _cmd_verify(args) -> int:
    from .keys import read_board_manifest, read_key
    from .registry import open_registry
    from .runtime.verify import onnx_embed_fn, verify
    from .text import TextTokenizer

    key = read_key(args.key)
    reg = open_registry(args.registry, key)
    board = read_board_manifest(args.board)
    decoder = board.get("family") == "decoder"  # next-token logits of target pairs, not embeddings
    inputs, probe = "ids", None
    if args.suspect.startswith(("http://", "https://")):
        from .runtime.suspects import endpoint_query

        embed_fn, inputs, probe = endpoint_query(args.suspect, args.api, board, key, TextTokenizer(args.board),
                                                 args.model, not args.text_only, logit_bias=not args.no_logit_bias,
                                                 adapter=args.adapter, **_endpoint_options(args))
    elif args.api != "quantseal":
        raise BadInput(f"--api {args.api} is for http:// suspects, not files")
    elif not Path(args.suspect).is_file():
        raise BadInput(f"{args.suspect}: no such file")
    elif decoder:
        from .runtime.verify import onnx_logits_fn

        embed_fn = onnx_logits_fn(args.suspect, provider=args.provider, tokenizer=args.board, adapter=args.adapter)
    else:
        from .runtime.suspect_onnx import pooling_config

        embed_fn = onnx_embed_fn(args.suspect, provider=args.provider, pooling=pooling_config(args.board, board),
                                 adapter=args.adapter)
    res = verify(embed_fn, key, reg, board, TextTokenizer(args.board), alpha=args.alpha, inputs=inputs,
                 max_triggers=args.max_triggers)
    res["suspect"] = args.suspect
    if probe is not None:  # what an OpenAI-style decoder API showed: log-probabilities or greedy text
        res.update(api=args.api, read_from=probe.mode, logit_bias=probe.logit_bias, censored=probe.censored,
                   sequence_bits=probe.observed, http_requests=probe.requests)
    human = (f"owner: {', '.join(res['owners']) or 'none'} (p = {res['p_value']:.3g}, {res['bit_errors']} bit errors "
             f"of {res['n_bits']}, {res['erased']} erased, {res['queries']} queries, {res['seconds']:.1f} s)")
    _emit(res, args.json, human)
    return 0


# ----------------------------------------------------------------------------- gc
def _add_gc(sub) -> None:
    p = sub.add_parser("gc", help="remove what killed runs left behind (temporary folders of checkpoints and boards)")
    p.add_argument("path", type=Path, help="a folder to clean, or an output path (its leftovers beside it are cleaned)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_gc)


def _cmd_gc(args) -> int:
    from .publish import collect_orphans

    path = args.path
    if not path.is_dir() and not path.parent.is_dir():
        raise BadInput(f"{path}: no such folder")
    done = collect_orphans(path.parent, path.name)
    if path.is_dir() and not path.is_symlink():
        done += collect_orphans(path)
    _emit({"path": str(path), "actions": done}, args.json, "\n".join(done) or "nothing to clean")
    return 0


# ----------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``quantseal CMD: error: ...``, exit 2), as every
    other bad input; ``-h`` still prints the usage.  Sub-command parsers inherit the class."""

    def error(self, message: str):
        from .arg_ranges import one_line

        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantseal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_export_batch(sub)
    _add_run(sub)
    _add_serve(sub)
    _add_keygen(sub)
    _add_board(sub)
    _add_registry(sub)
    _add_verify(sub)
    _add_gc(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .arg_ranges import check_ranges, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        check_ranges(args)  # every number in its range before any file is read
        return args.func(args)
    except QuantsealError as exc:
        print(f"quantseal: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("quantseal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
