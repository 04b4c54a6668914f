"""A compressed checkpoint's stored tensors read one at a time, for the streaming decoder export.

:func:`open_checkpoint` runs the checks of :func:`quantseal.checkpoint.read_checkpoint` without
holding the tensors: the manifest, the tensor file's size and sha256 (read in 1 MiB chunks), and
every manifest entry against the tensors' dtypes and shapes from the safetensors *header*
(:func:`quantseal.integrity.check_matrix` on ``meta`` tensors, which have a shape and a dtype but
no storage).  Each tensor is read when asked for (safetensors' ``safe_open``, opened and closed
per read, so no mapping of the whole file stays resident) and checked for NaN/Inf as it is read;
nothing is cached, so a consumer that drops what it has used holds one tensor at a time.

:func:`tensor_reader` is the one place that knows where a checkpoint's tensors live (today the one
``weights.safetensors``); sharded checkpoints plug in there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..errors import BadInput
from ..integrity import check_files, check_finite, check_matrix
from .lowbit import STORED_SUFFIXES, StoredMatrix

_DTYPES = {"F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16,
           "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


class TensorReader:
    """Names, dtypes and shapes of one safetensors file from its header; tensors on demand."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="np") as f:
                self.meta = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BadInput(f"{self.path}: corrupt safetensors file ({exc})") from exc

    def read(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="np") as f:
                return np.ascontiguousarray(f.get_tensor(name))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise BadInput(f"{self.path}: cannot read tensor {name} ({exc})") from exc

    def meta_tensor(self, name: str) -> torch.Tensor:
        """A storage-less tensor with ``name``'s dtype and shape (what the integrity checks read)."""
        dtype, shape = self.meta[name]
        if dtype not in _DTYPES:
            raise BadInput(f"{self.path}: tensor {name} has dtype {dtype}, which a checkpoint does not store")
        return torch.empty(shape, dtype=_DTYPES[dtype], device="meta")


def tensor_reader(path: Path) -> TensorReader:
    """The reader of a checkpoint folder's tensors (one ``weights.safetensors`` today)."""
    return TensorReader(Path(path) / ckpt.WEIGHTS)


class StoredTensors(Mapping):
    """Every stored tensor by name, as numpy, read lazily and checked finite on each read.
    Membership and iteration use the header only."""

    def __init__(self, reader: TensorReader):
        self.reader = reader
        self.checked: set[str] = set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.reader.meta:
            raise KeyError(name)
        arr = self.reader.read(name)
        if name not in self.checked:
            check_finite(str(self.reader.path), {name: torch.from_numpy(arr)})
            self.checked.add(name)
        return arr

    def __contains__(self, name) -> bool:
        return name in self.reader.meta

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.meta)

    def __len__(self) -> int:
        return len(self.reader.meta)

    def nbytes(self) -> int:
        """Bytes of every stored tensor (from the header)."""
        return sum(int(self.reader.meta_tensor(k).numel()) * self.reader.meta_tensor(k).element_size()
                   for k in self.reader.meta)

    def check_rest(self) -> None:
        """Read (one at a time) and check the tensors no consumer has read."""
        for name in sorted(set(self.reader.meta) - self.checked):
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

    def __iter__(self):
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

    def __iter__(self):
        return iter(self.manifest.matrices)

    def __len__(self) -> int:
        return len(self.manifest.matrices)


def owned_names(manifest: ckpt.Manifest) -> set[str]:
    """The tensor names that are a planned matrix's stored parts."""
    return {n + s for n in manifest.matrices for s in STORED_SUFFIXES}


def open_checkpoint(path: str | Path) -> tuple[ckpt.Manifest, StoredTensors]:
    """Manifest and lazily read tensors of a checkpoint folder, checked as
    :func:`~quantseal.checkpoint.read_checkpoint` checks them (NaN/Inf on each read)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such checkpoint folder")
    if not ckpt.is_checkpoint(path):
        raise BadInput(f"{path}: not a quantseal checkpoint (no {ckpt.MANIFEST})")
    manifest = ckpt.Manifest.from_json((path / ckpt.MANIFEST).read_text(errors="replace"), str(path / ckpt.MANIFEST))
    wpath = path / ckpt.WEIGHTS
    if not wpath.is_file():
        raise BadInput(f"{path}: {ckpt.WEIGHTS} is missing")
    if manifest.files:
        if ckpt.WEIGHTS not in manifest.files:
            raise BadInput(f"{path / ckpt.MANIFEST}: records no sha256 for {ckpt.WEIGHTS}")
        check_files(path, manifest.files)
    reader = tensor_reader(path)
    meta = {k: reader.meta_tensor(k) for k in reader.meta}
    for name, e in manifest.matrices.items():
        check_matrix(str(wpath), name, e, meta)
    return manifest, StoredTensors(reader)
