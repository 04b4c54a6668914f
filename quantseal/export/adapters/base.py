"""What every PEFT adapter kind shares: the folder, its tensors, the per-matrix edit it makes.

An adapter changes a Linear ``y = x · Wᵀ + β`` (``W: (N, K)`` out × in) by a composition of a few
exact edits, applied in this order (each kind's module says which it uses and why):

1. ``input_scale``  l (K,):  x ↦ x ⊙ l                     (IA³ on a feed-forward layer)
2. ``b · a``        (N, r)·(r, K):  W ↦ W + b a            (every low-rank kind, already scaled;
                    LoKr also offers ``kron = (W1, W2)`` with ``b a = W1 ⊗ W2``, stored so when smaller)
3. ``magnitude``    m (N,):  y ↦ m ⊙ (x Wᵀ) / ‖W‖_row + β   (DoRA: W is the matrix after step 2)
4. ``bias_add``     δ (N,):  β ↦ β + δ                      (LoRA with ``lora_bias``)
5. ``output_scale`` l (N,):  y ↦ l ⊙ y, bias included       (IA³ on any other layer)

A token embedding (``kind="embedding"``) takes step 2 only.  Kinds register a reader in
:data:`READERS` with :func:`register` (PEFT ``peft_type`` → function): adding a kind touches one
place.  A reader gets the folder, its config (already checked against the kind's allow-list in
:mod:`.fields`) and its tensors grouped by module, and returns one :class:`MatrixDelta` per module.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...errors import BadInput, Unsupported

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class MatrixDelta:
    """One matrix's edit (see the module docstring), float64, in the checkpoint's orientation.

    module: module path inside the adapted model (PEFT prefix removed)
    shape:  (N, K) of the matrix (out, in), or (V, H) of an embedding
    b, a:   (N, r) already scaled, and (r, K); None when the kind adds no low-rank term
    """

    module: str
    shape: tuple[int, int]
    kind: str = "linear"
    b: np.ndarray | None = None
    a: np.ndarray | None = None
    scale: float = 1.0
    input_scale: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    bias_add: np.ndarray | None = None
    output_scale: np.ndarray | None = None
    kron: tuple[np.ndarray, np.ndarray] | None = None  # LoKr's (s·W1, W2): stored as K1 ⊗ K2 when smaller
    stored_as: str = ""  # set by the fold: "kronecker" when ``kron`` was stored as is

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])


LowRankDelta = MatrixDelta  # the name before DoRA / IA³ (a pure ``b · a``)


@dataclass
class Adapter:
    """A read adapter folder: its config summary, one edit per adapted module, and the base
    biases it replaces (``bias="lora_only"`` / ``"all"``: tensor path → (N,) array)."""

    path: Path
    peft_type: str
    r: int
    alpha: float
    use_rslora: bool
    deltas: dict[str, MatrixDelta]
    sha256: str
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    resolve: Callable[[dict[str, tuple[int, int]]], None] | None = None  # fills deltas once shapes are known


# a reader returns the deltas, or (deltas, resolve) when some need the target's (N, K) first
Reader = Callable[[Path, dict, "Tensors"], "dict[str, MatrixDelta] | tuple"]
READERS: dict[str, Reader] = {}
PARAMS: dict[str, tuple[str, ...]] = {}  # peft_type → the parameter names of its layers


def register(peft_type: str, params: tuple[str, ...]):
    """Decorator: ``@register("LORA", ("lora_A", "lora_B"))`` makes the function the reader of
    that ``peft_type``; ``params`` are the per-module tensor names it consumes."""
    def wrap(fn: Reader) -> Reader:
        READERS[peft_type] = fn
        PARAMS[peft_type] = params
        return fn
    return wrap


# ----------------------------------------------------------------------------- the folder
def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise BadInput(f"{folder}: no such adapter folder")
    path = folder / CONFIG
    if not path.is_file():
        raise BadInput(f"{folder}: not a PEFT adapter folder (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return cfg


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise Unsupported(f"{folder}: adapter_model.bin (pickle) is not read; save the adapter with "
                              "safe_serialization=True (adapter_model.safetensors)")
        raise BadInput(f"{folder}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{path}: corrupt safetensors file ({exc})") from exc
    return tensors, hashlib.sha256(path.read_bytes()).hexdigest()


def strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


class Tensors:
    """An adapter's tensors grouped by module: ``tensors[module][param]`` (float64 numpy), where
    ``param`` is a layer parameter name with an optional ``.bias`` (``lora_B.bias``).  Keys that are
    not one of the kind's parameters stay in ``rest`` (full tensor name → float64 array)."""

    def __init__(self, folder: Path, raw: dict[str, torch.Tensor], params: tuple[str, ...]):
        self.where = folder / WEIGHTS
        self.modules: dict[str, dict[str, np.ndarray]] = {}
        self.rest: dict[str, np.ndarray] = {}
        pattern = re.compile(rf"^(?P<module>.+)\.(?P<param>{'|'.join(map(re.escape, params))})"
                             r"(?P<suffix>\.weight|\.bias)?$")
        for key, t in raw.items():
            arr = t.double().numpy()
            if not np.isfinite(arr).all():
                raise BadInput(f"{self.where}: {key}: non-finite values")
            m = pattern.match(key) if params else None
            if m is None:
                self.rest[key] = arr
                continue
            param = m["param"] + (".bias" if m["suffix"] == ".bias" else "")
            group = self.modules.setdefault(strip_prefix(m["module"]), {})
            if param in group:
                raise BadInput(f"{self.where}: two {param} tensors for {m['module']} (several adapter names?)")
            group[param] = arr

    def need(self, module: str, param: str, ndim: int) -> np.ndarray:
        arr = self.modules[module].get(param)
        if arr is None:
            raise BadInput(f"{self.where}: {module} lacks {param} (found {sorted(self.modules[module])})")
        if arr.ndim != ndim:
            raise BadInput(f"{self.where}: {module}.{param} has shape {list(arr.shape)}, expected {ndim} dimensions")
        return arr


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def number(cfg: dict, key: str, default, where: Path, kind=float):
    try:
        return kind(cfg.get(key, default) if cfg.get(key) is not None else default)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where / CONFIG}: '{key}' must be a number, not {cfg.get(key)!r}") from exc


def base_biases(folder: Path, cfg: dict, tensors: Tensors) -> dict[str, np.ndarray]:
    """``bias="lora_only"`` / ``"all"``: PEFT saves the trained base biases beside the adapter
    (``<module>[.base_layer].bias``); they replace the checkpoint's, exactly.  Any other leftover
    tensor is a full module (``modules_to_save``) or unknown: refused, naming it."""
    out = {}
    for key, arr in tensors.rest.items():
        if key.endswith(".bias") and cfg.get("bias", "none") in ("lora_only", "all"):
            out[strip_prefix(key).replace(".base_layer.", ".")] = arr
            continue
        if key.endswith(".bias"):
            raise Unsupported(f"{folder / WEIGHTS}: tensor {key!r} is a base bias, but the config's bias is "
                              f"{cfg.get('bias', 'none')!r}")
        raise Unsupported(f"{folder / WEIGHTS}: tensor {key!r} is not a {cfg.get('peft_type')} parameter "
                          "(modules_to_save and other full-module weights cannot be folded into a low-rank branch)")
    return out
