"""A compressed checkpoint's stored tensors as the streaming decoder export reads them: lazily,
one at a time, as numpy arrays.

:func:`quantseal.checkpoint.open_checkpoint` checks the checkpoint (file hashes, every manifest
entry against the tensors' headers) and gives a lazy per-tensor mapping (one file or shards; a
NaN/Inf is refused when its tensor is read).  The views here keep that laziness: nothing is read
until an entry is asked for and nothing is cached, so a consumer that drops what it has used holds
one tensor (or one matrix's few tensors) at a time, and a token table is copied in chunks
(:class:`ChunkedTensor`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..errors import BadInput
from .lowbit import STORED_SUFFIXES, StoredMatrix


CHUNKED_ABOVE = 64 << 20  # a float tensor this large (a token table) is copied in chunks, never held whole
CHUNK_BYTES = 16 << 20


class ChunkedTensor:
    """A large stored float tensor that is read in row chunks when its bytes are written
    (:meth:`chunks`; each chunk checked for NaN/Inf), or whole by ``np.asarray``.  Has the
    ``dtype``, ``shape`` and ``nbytes`` of the array it stands for."""

    def __init__(self, path: Path, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.name, self.dtype, self.shape = Path(path), name, np.dtype(dtype), tuple(shape)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize

    def chunks(self) -> Iterator[np.ndarray]:
        from safetensors import safe_open

        row = max(1, self.nbytes // max(1, self.shape[0]))
        step = max(1, CHUNK_BYTES // row)
        for r0 in range(0, self.shape[0], step):
            with safe_open(str(self.path), framework="np") as f:  # opened per chunk: no mapping stays resident
                part = np.ascontiguousarray(f.get_slice(self.name)[r0:min(r0 + step, self.shape[0])])
            bad = ~np.isfinite(part)
            if bad.any():
                raise BadInput(f"{self.path}: tensor {self.name} holds NaN/Inf value(s) (rows from {r0})")
            yield part

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(list(self.chunks()), axis=0) if self.shape[0] else np.empty(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype)


class NumpyView(Mapping):
    """``tensors`` (torch tensors or arrays by name, possibly lazy) read as numpy arrays; records
    which names were read, so :meth:`read_rest` can check the others.  From a checkpoint's lazy
    mapping (one that knows each tensor's file), a float tensor over :data:`CHUNKED_ABOVE` bytes
    comes as a :class:`ChunkedTensor`."""

    def __init__(self, tensors: Mapping):
        self.tensors = tensors
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> np.ndarray:
        self.read.add(name)
        if hasattr(self.tensors, "file_of") and name in self.tensors:
            info = self.tensors.info(name)
            if info.dtype.is_floating_point and info.dtype != torch.bfloat16 and info.nbytes >= CHUNKED_ABOVE:
                np_dtype = torch.empty((), dtype=info.dtype).numpy().dtype
                return ChunkedTensor(self.tensors.file_of(name), name, np_dtype, tuple(info.shape))
        v = self.tensors[name]
        return v if isinstance(v, np.ndarray) else v.numpy()

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def read_rest(self) -> None:
        """Read (one at a time, so a lazy source checks each) every tensor not read yet."""
        for name in sorted(set(self.tensors) - self.read):
            self[name]


class Filtered(Mapping):
    """A view of ``tensors`` without the names in ``hidden`` (lazy: nothing is read)."""

    def __init__(self, tensors: Mapping, hidden: set[str]):
        self.tensors, self.hidden = tensors, hidden

    def __getitem__(self, name):
        if name in self.hidden:
            raise KeyError(name)
        return self.tensors[name]

    def __contains__(self, name) -> bool:
        return name not in self.hidden and name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.tensors if k not in self.hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class LazyMatrices(Mapping):
    """The planned matrices as :class:`StoredMatrix`, each read from ``tensors`` when asked for."""

    def __init__(self, manifest: ckpt.Manifest, tensors: Mapping):
        self.manifest, self.tensors = manifest, tensors

    def __getitem__(self, name: str) -> StoredMatrix:
        e = self.manifest.matrices[name]
        arrays = {s[1:]: self.tensors[name + s] for s in STORED_SUFFIXES if name + s in self.tensors}
        return StoredMatrix(name, e.spec, tuple(e.shape), arrays)

    def __contains__(self, name) -> bool:
        return name in self.manifest.matrices

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.matrices)

    def __len__(self) -> int:
        return len(self.manifest.matrices)


def owned_names(manifest: ckpt.Manifest) -> set[str]:
    """The tensor names that are a planned matrix's stored parts."""
    return {n + s for n in manifest.matrices for s in STORED_SUFFIXES}
