"""Read an X-LoRA folder (Buehler & Buehler 2024, peft's ``XLORA``) for a routed export.

X-LoRA mixes LoRA experts per token: a first pass of the base model gives the last hidden state
``h`` (B, T, H); a classifier (``xlora_depth`` Linears with ReLU between, dropout off) maps it to
logits (B, T, C) — or (B, T, L·C) with ``layerwise_scalings`` — that become scalings
``s = softmax(logits / τ)`` (``enable_softmax``), optionally kept to the ``top_k_lora`` largest per
layer (``enable_softmax_topk``: renormalised by a softmax over those); the second pass adds, on
each adapted Linear ℓ, ``Σ_k s[b, t, ℓ, k] · g · s_k · B_k A_k x`` (g = ``global_scaling_weight``,
``s_k`` the expert's LoRA scale).  ℓ numbers the adapted Linears in module order.

What peft 0.21.2 writes with ``save_pretrained`` does not hold the classifier (none of it at depth
1, only its last Linear at depth ≥ 2) and its expert subfolders miss expert tensors, so the folder
alone does not determine the model.  The contract here: the folder's ``adapter_config.json``
(peft's own), the experts' LoRA folders its ``adapters`` names (absolute, or relative to the
folder), and the classifier saved with one call beside it::

    from safetensors.torch import save_file
    save_file({k: v for k, v in xlora_model.state_dict().items() if "internal_xlora_classifier" in k},
              f"{folder}/xlora_classifier.safetensors")

``scaling_pass_value`` v: peft's first (scaling) pass runs every adapted Linear with dummy
scalings all equal to v, through the same top-k / softmax-top-k step as the routed pass
(``XLoraLayer.get_maybe_topk_scalings``), so each expert k adds ``d · g · s_k B_k A_k x`` with
``d = v`` (``d = 1/C`` under ``enable_softmax_topk``: a softmax over C equal values; ``d = 0`` when
v = 0, peft's default: the first pass is then the base model).  With ``top_k_lora`` k < C and
v ≠ 0 the pass keeps k of C *equal* values in ``torch.topk``'s tie order, which torch does not
specify: refused by name.  Experts are plain LoRA (no DoRA, bias or embedding targets); anything
else is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BadInput, Unsupported
from .base import CONFIG, number, read_config

CLASSIFIER = "xlora_classifier.safetensors"
ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # a LLaMA-family block's Linears, in module order
FIELDS = {"peft_type", "task_type", "hidden_size", "adapters", "enable_softmax", "enable_softmax_topk",
          "layerwise_scalings", "xlora_depth", "xlora_size", "xlora_dropout_p", "use_trainable_adapters",
          "softmax_temperature", "top_k_lora", "scaling_pass_value", "global_scaling_weight",
          "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}
SAVE_HINT = ("save it with save_file({k: v for k, v in model.state_dict().items() if 'internal_xlora_classifier' "
             f"in k}}, '<folder>/{CLASSIFIER}') (peft's save_pretrained leaves it out)")


@dataclass
class XLora:
    """A read X-LoRA: experts' factors per matrix (``b`` scaled by the expert's LoRA scale and
    ``global_scaling_weight``, shape (N, r_k); ``a`` (r_k, K); None where an expert does not
    touch the matrix), the layer number of each adapted matrix, and the classifier."""

    path: Path
    experts: list[str]
    factors: dict[str, list[tuple[np.ndarray, np.ndarray] | None]]
    layer: dict[str, int]
    classifier: list[tuple[np.ndarray, np.ndarray]]  # (W (out, in), b (out,)) per Linear
    softmax: bool
    temperature: float
    layerwise: bool
    top_k: int | None
    softmax_topk: bool
    scaling_pass: float = 0.0  # d: each expert's weight in the scaling pass (module docstring)


def is_xlora(folder) -> bool:
    try:
        return str(read_config(Path(folder)).get("peft_type", "")).upper() == "XLORA"
    except BadInput:
        return False


def _order_key(name: str) -> tuple[int, int]:
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    if m is None or m[2] not in ORDER:
        raise Unsupported(f"X-LoRA expert target {name!r} is not a LLaMA-family block Linear "
                          f"({', '.join(ORDER)})")
    return int(m[1]), ORDER.index(m[2])


def _expert_folder(folder: Path, value) -> Path:
    p = Path(str(value))
    for cand in (p, folder / p, folder / p.name):
        if (cand / CONFIG).is_file():
            return cand
    raise BadInput(f"{folder / CONFIG}: expert folder {str(value)!r} not found (absolute, or relative to {folder})")


def read_xlora(folder, targets) -> XLora:
    """The X-LoRA at ``folder`` for a checkpoint whose Linears are ``targets`` (names)."""
    from safetensors.numpy import load_file

    from .fold import resolve_target
    from .read import read_adapter

    folder = Path(folder)
    cfg = read_config(folder)
    for key in sorted(cfg):
        if key not in FIELDS:
            raise Unsupported(f"{folder / CONFIG}: unknown field {key!r} for XLORA; refusing to guess what it does")
    pass_value = number(cfg, "scaling_pass_value", 0.0, folder)
    if cfg.get("use_trainable_adapters"):
        raise Unsupported(f"{folder / CONFIG}: use_trainable_adapters=true: the trained experts live only in "
                          "peft's incomplete expert subfolders")
    adapters = cfg.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise BadInput(f"{folder / CONFIG}: 'adapters' must map expert names to LoRA folders")
    weight = number(cfg, "global_scaling_weight", 1.0, folder)
    names = list(adapters)
    factors: dict[str, list] = {}
    for k, name in enumerate(names):
        ad = read_adapter(_expert_folder(folder, adapters[name]))
        if ad.peft_type != "LORA" or ad.biases:
            raise Unsupported(f"{ad.path}: an X-LoRA expert must be a plain LoRA adapter")
        for module, d in ad.deltas.items():
            if d.kind != "linear" or any(getattr(d, e) is not None for e in ("input_scale", "magnitude", "bias_add",
                                                                            "output_scale")):
                raise Unsupported(f"{ad.path}: {module}: X-LoRA experts are plain LoRA on Linears (no DoRA, bias, embedding)")
            target = resolve_target(module, targets)
            if target is None:
                raise BadInput(f"{ad.path}: target {module!r} is not a matrix of the checkpoint")
            factors.setdefault(target, [None] * len(names))[k] = (d.b * weight, d.a)
    layer = {n: i for i, n in enumerate(sorted(factors, key=_order_key))}

    path = folder / CLASSIFIER
    if not path.is_file():
        raise Unsupported(f"{folder}: no {CLASSIFIER}: the X-LoRA classifier is needed; {SAVE_HINT}")
    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise BadInput(f"{path}: corrupt safetensors file ({exc})") from exc
    found = {}
    for key, arr in raw.items():
        m = re.search(r"internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)$", key)
        if m is None:
            raise BadInput(f"{path}: tensor {key!r} is not an X-LoRA classifier parameter")
        found.setdefault(int(m[1]), {})[m[2]] = arr.astype(np.float64)
    depth = int(number(cfg, "xlora_depth", 1, folder, int))
    if len(found) != depth or any(set(v) != {"weight", "bias"} for v in found.values()):
        raise BadInput(f"{path}: expected {depth} Linear layers (weight and bias), found {sorted(found)}")
    classifier = [(found[i]["weight"], found[i]["bias"]) for i in sorted(found)]
    layerwise = bool(cfg.get("layerwise_scalings", False))
    want = len(names) * (len(layer) if layerwise else 1)
    if classifier[-1][0].shape[0] != want:
        raise BadInput(f"{path}: the classifier gives {classifier[-1][0].shape[0]} scalings, expected {want}")
    top_k = cfg.get("top_k_lora")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= len(names)):
        raise BadInput(f"{folder / CONFIG}: top_k_lora must be in 1..{len(names)}, not {top_k!r}")
    softmax_topk = bool(cfg.get("enable_softmax_topk", False))
    if pass_value != 0.0 and top_k is not None and top_k < len(names):
        raise Unsupported(f"{folder / CONFIG}: scaling_pass_value={pass_value:g} with top_k_lora={top_k} < {len(names)} "
                          "experts: peft's scaling pass keeps top_k of equal dummy scalings in torch.topk's unspecified "
                          "tie order; refusing to guess which experts it runs")
    scaling_pass = 0.0 if pass_value == 0.0 else (1.0 / len(names) if softmax_topk else pass_value)
    temperature = number(cfg, "softmax_temperature", 1.0, folder)
    if not temperature > 0:
        raise BadInput(f"{folder / CONFIG}: softmax_temperature must be positive, not {temperature!r}")
    return XLora(folder, names, factors, layer, classifier, bool(cfg.get("enable_softmax", True)),
                 temperature, layerwise, top_k, softmax_topk, scaling_pass)
