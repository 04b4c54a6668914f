"""Read a suspect encoder ONNX file whatever a thief made of it (issue 14, part 3).

The watermark statistic is defined on the model's sentence embedding: mean pooling of the token
states over the attention mask, then L2 normalisation (all-MiniLM-L6-v2's sentence-transformers
configuration, the one quantseal's export bakes in and the board is trained against).  A stolen
encoder may come as

* quantseal's own export, or any file with a sentence-embedding output (B, H): read directly;
* a plain ``torch.onnx.export`` / optimum export of the transformer body: token states
  ``last_hidden_state`` (B, T, H), often with ``pooler_output`` (B, H) beside them, and any output
  names (``'h'``): the token states are pooled here by the pooling configuration;
* float16 weights or outputs, or int8 weights (onnxruntime ``quantize_dynamic``): outputs are
  read as float64 whatever their type, inputs are cast to the types the file declares.

Output choice: ``sentence_embedding`` if present; else the token-state output (rank 3; named
``last_hidden_state`` first), pooled; else the only (or first) rank-2 float output.  A
``pooler_output`` (the CLS token through a tanh layer) is *not* the sentence embedding of a
mean-pooled model, so token states win over it.

Inputs are matched by name (``input_ids``, ``attention_mask``, ``token_type_ids``, or names that
contain ``mask`` / ``type`` / ``segment`` / ``ids``), otherwise by position in that order.  A
switchable export's ``adapter_id`` (``export --switchable``) is fed the adapter asked for
(``verify --adapter NAME``), by default 0: the base model.

Pooling configuration (``pooling``): ``{"mode": "mean" | "cls" | "max", "normalize": bool}``;
:func:`pooling_config` reads it from a sentence-transformers folder (``1_Pooling/config.json``,
``modules.json``) where one is given, else mean + L2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BadInput

ROLES = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_POOLING = {"mode": "mean", "normalize": True}
_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def pooling_config(folder: str | Path | None = None, manifest: dict | None = None) -> dict:
    """The pooling to apply to token states: ``manifest["pooling"]`` if given, else a
    sentence-transformers ``1_Pooling/config.json`` (+ a ``Normalize`` module in ``modules.json``)
    in ``folder``, else mean + L2 (:data:`DEFAULT_POOLING`)."""
    if manifest and isinstance(manifest.get("pooling"), dict):
        return _checked({**DEFAULT_POOLING, **manifest["pooling"]})
    if folder is not None:
        f = Path(folder) / "1_Pooling" / "config.json"
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
                mods = Path(folder) / "modules.json"
                normalize = mods.is_file() and any("Normalize" in str(m.get("type", ""))
                                                   for m in json.loads(mods.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise BadInput(f"{f}: not a valid pooling configuration ({type(exc).__name__})") from exc
            mode = ("cls" if d.get("pooling_mode_cls_token") else "max" if d.get("pooling_mode_max_tokens")
                    else "mean")
            return _checked({"mode": mode, "normalize": bool(normalize)})
    return dict(DEFAULT_POOLING)


def _checked(p: dict) -> dict:
    if p.get("mode") not in ("mean", "cls", "max") or not isinstance(p.get("normalize"), bool):
        raise BadInput(f"unknown pooling {p!r} (mode mean|cls|max, normalize true|false)")
    return {"mode": p["mode"], "normalize": p["normalize"]}


def pool(states: np.ndarray, mask: np.ndarray, pooling: dict = DEFAULT_POOLING) -> np.ndarray:
    """Sentence embeddings float64 (B, H) from token states (B, T, H) and the mask (B, T)."""
    h = np.asarray(states, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)[..., None]
    if pooling["mode"] == "mean":
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif pooling["mode"] == "cls":
        e = h[:, 0]
    else:
        e = np.where(m > 0, h, -np.inf).max(1)
    if pooling["normalize"]:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e


def _input_roles(inputs) -> dict[str, str]:
    """Model input name → role in :data:`ROLES` (by name, then by position)."""
    roles: dict[str, str] = {}
    for i in inputs:
        low = i.name.lower()
        role = (i.name if i.name in ROLES else "attention_mask" if "mask" in low
                else "token_type_ids" if ("type" in low or "segment" in low) else
                "input_ids" if "ids" in low else None)
        if role and role not in roles.values():
            roles[i.name] = role
    free = [r for r in ROLES if r not in roles.values()]
    for i in inputs:
        if i.name not in roles:
            if not free:
                raise BadInput(f"cannot tell what input {i.name!r} of the suspect is")
            roles[i.name] = free.pop(0)
    return roles


def _choose_output(outputs) -> tuple[str, str]:
    """(name, 'embedding' | 'states' | 'unknown')."""
    names = [o.name for o in outputs]
    if "sentence_embedding" in names:
        return "sentence_embedding", "embedding"
    floats = [o for o in outputs if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")]
    rank = {o.name: (len(o.shape) if isinstance(o.shape, (list, tuple)) else None) for o in floats}
    states = [o.name for o in floats if rank[o.name] == 3]
    if states:
        return ("last_hidden_state" if "last_hidden_state" in states else states[0]), "states"
    flat = [o.name for o in floats if rank[o.name] == 2]
    if flat:
        return flat[0], "embedding"
    if floats:
        return floats[0].name, "unknown"
    raise BadInput(f"not an embedding model (no float output among {names})")


def suspect_adapter_feed(sess, adapter: str | None, where) -> dict[str, np.ndarray]:
    """``{"adapter_id": id}`` for a switchable suspect (``adapter``: a name from its
    ``quantseal.adapters`` metadata or an integer id; None: 0, the base model), ``{}`` otherwise."""
    from .pipelines import ADAPTER_INPUT, adapter_ids, is_switchable, resolve_adapter

    if not is_switchable(sess):
        if adapter is not None:
            raise BadInput(f"{where}: has no adapter_id input (not a switchable export); cannot select adapter {adapter!r}")
        return {}
    names = adapter_ids(sess.metadata)
    pick = int(adapter) if adapter is not None and str(adapter).isdigit() else adapter
    if isinstance(pick, int) and not names:
        return {ADAPTER_INPUT: np.array(pick, dtype=np.int64)}  # no names recorded: trust the id
    return {ADAPTER_INPUT: np.array(resolve_adapter(names, 0, pick, where), dtype=np.int64)}


def suspect_embed_fn(model_path, provider: str = "auto", threads: int | None = None, pooling: dict | None = None,
                     adapter: str | None = None):
    """A token-batch ``embed_fn`` (dict of int64 ``input_ids`` / ``attention_mask`` /
    ``token_type_ids`` (B, T) → float64 (B, H)) over any encoder ONNX file (module docstring).
    ``adapter``: the branch of a switchable export to read (name or id; None: the base)."""
    from .pipelines import ADAPTER_INPUT
    from .session import Session

    pooling = _checked({**DEFAULT_POOLING, **(pooling or {})})
    sess = Session(model_path, provider=provider, threads=threads)
    ort_sess = sess._sess
    fixed = suspect_adapter_feed(sess, adapter, model_path)
    roles = _input_roles([i for i in ort_sess.get_inputs() if i.name != ADAPTER_INPUT])
    types = {i.name: _ORT_INT.get(i.type, np.int64) for i in ort_sess.get_inputs()}
    name, kind = _choose_output(ort_sess.get_outputs())

    def embed(batch: dict[str, np.ndarray]) -> np.ndarray:
        mask = np.asarray(batch["attention_mask"])
        feeds = dict(fixed)
        for n, role in roles.items():
            v = batch.get(role)
            if v is None:
                v = np.zeros_like(np.asarray(batch["input_ids"]))
            feeds[n] = np.asarray(v).astype(types[n])
        try:
            out = ort_sess.run([name], feeds)[0]
        except Exception as exc:  # a file that does not run on these inputs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{model_path}: the suspect does not run on token batches ({first[:200]})") from exc
        out = np.asarray(out, dtype=np.float64)
        if out.ndim == 3 and kind != "embedding":
            return pool(out, mask, pooling)
        if out.ndim == 2:
            return out
        raise BadInput(f"{model_path}: not an embedding model (output {name!r} has shape {out.shape})")

    return embed
