"""``--device auto|cpu|cuda``: where the solvers compute (Fisher, LQ's SVD and quantisation, GPTQ).

Inputs are moved to the device, results back to the CPU before anything is written, so a
checkpoint has the same format whichever device made it.  On the CPU the bytes are those of the
runs before ``--device`` existed.  On CUDA, torch's float reductions (matmul, SVD, cumulative
sums) are not bitwise reproducible across devices, and cuBLAS/cuSOLVER may pick algorithms by
problem size: the same inputs on the same GPU and torch build give the same results in practice,
but a CUDA run is compared to a CPU run to a tolerance (benchmarks/gpu_check.py), never byte for
byte.  Seeded random draws (the SVD's test matrix, the Fisher's directions) are made on the CPU
and moved, so both devices start from the same numbers.
"""

from __future__ import annotations

import torch

from .errors import BadInput, Unsupported

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` → ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` without a
    usable GPU is an :class:`Unsupported` (one line, exit 2)."""
    if isinstance(name, torch.device):
        return name
    name = "auto" if name is None else str(name)
    if name not in DEVICES:
        raise BadInput(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise Unsupported("--device cuda: no CUDA device is available to torch (torch.cuda.is_available() is "
                          "False); use --device cpu or auto")
    return torch.device(name)


def to_device(obj, device: torch.device):
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
