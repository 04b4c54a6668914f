"""Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) into an
:class:`~.base.Adapter`: config allow-list (:mod:`.fields`), the kind's reader from
:data:`~.base.READERS`, and the base biases of ``bias="lora_only"/"all"``."""

from __future__ import annotations

from pathlib import Path

from ...errors import Unsupported
from .base import PARAMS, READERS, Adapter, Tensors, base_biases, read_config, read_weights
from .fields import check_fields


def read_adapter(folder: str | Path) -> Adapter:
    folder = Path(folder)
    cfg = read_config(folder)
    kind = str(cfg.get("peft_type", "")).upper()
    reader = READERS.get(kind)
    if kind == "XLORA":
        raise Unsupported(f"{folder}: peft_type 'XLORA' routes its experts per token (no fold): export it alone "
                          "(one --adapter) from a LLaMA-family decoder checkpoint, with the classifier saved beside "
                          "it as xlora_classifier.safetensors (peft 0.21.2's save_pretrained leaves it out)")
    if reader is None:
        raise Unsupported(f"{folder}: peft_type {cfg.get('peft_type')!r} cannot be folded; supported: {sorted(READERS)}")
    check_fields(folder, cfg)
    raw, digest = read_weights(folder)
    tensors = Tensors(folder, raw, PARAMS[kind])
    got = reader(folder, cfg, tensors)
    deltas, resolve = got if isinstance(got, tuple) else (got, None)
    biases = base_biases(folder, cfg, tensors)
    if not deltas:
        raise Unsupported(f"{folder}: holds no {kind} tensors to fold")
    r = cfg.get("r", 0)
    alpha = cfg.get("lora_alpha", cfg.get("alpha", r))
    return Adapter(folder, kind, int(r or 0), float(alpha or 0), bool(cfg.get("use_rslora", False)), deltas, digest,
                   biases, resolve)
