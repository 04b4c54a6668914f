"""The range of every number the command line takes, checked once after parsing and before any
file is read (issue 11: ``--budget-mb nan``, ``--calib-samples -5`` or ``--bits 100000000`` used to
reach the compute, or a traceback).

One table, keyed by the argparse destination (``--calib-samples`` → ``calib_samples``), with
per-command exceptions; a value outside its range is a :class:`~quantseal.errors.BadInput` naming
the flag, the range and the value.  The commands' own, finer checks (``--block`` sizes, ``--max-length``
against the model's positions, ...) still run after these.  :func:`one_line` makes any message
one printable line (the CLI's error contract).
"""

from __future__ import annotations

import math
from argparse import Namespace

from .errors import BadInput

BIG = 10**6

#: integer destinations: inclusive (low, high)
INT_RANGES: dict[str, tuple[int, int]] = {
    "calib_samples": (1, BIG),
    "workers": (1, 1024),
    "threads": (1, 1024),
    "seed": (0, 2**63 - 1),
    "port": (0, 65535),
    "steps": (1, BIG),
    "rank": (0, 4096),
    "window": (1, 1024),
    "triggers_per_bit": (1, 1024),
    "adapter_rank": (1, 4096),
    "max_length": (1, BIG),
    "max_new_tokens": (0, BIG),
    "max_chars": (1, 10**9),
    "max_batch": (1, BIG),
    "max_triggers": (1, BIG),
    "retries": (0, 100),
    "hessian_tokens": (1, BIG),
}
#: (command, destination) exceptions to :data:`INT_RANGES`
INT_OVERRIDES: dict[tuple[str, str], tuple[int, int]] = {
    ("board", "rank"): (1, 4096),  # the board's shared embedding LoRA needs a rank
}
#: float destinations: (low, high, high included); low is always excluded and the value finite
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "budget": (0.0, 32.0, True),
    "budget_mb": (0.0, math.inf, False),
    "max_decode_ms": (0.0, math.inf, False),
    "alpha": (0.0, 1.0, False),
    "timeout": (0.0, math.inf, False),
    "deadline": (0.0, math.inf, False),
    "max_response_mb": (0.0, math.inf, False),
    "qps": (0.0, math.inf, False),
    "header_timeout": (0.0, 3600.0, True),
    "body_timeout": (0.0, 3600.0, True),
    "margin": (0.0, 1000.0, True),  # board train: the decoder hinge margin, in logits
    "activation_mb": (0.0, math.inf, False),  # compress gptq/cbq: calibration activations held before spilling
    "time_limit": (0.0, math.inf, False),  # board train: seconds of training + polish
}
MAX_RANK = 4096
MAX_BITS = 1024  # codeword bits (quantseal.registry.MAX_BITS)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _int_range(lo: int, hi: int) -> str:
    return f"{lo}..{hi}" if hi < 2**40 else f"{lo} or more"


def check_ranges(args: Namespace) -> None:
    """Refuse any number of ``args`` (a parsed command line) outside its range."""
    command = getattr(args, "command", "")
    values = vars(args)
    for dest, (lo, hi) in INT_RANGES.items():
        v = values.get(dest)
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            continue
        lo, hi = INT_OVERRIDES.get((command, dest), (lo, hi))
        if not lo <= v <= hi:
            raise BadInput(f"{_flag(dest)} must be in {_int_range(lo, hi)}, not {v}")
    for dest, (lo, hi, closed) in FLOAT_RANGES.items():
        v = values.get(dest)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not (math.isfinite(v) and lo < v and (v <= hi if closed else v < hi)):
            bound = f"{hi:g}]" if closed else ("∞)" if hi == math.inf else f"{hi:g})")
            raise BadInput(f"{_flag(dest)} must be a finite number in ({lo:g}, {bound}, not {v}")
    ranks = values.get("ranks")
    if isinstance(ranks, tuple):
        if not ranks:
            raise BadInput("--ranks needs at least one rank")
        bad = [r for r in ranks if not 0 <= r <= MAX_RANK]
        if bad:
            raise BadInput(f"--ranks must each be in 0..{MAX_RANK}, not {bad[0]}")
    bits = values.get("bits")
    if command == "registry" and isinstance(bits, int):
        from .registry import check_bits

        try:
            check_bits(bits)
        except BadInput as exc:
            raise BadInput(f"--bits: {exc}") from None
    if command == "board" and isinstance(bits, int) and not (8 <= bits <= MAX_BITS and bits % 8 == 0):
        raise BadInput(f"--bits must be a multiple of 8 in 8..{MAX_BITS} (a registry takes 16..{MAX_BITS}), not {bits}")


def one_line(message: str) -> str:
    """``message`` as one printable line: line breaks and other control characters escaped, and
    characters that cannot be written as UTF-8 (lone surrogates from non-UTF-8 argv) escaped."""
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out).strip() or "error"
