"""A Hugging Face model folder read lazily: one tensor, or one transformer block, at a time.

``compress`` streams through :class:`LazySource` instead of loading the whole float model
(issue #12): the model is built on the ``meta`` device (shapes, no memory), every stored tensor
is read from its safetensors file when it is needed (:class:`~quantseal.tensorfile.SafetensorsReader`,
``pread``, no mmap) and cast to float32 exactly as ``from_pretrained(dtype=float32)`` does, and a
block's weights are materialised for its turn (:meth:`LazySource.load_module`) then dropped
(:meth:`LazySource.release`).  Peak memory is then about one block plus the largest single tensor
(the token table), flat in depth.

Supported: a folder with ``config.json`` and either ``model.safetensors`` (any ``*.safetensors``)
or Hugging Face shards named by ``model.safetensors.index.json``; keys as the model names them,
or under the model's ``base_model_prefix`` (``bert.encoder...``).  Anything else (a GGUF folder,
``*.bin`` weights, renamed legacy keys) gives ``None`` from :func:`open_source` and the caller
loads the model in memory as before.
"""

from __future__ import annotations

import ctypes
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput
from .integrity import nonfinite_count
from .models import Family, build_model, family_of, gguf_file, read_config
from .tensorfile import SafetensorsReader, TensorInfo

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where one source tensor lies (a safetensors file and its key); picklable, so a worker
    process can read the matrix itself instead of receiving its bytes.  ``load()`` → float32."""

    path: str
    key: str
    name: str  # the model's name for it

    def load(self) -> torch.Tensor:
        return _checked(SafetensorsReader(self.path).get(self.key).float(), self.path, self.name)


def _checked(t: torch.Tensor, where, name: str) -> torch.Tensor:
    bad = nonfinite_count(t)
    if bad:
        raise BadInput(f"{where}: source weight {name} holds {bad} NaN/Inf value(s)")
    return t


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            return [folder / f for f in sorted(set(wm.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"{index}: not a valid safetensors index ({exc})") from None
    return sorted(folder.glob("*.safetensors"))


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap memory to the system.  Without it the
    resident set crept up by ~2 MB per streamed block (freed blocks' pages stayed in malloc's
    arenas, fragmented); elsewhere a no-op."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, nbytes)`` for this process: every allocation of
    ``nbytes`` or more is its own mapping, returned to the system when freed.  glibc otherwise
    raises the threshold to the largest block freed (up to 32 MB), so a streamed run's 1–32 MB
    tensors (a block's matrices, a batch's activations) come from the heap, where long-lived ones
    pin pages and the resident set creeps up block after block.  Measured on a 2-block model of
    360M width (streamed gptq): peak 751 → 648 MB, block-to-block growth of the peak 61 → 14 MB.
    Returns False where there is no glibc (a no-op)."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (a tied LM head)."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        return {"lm_head.weight"}
    return set()


class LazySource:
    """A model folder whose tensors are read on demand (see the module notes).

    ``model``: the meta-device model; ``fam``: its family; ``stored``: every state-dict key a
    checkpoint stores (no ``position_ids``, no tied alias) → its float32 :class:`TensorInfo`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.fam: Family = family_of(self.config)
        files = _weight_files(self.folder)
        if not files:
            raise BadInput(f"{self.folder}: no weights (*.safetensors) in the folder")
        self._keys: dict[str, tuple[SafetensorsReader, str]] = {}
        for f in files:
            if not f.is_file():
                raise BadInput(f"{f}: missing (the safetensors index names it)")
            try:
                r = SafetensorsReader(f)
            except BadInput as exc:  # the in-memory loader's wording
                raise BadInput(f"{self.folder}: cannot load the model ({exc})") from None
            for k in r.keys():
                self._keys.setdefault(k, (r, k))
        with torch.device("meta"):
            self.model = build_model(self.config)
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        tied = tied_keys(self.model)
        self._map: dict[str, tuple[SafetensorsReader, str]] = {}
        missing = []
        state = self.model.state_dict()
        for k in state:
            if k in tied or k.endswith("position_ids"):
                continue
            hit = self._keys.get(k) or (self._keys.get(f"{prefix}.{k}") if prefix else None)
            if hit is None:
                missing.append(k)
            else:
                self._map[k] = hit
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise BadInput(f"{self.folder}: weights missing from the model files (they would be random): "
                           f"{', '.join(missing[:3])}{more}")
        self.stored = {k: TensorInfo(state[k].dtype, state[k].shape) for k in self._map}
        for k, info in self.stored.items():
            r, key = self._map[k]
            if tuple(r.infos[key].shape) != tuple(info.shape):
                raise BadInput(f"{r.path}: tensor {key} has shape {list(r.infos[key].shape)}, the config implies "
                               f"{list(info.shape)}")

    def ref(self, name: str) -> TensorRef:
        r, key = self._map[name]
        return TensorRef(str(r.path), key, name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (the model's key), in the model's dtype (float32), checked finite."""
        r, key = self._map[name]
        return _checked(r.get(key).to(self.stored[name].dtype), self.folder, name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor ``name`` (dim 0), float32, checked finite; only those
        rows are read from the file."""
        r, key = self._map[name]
        return _checked(r.get_rows(key, start, stop).to(self.stored[name].dtype), self.folder, name)

    def gather_rows(self, name: str, rows: torch.Tensor, chunk_bytes: int = 32 << 20) -> torch.Tensor:
        """``tensor[rows]`` for sorted unique row indices ``rows: (n,)`` (int64), without the whole
        tensor in memory: read in chunks of about ``chunk_bytes``, each spanning only rows in use.
        Returns ``(n, *rest)`` float32 (the same values as ``get(name)[rows]``)."""
        info = self.stored[name]
        rows = rows.to(torch.int64)
        out = torch.empty((len(rows), *info.shape[1:]), dtype=info.dtype)
        per = max(1, chunk_bytes // max(1, info.nbytes // max(1, info.shape[0])))
        i = 0
        while i < len(rows):
            start = int(rows[i])
            j = int(torch.searchsorted(rows, start + per))  # rows[i:j] lie in [start, start + per)
            stop = int(rows[j - 1]) + 1
            out[i:j] = self.get_rows(name, start, stop)[rows[i:j] - start]
            i = j
        return out

    def load_module(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu",
                    skip: frozenset[str] = frozenset()) -> nn.Module:
        """Give ``module`` (the submodule at ``prefix``) its stored weights on ``device``, each read
        straight into its own parameter (no second copy on the CPU).  Tensors the files do not hold
        (a tied alias, a non-persistent buffer) are left as they are, and so are the full names in
        ``skip`` (read later, e.g. a streamed GPTQ's Linear weights, by rows at their turn)."""
        for mname, sub in module.named_modules():
            base = ".".join(x for x in (prefix, mname) if x)
            for pname, p in list(sub._parameters.items()):
                full = f"{base}.{pname}" if base else pname
                if p is not None and full in self._map and full not in skip:
                    sub._parameters[pname] = nn.Parameter(self.get(full).to(device), requires_grad=p.requires_grad)
            for bname, b in list(sub._buffers.items()):
                full = f"{base}.{bname}" if base else bname
                if b is not None and full in self._map:
                    sub._buffers[bname] = self.get(full).to(device)
        return module

    def release(self, module: nn.Module) -> None:
        """Drop a materialised module's memory (back to the meta device) and hand freed heap
        pages back to the system (:func:`trim_heap`)."""
        module.to(device="meta")
        trim_heap()

    def load_outside_blocks(self, device: torch.device | str = "cpu", skip: frozenset[str] = frozenset()) -> nn.Module:
        """Materialise everything but the transformer blocks (token table, final norm, rotary
        tables; a tied head stays the token table): what a forward pass needs to reach block 0.
        Modules named in ``skip`` (e.g. the token table, read by rows instead) stay on the meta
        device.  Returns the model."""
        blocks_attr = self.fam.blocks_attr
        for name, mod in self.model.named_modules():
            if name == blocks_attr or name.startswith(blocks_attr + "."):
                continue
            meta_buffers = [b for b in mod._buffers.values() if b is not None and b.is_meta]
            if meta_buffers and "Rotary" in type(mod).__name__:
                self._rebuild_rotary(name, device)  # non-persistent tables, computed from the config
        for name, mod in self.model.named_children():
            self._load_outside(mod, name, blocks_attr, device, skip)
        if tied_keys(self.model):
            self.model.tie_weights()
        return self.model

    def _load_outside(self, mod: nn.Module, prefix: str, blocks_attr: str, device, skip=frozenset()) -> None:
        if prefix == blocks_attr or prefix in skip:
            return
        if not blocks_attr.startswith(prefix + "."):
            self.load_module(mod, prefix, device)
            return
        for name, child in mod.named_children():
            self._load_outside(child, f"{prefix}.{name}", blocks_attr, device, skip)
        for name, p in mod.named_parameters(recurse=False):
            if f"{prefix}.{name}" in self._map:
                mod._parameters[name] = nn.Parameter(self.get(f"{prefix}.{name}").to(device),
                                                     requires_grad=p.requires_grad)

    def _rebuild_rotary(self, prefix: str, device) -> None:
        parent_name, _, attr = prefix.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, attr)
        setattr(parent, attr, type(old)(config=self.model.config).to(device))


def open_source(folder: str | Path) -> LazySource | None:
    """A :class:`LazySource` of a safetensors model folder, or None where streaming does not
    apply (a GGUF folder, ``*.bin`` weights, keys the model does not name)."""
    folder = Path(folder)
    if not folder.is_dir() or gguf_file(folder) is not None or not (folder / "config.json").is_file():
        return None
    if not _weight_files(folder):
        return None
    try:
        return LazySource(folder)
    except BadInput as exc:
        if "weights missing" in str(exc):  # e.g. legacy key names: transformers' loader maps them
            return None
        raise
