"""Integrity of a compressed checkpoint: file hashes, the manifest against the stored tensors, and
finite values.  Pure checks (a manifest entry and tensors in, a :class:`BadInput` naming the tensor
out); :func:`quantseal.checkpoint.read_checkpoint` runs them on every read, so ``export``,
``inspect``, ``load_compressed`` and board training refuse a damaged or lying checkpoint.

What a stored matrix ``NAME`` of shape ``(N, K)``, format ``f`` and rank ``r`` must hold
(checkpoint.py's table; ``nb = ceil(K / f.block)``, ``s = f.stored_bits``):

* ``NAME.qweight``: uint8 (N, nb, f.block · s / 8) and ``NAME.scales``: float16/32 (N, nb), int/nf;
* ``NAME.qzeros``: uint8 (N, ceil(nb · s / 8)), affine int only;
* ``NAME.offsets``: float16/32 (N, nb), int4f only (float block offsets);
* ``NAME.weight``: float16 / float32 (N, K), fp16 / fp32;
* ``NAME.L1``, ``NAME.L2``: float16/32 (N, r), (r, K), iff r > 0;
* optional ``NAME.K1``, ``NAME.K2`` (o1, i1), (o2, i2) with o1·o2 = N, i1·i2 = K (a Kronecker
  branch), ``NAME.input_smooth`` (K,), ``NAME.output_scale`` (N,);

and the entry's ``bytes`` equals the bytes of its codes, scales, zero points, weight and factors
(:func:`quantseal.checkpoint.entry_bytes`).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .errors import BadInput

_FACTOR_DTYPES = (torch.float16, torch.float32)
_MATRIX_SUFFIXES = (".qweight", ".scales", ".qzeros", ".offsets", ".weight", ".L1", ".L2", ".K1", ".K2")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: Path, names) -> dict[str, dict]:
    """``{name: {"sha256", "bytes"}}`` of files in ``folder`` (what the manifest records)."""
    return {n: {"sha256": file_sha256(Path(folder) / n), "bytes": (Path(folder) / n).stat().st_size}
            for n in sorted(names)}


def check_files(folder: Path, records: dict) -> None:
    """Every recorded file exists with its size and sha256."""
    if not isinstance(records, dict):
        raise BadInput(f"{folder}: manifest 'files' is not a mapping")
    for name, rec in records.items():
        p = Path(folder) / str(name)
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or Path(str(name)).name != name:
            raise BadInput(f"{folder}: manifest record of file {name!r} is malformed")
        if not p.is_file():
            raise BadInput(f"{p}: missing (the manifest records it)")
        if "bytes" in rec and p.stat().st_size != rec["bytes"]:
            raise BadInput(f"{p}: corrupt or truncated: {p.stat().st_size} bytes, the manifest records {rec['bytes']}")
        if file_sha256(p) != rec["sha256"]:
            raise BadInput(f"{p}: sha256 differs from the manifest's (corrupt or edited)")


def _expect(where: str, tensors: dict, key: str, dtypes, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise BadInput(f"{where}: tensor {key} named by the manifest is missing")
    if t.dtype not in dtypes:
        raise BadInput(f"{where}: tensor {key} is {str(t.dtype).replace('torch.', '')}, the manifest's format "
                       f"needs {'/'.join(str(d).replace('torch.', '') for d in dtypes)}")
    if tuple(t.shape) != tuple(shape):
        raise BadInput(f"{where}: tensor {key} has shape {list(t.shape)}, the manifest implies {list(shape)}")
    return t


def check_matrix(where: str, name: str, entry, tensors: dict) -> None:
    """The manifest entry of matrix ``name`` (format, shape, rank, bytes, kind) against its stored
    tensors; a mismatch is a :class:`BadInput` naming the tensor."""
    if entry.kind not in ("linear", "embedding"):
        raise BadInput(f"{where}: matrix {name}: unknown kind {entry.kind!r}")
    shape = entry.shape
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
        raise BadInput(f"{where}: matrix {name}: shape {shape!r} is not two positive integers")
    if isinstance(entry.error, bool) or not isinstance(entry.error, (int, float)):
        raise BadInput(f"{where}: matrix {name}: error {entry.error!r} is not a number")
    rank = entry.rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise BadInput(f"{where}: matrix {name}: rank {rank!r} is not a non-negative integer")
    n, k = shape
    spec = entry.spec
    if spec.kind == "fp":
        _expect(where, tensors, f"{name}.weight", (torch.float16 if spec.bits == 16 else torch.float32,), (n, k))
    else:
        nb = math.ceil(k / spec.block)
        s = spec.stored_bits
        _expect(where, tensors, f"{name}.qweight", (torch.uint8,), (n, nb, spec.block * s // 8))
        _expect(where, tensors, f"{name}.scales", (torch.float16, torch.float32), (n, nb))
        if spec.kind == "int" and not spec.symmetric:
            _expect(where, tensors, f"{name}.qzeros", (torch.uint8,), (n, math.ceil(nb * s / 8)))
        elif f"{name}.qzeros" in tensors:
            raise BadInput(f"{where}: tensor {name}.qzeros is stored but format {entry.format} has no zero points")
        if spec.kind == "intf":
            _expect(where, tensors, f"{name}.offsets", (torch.float16, torch.float32), (n, nb))
    if spec.kind != "intf" and f"{name}.offsets" in tensors:
        raise BadInput(f"{where}: tensor {name}.offsets is stored but format {entry.format} has no float offsets")
    if rank:
        _expect(where, tensors, f"{name}.L1", _FACTOR_DTYPES, (n, rank))
        _expect(where, tensors, f"{name}.L2", _FACTOR_DTYPES, (rank, k))
    elif f"{name}.L1" in tensors or f"{name}.L2" in tensors:
        raise BadInput(f"{where}: tensor {name}.L1 is stored but the manifest says rank 0")
    if (f"{name}.K1" in tensors) != (f"{name}.K2" in tensors):
        raise BadInput(f"{where}: tensor {name}.K1 or {name}.K2 stored without the other")
    if f"{name}.K1" in tensors:  # a Kronecker branch K1 ⊗ K2: (o1 o2, i1 i2) = (N, K)
        k1, k2 = tensors[f"{name}.K1"], tensors[f"{name}.K2"]
        if (k1.dim() != 2 or k2.dim() != 2 or k1.dtype not in _FACTOR_DTYPES or k2.dtype not in _FACTOR_DTYPES
                or k1.shape[0] * k2.shape[0] != n or k1.shape[1] * k2.shape[1] != k):
            raise BadInput(f"{where}: tensors {name}.K1 {list(k1.shape)} and {name}.K2 {list(k2.shape)} do not "
                           f"make a Kronecker factor pair of a [{n}, {k}] matrix")
    for suffix, size in (("input_smooth", k), ("output_scale", n)):
        vec = tensors.get(f"{name}.{suffix}")
        if vec is not None and tuple(vec.shape) != (size,):
            raise BadInput(f"{where}: tensor {name}.{suffix} has shape {list(vec.shape)}, expected [{size}]")
    stored = sum(t.numel() * t.element_size() for key, t in tensors.items()
                 if key.startswith(name + ".") and key[len(name):] in _MATRIX_SUFFIXES)
    if not isinstance(entry.bytes, int) or isinstance(entry.bytes, bool) or entry.bytes != stored:
        raise BadInput(f"{where}: matrix {name}: the manifest says {entry.bytes!r} bytes, {stored} are stored")


def nonfinite_count(t: torch.Tensor, chunk: int = 1 << 20) -> int:
    """How many values of ``t`` are NaN or infinite (0 for a non-float tensor), counted over
    slices of ``chunk`` elements: ``torch.isfinite`` of a whole 400 MB token table allocated ~1.7×
    its size in temporaries."""
    if not t.is_floating_point() or not t.numel():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def check_finite(where: str, tensors: dict, what: str = "tensor") -> None:
    """Every floating tensor holds finite values; else a :class:`BadInput` naming the first one
    (in name order) and how many of its values are NaN or infinite."""
    for key in sorted(tensors):
        bad = nonfinite_count(tensors[key])
        if bad:
            raise BadInput(f"{where}: {what} {key} holds {bad} NaN/Inf value(s)")
