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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- compress
def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a checkpoint to a memory budget")
    p.add_argument("model", nargs="?", type=Path, help="Hugging Face model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=float, help="average stored bits per compressible parameter")
    g.add_argument("--budget-mb", type=float, help="whole-file budget in MB (10^6 bytes)")
    p.add_argument("--method", default="lq", choices=["lq", "rtn"])
    p.add_argument("--data-aware", action="store_true", help="weight errors by the output-sensitivity Fisher")
    p.add_argument("--calib", type=Path, help="calibration text file, one text per line (default: pydoc_data.topics)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--ranks", type=_int_list, default=None, help="low-rank candidates, e.g. 0,8,16,32,64")
    p.add_argument("--formats", default=None, help="format families or names, e.g. int2,int4,int8,nf4,fp16")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args) -> int:
    from .compress.formats import DEFAULT_FAMILIES
    from .compress.pipeline import DEFAULT_RANKS, CompressConfig, compress

    cfg = CompressConfig(
        output=args.output, model=args.model, budget_bits=args.budget, budget_mb=args.budget_mb,
        method=args.method, data_aware=args.data_aware, calib=args.calib, calib_samples=args.calib_samples,
        ranks=args.ranks if args.ranks is not None else DEFAULT_RANKS,
        formats=tuple(args.formats.split(",")) if args.formats else DEFAULT_FAMILIES,
        workers=args.workers, seed=args.seed,
    )
    res = compress(cfg, _progress_factory(not args.json and sys.stderr.isatty()))
    human = (f"wrote {res['output']}: {res['matrices']} matrices, {res['bits_per_param']:.4f} bits/param "
             f"(budget {res['budget']} {res['budget_kind']}), {res['bytes'] / 1e6:.2f} MB of tensors, "
             f"{res['seconds']:.1f} s")
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


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantseal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except QuantsealError as exc:
        print(f"quantseal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("quantseal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
