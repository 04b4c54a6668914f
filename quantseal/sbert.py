"""sentence-transformers conventions of a model folder: truncation length, pooling, normalisation.

A sentence-transformers model folder says how a text becomes one vector in three JSON files:

* ``modules.json``: the module chain, e.g. ``Transformer`` (path ``""``) → ``Pooling``
  (``1_Pooling``) → ``Normalize`` (``2_Normalize``);
* ``sentence_bert_config.json`` in the Transformer's folder: ``max_seq_length`` (the truncation
  length, special tokens included: 256 for all-MiniLM-L6-v2) and ``do_lower_case``;
* ``<Pooling path>/config.json``: the pooling mode, as legacy booleans
  (``pooling_mode_mean_tokens: true``) or as ``pooling_mode: "mean"`` (a list concatenates).

Without ``modules.json`` sentence-transformers loads a plain Hugging Face folder as
``Transformer`` + mean ``Pooling`` with ``max_seq_length = min(tokenizer model_max_length,
max_position_embeddings)``; quantseal adds its historical L2 normalisation there (cosines are
unchanged by it).  The export bakes pooling and normalisation into the graph and records all of it
in the file's ``quantseal.*`` metadata, which the runtime reads (:meth:`Conventions.from_metadata`).

Below all three rooms (like :mod:`quantseal.keys`): json only, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, Unsupported

MODULES = "modules.json"
SBERT_CONFIG = "sentence_bert_config.json"
POOLING_CONFIG = "config.json"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")  # the ones the exporter bakes into the graph
_LEGACY_KEYS = {  # sentence-transformers' order, which is the concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
FALLBACK_MAX_LENGTH = 128  # files exported before the conventions were recorded truncated here

# metadata keys of an exported encoder
META_POOLING = "quantseal.pooling"
META_MAX_LENGTH = "quantseal.max_seq_length"
META_LOWER = "quantseal.do_lower_case"
META_MAX_POSITIONS = "quantseal.max_position_embeddings"
META_CONVENTIONS = "quantseal.conventions"


@dataclass(frozen=True)
class Conventions:
    """How token states become a sentence embedding.

    ``pooling``: modes concatenated in order (each (B, H) → (B, H·len(pooling)));
    ``normalize``: L2 normalisation after pooling; ``max_seq_length``: truncation length in tokens,
    special tokens included; ``do_lower_case``: lowercase the text before tokenising;
    ``max_positions``: the model's ``max_position_embeddings`` (an upper bound for any length);
    ``source``: ``"sentence-transformers"`` (read from its files) or ``"default"``."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int = FALLBACK_MAX_LENGTH
    do_lower_case: bool = False
    max_positions: int | None = None
    source: str = "default"

    def __post_init__(self):
        if not self.pooling or any(m not in POOLING_MODES for m in self.pooling):
            raise Unsupported(f"pooling {list(self.pooling)}: supported modes are {', '.join(POOLING_MODES)}")
        if self.max_seq_length < 1:
            raise BadInput(f"max_seq_length must be at least 1, not {self.max_seq_length}")

    @property
    def pooling_name(self) -> str:
        """``"mean+l2"``, ``"cls"``, ``"cls,max+l2"``: what ``quantseal.pooling`` says."""
        return ",".join(self.pooling) + ("+l2" if self.normalize else "")

    def metadata(self) -> dict[str, str]:
        out = {META_POOLING: self.pooling_name, META_MAX_LENGTH: str(self.max_seq_length),
               META_LOWER: "true" if self.do_lower_case else "false", META_CONVENTIONS: self.source}
        if self.max_positions is not None:
            out[META_MAX_POSITIONS] = str(self.max_positions)
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Conventions":
        """The conventions an exported file records; a file from before they were recorded: mean +
        L2 (what every such export baked in) truncated at :data:`FALLBACK_MAX_LENGTH`."""
        name = meta.get(META_POOLING, "mean+l2")
        modes, _, norm = name.partition("+")
        try:
            return cls(pooling=tuple(modes.split(",")), normalize=norm == "l2",
                       max_seq_length=int(meta.get(META_MAX_LENGTH, FALLBACK_MAX_LENGTH)),
                       do_lower_case=meta.get(META_LOWER, "false") == "true",
                       max_positions=int(meta[META_MAX_POSITIONS]) if META_MAX_POSITIONS in meta else None,
                       source=meta.get(META_CONVENTIONS, "legacy"))
        except ValueError as exc:
            raise BadInput(f"unreadable quantseal conventions metadata ({exc})") from exc


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from exc


def _modules(folder: Path) -> list[dict] | None:
    path = folder / MODULES
    if not path.is_file():
        return None
    mods = _read_json(path)
    if not isinstance(mods, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in mods):
        raise BadInput(f"{path}: expected a list of {{'type': ..., 'path': ...}} entries")
    return mods


def _module_dir(module: dict, where: Path) -> Path:
    """A module's folder relative to the model folder; never outside it."""
    rel = Path(str(module.get("path") or ""))
    if rel.is_absolute() or ".." in rel.parts:
        raise BadInput(f"{where}: module path {str(rel)!r} points outside the model folder")
    return rel


def _short_type(module: dict) -> str:
    return module["type"].rsplit(".", 1)[-1]


def pooling_modes(config: dict, where: str = "pooling config") -> tuple[str, ...]:
    """The pooling modes of a ``Pooling`` module's ``config.json`` (either spelling)."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(v for k, v in _LEGACY_KEYS.items() if config.get(k))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if not modes:
        raise BadInput(f"{where}: no pooling mode set")
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise Unsupported(f"{where}: pooling mode {bad[0]!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise Unsupported(f"{where}: include_prompt=false (prompt tokens excluded from pooling) is not supported")
    return modes


def convention_files(folder: str | Path) -> list[str]:
    """Relative paths of the sentence-transformers files present in ``folder``: ``modules.json``,
    each module's ``sentence_bert_config.json`` / ``config.json``.  What a checkpoint copies."""
    folder = Path(folder)
    mods = _modules(folder)
    if mods is None:
        return [SBERT_CONFIG] if (folder / SBERT_CONFIG).is_file() else []
    out = [MODULES]
    for m in mods:
        for name in (SBERT_CONFIG, POOLING_CONFIG):
            rel = (_module_dir(m, folder / MODULES) / name).as_posix()
            if rel == POOLING_CONFIG:  # the root config.json is the model's own, copied anyway
                continue
            if rel not in out and (folder / rel).is_file():
                out.append(rel)
    return out


def _default_length(folder: Path, config: dict) -> int:
    """sentence-transformers' rule without a ``max_seq_length``: the tokenizer's
    ``model_max_length`` capped at ``max_position_embeddings``."""
    lengths = []
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        v = _read_json(tc).get("model_max_length")
        if isinstance(v, (int, float)) and 0 < v < 1e9:  # transformers writes 1e30 for "no limit"
            lengths.append(int(v))
    if isinstance(config.get("max_position_embeddings"), int) and config["max_position_embeddings"] > 0:
        lengths.append(config["max_position_embeddings"])
    return min(lengths) if lengths else FALLBACK_MAX_LENGTH


def read_conventions(folder: str | Path, config: dict | None = None) -> Conventions:
    """The conventions of a model (or checkpoint) folder.  ``config``: its ``config.json`` dict
    (read from ``folder`` when None).  A module other than Transformer / Pooling / Normalize (e.g.
    ``Dense``) changes the embedding in a way the export does not reproduce: :class:`Unsupported`."""
    folder = Path(folder)
    if config is None:
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    max_pos = config.get("max_position_embeddings") if isinstance(config.get("max_position_embeddings"), int) else None
    mods = _modules(folder)
    if mods is None:
        sb = _read_json(folder / SBERT_CONFIG) if (folder / SBERT_CONFIG).is_file() else {}
        length = sb.get("max_seq_length") or _default_length(folder, config)
        return Conventions(max_seq_length=int(length), do_lower_case=bool(sb.get("do_lower_case", False)),
                           max_positions=max_pos, source="sentence-transformers" if sb else "default")
    kinds = [_short_type(m) for m in mods]
    extra = [k for k in kinds if k not in _KNOWN_MODULES]
    if extra or kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
        what = extra[0] if extra else " → ".join(kinds)
        raise Unsupported(f"{folder / MODULES}: module {what!r} is not supported (an encoder export bakes in "
                          f"Transformer → Pooling → Normalize only)")
    transformer = _module_dir(mods[0], folder / MODULES)
    sb_path = folder / transformer / SBERT_CONFIG
    sb = _read_json(sb_path) if sb_path.is_file() else {}
    length = sb.get("max_seq_length") or _default_length(folder, config)
    pool = [m for m in mods if _short_type(m) == "Pooling"]
    if len(pool) > 1:
        raise Unsupported(f"{folder / MODULES}: several Pooling modules")
    if pool:
        pool_cfg = folder / _module_dir(pool[0], folder / MODULES) / POOLING_CONFIG
        modes = pooling_modes(_read_json(pool_cfg), str(pool_cfg)) if pool_cfg.is_file() else ("mean",)
    else:
        raise Unsupported(f"{folder / MODULES}: no Pooling module (token embeddings out) is not supported")
    normalize = "Normalize" in kinds
    if normalize and kinds.index("Normalize") < kinds.index("Pooling"):
        raise Unsupported(f"{folder / MODULES}: Normalize before Pooling is not supported")
    return Conventions(pooling=modes, normalize=normalize, max_seq_length=int(length),
                       do_lower_case=bool(sb.get("do_lower_case", False)), max_positions=max_pos,
                       source="sentence-transformers")
