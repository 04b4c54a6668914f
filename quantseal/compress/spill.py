"""Calibration activations held in memory up to a cap, the rest spilled to a temporary folder.

Streaming GPTQ (:mod:`.streaming`) keeps only the current block's inputs and outputs: for each
calibration batch a hidden-state tensor ``(B, T, H)``.  :class:`SpillStore` is the list they live
in: tensors are kept in memory while the store's in-memory bytes stay within ``cap_bytes``; past
it each further tensor is written to its own file in a private temporary folder (``mkdtemp``) and
read back on access.  ``close()`` deletes the folder; so does the interpreter's exit
(``weakref.finalize``) if a run is interrupted.  A tensor read back equals the one stored, bit for
bit (raw bytes, :mod:`quantseal.tensorfile`), so spilling never changes a result.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from ..tensorfile import SafetensorsReader, SafetensorsWriter, info_of

DEFAULT_ACTIVATION_MB = 1024.0


class SpillStore(Sequence):
    """An append-only list of CPU tensors, in memory up to ``cap_bytes``, spilled to files beyond;
    items can be dropped (:meth:`drop`) as they are consumed."""

    def __init__(self, cap_bytes: float, parent: str | Path | None = None):
        self.cap_bytes = float(cap_bytes)
        self.parent = parent
        self._items: list[torch.Tensor | Path | None] = []  # None: dropped
        self.memory_bytes = 0
        self.spilled = 0
        self._folder: Path | None = None
        self._finalizer = None

    def _dir(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="quantseal-spill-", dir=self.parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        if self.memory_bytes + size <= self.cap_bytes:
            self._items.append(t)
            self.memory_bytes += size
            return
        path = self._dir() / f"{len(self._items):06d}.safetensors"
        w = SafetensorsWriter(path, {"t": info_of(t)})
        w.put("t", t)
        w.close(sync=False)  # scratch data, deleted at close
        self._items.append(path)
        self.spilled += 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        if item is None:
            raise LookupError(f"activation {i} was dropped")
        return SafetensorsReader(item).get("t") if isinstance(item, Path) else item

    def drop(self, i: int) -> None:
        """Free item ``i`` (its memory, or its file) once it is no longer needed: a store consumed
        front to back while the next one fills holds one window in all, not two.  The item's place
        stays (indices do not move); reading it again is an error."""
        item = self._items[i]
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
        elif item is not None:
            self.memory_bytes -= item.numel() * item.element_size()
        self._items[i] = None

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Drop the tensors and delete the spill folder."""
        self._items = []
        self.memory_bytes = 0
        if self._finalizer is not None:
            self._finalizer()
            self._folder = None

