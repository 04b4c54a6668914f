"""safetensors files read and written one tensor at a time, with plain file I/O (no mmap).

A safetensors file is ``u64 n (little-endian) · n bytes of JSON header · data``; the header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
part) plus an optional ``"__metadata__"`` map of strings.

* :class:`SafetensorsWriter` lays a file out from the names, dtypes and shapes alone, exactly as
  ``safetensors.torch.save_file`` does (data ordered by dtype, widest enum first, then by name;
  compact JSON in that order, padded with spaces to a multiple of 8), writes the header at once
  and then each tensor at its offset whenever it is ready, in any order.  The bytes equal
  ``save_file``'s for the same tensors (tests/test_tensorfile.py), so a streamed checkpoint is
  byte-identical to one written from a dict in memory, while only one tensor is ever held.
* :class:`SafetensorsReader` parses the header, validates it against the file size, and reads one
  tensor with ``pread`` into a fresh buffer.  Nothing is memory-mapped: a mapping's touched pages
  count in the process's resident set for as long as it lives, which for a 4 GB source would be
  the whole file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput

# safetensors' Dtype enum, ascending; save_file orders data by this, descending, then by name
_ENUM = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
         "I64", "U64")
_RANK = {name: i for i, name in enumerate(_ENUM)}
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's dtype and shape, without its values (quacks like a tensor for
    :func:`quantseal.integrity.check_matrix`: ``dtype``, ``shape``, ``numel()``, ``element_size()``,
    ``dim()``)."""

    dtype: torch.dtype
    shape: torch.Size

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()


def info_of(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(t.dtype, torch.Size(t.shape))


def layout(specs: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """(header bytes incl. the 8-byte length, ``{name: absolute file offset}``) of a file holding
    ``specs``, laid out as ``save_file`` lays it out."""
    for name, s in specs.items():
        if s.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {s.dtype} has no safetensors name here")
    order = sorted(specs, key=lambda n: (-_RANK[NAMES[specs[n].dtype]], n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for n in order:
        s = specs[n]
        header[n] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[n] = pos
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {n: len(head) + o for n, o in offsets.items()}


def file_size(specs: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> int:
    head, _ = layout(specs, metadata)
    return len(head) + sum(s.nbytes for s in specs.values())


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: ``put(name, t)`` in any order, then ``close()``,
    which checks that every announced tensor was written and fsyncs.  ``t`` must have the
    announced dtype and shape (it is moved to the CPU first)."""

    def __init__(self, path: str | Path, specs: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        head, self.offsets = layout(self.specs, metadata)
        self.size = len(head) + sum(s.nbytes for s in self.specs.values())
        self.pending = set(self.specs)
        self._rows: dict[str, set[int]] = {}  # rows put so far of tensors written by put_rows
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, head, 0)
        os.ftruncate(self._fd, self.size)

    def put(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.path.name}: tensor {name} was not announced")
        if name not in self.pending:
            raise ValueError(f"{self.path.name}: tensor {name} written twice")
        if t.dtype != spec.dtype or tuple(t.shape) != tuple(spec.shape):
            raise ValueError(f"{self.path.name}: tensor {name} is {t.dtype} {list(t.shape)}, "
                             f"announced {spec.dtype} {list(spec.shape)}")
        self._write(self.offsets[name], t)
        self.pending.discard(name)

    def put_rows(self, name: str, start: int, t: torch.Tensor) -> None:
        """Rows ``start:start + len(t)`` of the announced tensor ``name`` (along dim 0), so a large
        tensor is written a chunk at a time; the tensor counts as written once every row was put
        (the same bytes as one :meth:`put`)."""
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.path.name}: tensor {name} was not announced")
        if name not in self.pending:
            raise ValueError(f"{self.path.name}: tensor {name} written twice")
        if (t.dtype != spec.dtype or not spec.shape or tuple(t.shape[1:]) != tuple(spec.shape[1:])
                or not 0 <= start <= start + t.shape[0] <= spec.shape[0]):
            raise ValueError(f"{self.path.name}: rows {start}:{start + (t.shape[0] if t.dim() else 0)} of {name} "
                             f"are {t.dtype} {list(t.shape)}, announced {spec.dtype} {list(spec.shape)}")
        row = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
        self._write(self.offsets[name] + start * row, t)
        rows = self._rows.setdefault(name, set())
        rows.update(range(start, start + t.shape[0]))
        if len(rows) == spec.shape[0]:
            del self._rows[name]
            self.pending.discard(name)

    def _write(self, offset: int, t: torch.Tensor) -> None:
        data = t.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            mv = memoryview(data.view(torch.uint8).numpy())
            done = 0
            while done < len(mv):
                done += os.pwrite(self._fd, mv[done:], offset + done)

    def close(self, sync: bool = True) -> None:
        """Check every announced tensor was written; fsync unless ``sync`` is False (scratch)."""
        if self._fd is None:
            return
        try:
            if self.pending:
                raise RuntimeError(f"{self.path.name}: tensors never written: {sorted(self.pending)[:3]}")
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SafetensorsReader:
    """The header of a safetensors file, and its tensors one at a time (``get``).  A damaged
    header (bad length, bad JSON, an unknown dtype, offsets outside the file or overlapping) is a
    :class:`BadInput` naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 < n <= min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise BadInput(f"{self.path}: corrupt safetensors file ({exc})") from None
        if not isinstance(header, dict):
            raise BadInput(f"{self.path}: corrupt safetensors file (header is not a map)")
        meta = header.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        self.infos: dict[str, TensorInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        base, data_len = 8 + n, size - 8 - n
        spans = []
        for name, rec in header.items():
            try:
                dtype = DTYPES[rec["dtype"]]
                shape = torch.Size(int(x) for x in rec["shape"])
                b, e = (int(x) for x in rec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise BadInput(f"{self.path}: corrupt safetensors file (entry {name!r})") from None
            info = TensorInfo(dtype, shape)
            if any(x < 0 for x in shape) or not 0 <= b <= e <= data_len or e - b != info.nbytes:
                raise BadInput(f"{self.path}: corrupt safetensors file (tensor {name} lies outside the data "
                               f"or its size disagrees with its shape)")
            self.infos[name] = info
            self._spans[name] = (base + b, base + e)
            spans.append((b, e, name))
        spans.sort()
        for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise BadInput(f"{self.path}: corrupt safetensors file (tensors {n0} and {n1} overlap)")

    def keys(self) -> list[str]:
        return sorted(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read now into its own memory (CPU)."""
        info = self.infos[name]
        b, e = self._spans[name]
        return self._read(name, b, e, info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor (along dim 0), read now: ``(stop − start, *rest)``,
        without reading the others (a token table's rows for the ids in use)."""
        info = self.infos[name]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise IndexError(f"{self.path.name}: rows {start}:{stop} of {name} {list(info.shape)}")
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        b = self._spans[name][0]
        return self._read(name, b + start * row, b + stop * row, (stop - start, *info.shape[1:]))

    def _read(self, name: str, b: int, e: int, shape) -> torch.Tensor:
        dtype = self.infos[name].dtype
        if e == b:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(e - b)
        mv = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(buf):
                got = f.readinto(mv[done:]) if f.seek(b + done) == b + done else 0
                if not got:
                    raise BadInput(f"{self.path}: truncated while reading tensor {name}")
                done += got
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)
