"""The tensor files of a compressed checkpoint: one ``weights.safetensors``, or shards
``weights-00001-of-000NN.safetensors`` when the tensors exceed the shard cap; written tensor by
tensor as they are computed, read tensor by tensor.

Layout (DESIGN §4).  Tensor names are sorted and cut into consecutive shards of at most
:data:`SHARD_BYTES` of data each (a tensor larger than the cap gets a shard of its own).  One
shard is named ``weights.safetensors`` and is byte-identical to ``save_file`` of the whole dict
(the layout before shards existed).  Each file's size and sha256 are in the manifest's ``files``;
which shard holds a tensor is read from the shards' headers, so the manifest schema is unchanged.

:class:`CheckpointTensors` is the lazy accessor: a read-only ``Mapping[str, torch.Tensor]`` whose
``tensors[name]`` reads one tensor from its shard (no mmap) and refuses NaN/Inf naming it;
``tensors.info(name)`` gives its dtype and shape without reading it.  Export reads a checkpoint of
any size through it, one tensor at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import BadInput
from .integrity import nonfinite_count
from .tensorfile import SafetensorsReader, SafetensorsWriter, TensorInfo

WEIGHTS = "weights.safetensors"
SHARD_BYTES = 2_000_000_000
METADATA = {"format": "pt"}
_SHARD = re.compile(r"^weights-(\d{5})-of-(\d{5})\.safetensors$")


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards (``weights.safetensors`` for one)."""
    if count == 1:
        return [WEIGHTS]
    return [f"weights-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(specs: dict[str, TensorInfo], shard_bytes: int = SHARD_BYTES) -> dict[str, dict[str, TensorInfo]]:
    """``{file name: {tensor name: info}}``: names in sorted order cut into consecutive shards of
    at most ``shard_bytes`` of data (a larger tensor alone in its shard)."""
    groups: list[dict[str, TensorInfo]] = [{}]
    size = 0
    for name in sorted(specs):
        nb = specs[name].nbytes
        if groups[-1] and size + nb > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = specs[name]
        size += nb
    return dict(zip(shard_names(len(groups)), groups))


class ShardedWriter:
    """Write announced tensors (``specs``) into the shard files of ``folder`` as they come:
    ``put(name, tensor)`` in any order, then ``close()`` → the file names written."""

    def __init__(self, folder: str | Path, specs: dict[str, TensorInfo], shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        self.plan = plan_shards(specs, shard_bytes)
        self.where = {t: f for f, group in self.plan.items() for t in group}
        self.writers: dict[str, SafetensorsWriter] = {}
        try:
            for f, group in self.plan.items():
                self.writers[f] = SafetensorsWriter(self.folder / f, group, METADATA)
        except BaseException:
            self.abort()
            raise

    def put(self, name: str, t: torch.Tensor) -> None:
        if name not in self.where:
            raise KeyError(f"tensor {name} was not announced to the checkpoint writer")
        self.writers[self.where[name]].put(name, t)

    def put_rows(self, name: str, start: int, t: torch.Tensor) -> None:
        """Rows ``start:start + len(t)`` of ``name`` (see :meth:`SafetensorsWriter.put_rows`)."""
        if name not in self.where:
            raise KeyError(f"tensor {name} was not announced to the checkpoint writer")
        self.writers[self.where[name]].put_rows(name, start, t)

    def close(self) -> list[str]:
        for w in self.writers.values():
            w.close()
        return list(self.plan)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def weight_files(folder: str | Path, records: dict | None) -> list[str]:
    """The tensor files of a checkpoint folder: the shards the manifest's ``files`` records (their
    full set ``-of-NNNNN`` must be recorded), else ``weights.safetensors``."""
    names = sorted(n for n in (records or {}) if _SHARD.match(str(n)))
    if not names:
        return [WEIGHTS]
    count = int(_SHARD.match(names[0]).group(2))
    if names != shard_names(count):
        raise BadInput(f"{folder}: the manifest records shards {names[:3]}..., not the full set of {count}")
    return names


class CheckpointTensors(Mapping):
    """Read-only lazy view of a checkpoint's stored tensors, one or many shard files.

    ``t[name]`` (or ``t.get(name)``) reads that tensor now (CPU, its stored dtype) and refuses a
    NaN/Inf value with a :class:`BadInput` naming it; ``t.info(name)`` → :class:`TensorInfo`
    (dtype, shape) without reading; ``t.infos()`` → every name's info; ``keys()`` / ``in`` /
    ``len`` come from the headers.  Nothing is cached: each access reads the file again."""

    def __init__(self, folder: str | Path, files: list[str]):
        self.folder = Path(folder)
        self.files = list(files)
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, SafetensorsReader] = {}
        for f in self.files:
            p = self.folder / f
            if not p.is_file():
                raise BadInput(f"{self.folder}: {f} is missing")
            r = SafetensorsReader(p)
            for name in r.keys():
                if name in self._where:
                    raise BadInput(f"{p}: tensor {name} is also stored in {self._where[name].path.name}")
                self._where[name] = r
            self._readers[f] = r

    def __getitem__(self, name: str) -> torch.Tensor:
        r = self._where[name]
        t = r.get(name)
        bad = nonfinite_count(t)
        if bad:
            raise BadInput(f"{r.path}: tensor {name} holds {bad} NaN/Inf value(s)")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].infos[name]

    def infos(self) -> dict[str, TensorInfo]:
        return {n: self._where[n].infos[n] for n in sorted(self._where)}

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor in memory (what :func:`quantseal.checkpoint.read_checkpoint` returns)."""
        return {n: self[n] for n in self}
