"""The allow-list of ``adapter_config.json`` fields: a fold is only as exact as our reading of
the config, so every field must be one we know, with a value whose behaviour the fold reproduces.

Fields fall into three groups per PEFT kind (peft 0.21.2's config dataclasses):

* **any value**: metadata (``task_type``, ``revision``, ...), targeting (the weights say which
  modules are adapted), and training-only settings (dropouts, schedules, initialisers that leave
  the base weights alone);
* **read by the fold**: ``r``, ``lora_alpha``, ``use_rslora``, patterns, ``use_dora``, ... (their
  values are validated by the kind's reader);
* **must keep the value that folds**: anything that changes the forward in a way the fold does not
  reproduce (aLoRA's ``alora_invocation_tokens``, ``use_qalora``, ``arrow_config``, ``use_bdlora``,
  KaSA's ``kasa_config``, an initialiser that rewrites the base weights such as PiSSA or LoftQ, ...).

A field outside the list, or a value outside its allowed set, is refused with one line naming the
field: :func:`check_fields`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import Unsupported
from .base import CONFIG

Check = Callable[[object], bool]
ANY: Check = lambda v: True  # noqa: E731


def _is(*allowed) -> Check:
    return lambda v: any(v == a and type(v) is type(a) for a in allowed)


def _empty(v) -> bool:
    return v is None or v == {} or v == [] or v == ""


FALSE = _is(False, None)
NONE: Check = _empty
BIAS = _is("none", "lora_only", "all")
FLAG = _is(True, False)

# metadata and targeting shared by every kind
COMMON: dict[str, Check] = {
    "task_type": ANY, "peft_type": ANY, "auto_mapping": ANY, "peft_version": ANY,
    "base_model_name_or_path": ANY, "revision": ANY, "inference_mode": ANY,
    "target_modules": ANY, "exclude_modules": ANY, "layers_to_transform": ANY, "layers_pattern": ANY,
    "modules_to_save": NONE,
}

# LoRA initialisers that leave the base model untouched (PiSSA, OLoRA, CorDA, LoftQ rewrite it)
_LORA_INIT = _is(True, False, "gaussian", "eva", "orthogonal")

LORA: dict[str, Check] = {
    **COMMON,
    "r": ANY, "lora_alpha": ANY, "use_rslora": FLAG, "rank_pattern": ANY, "alpha_pattern": ANY,
    "lora_dropout": ANY, "init_lora_weights": _LORA_INIT, "loftq_config": ANY, "eva_config": ANY,
    "corda_config": ANY, "runtime_config": ANY, "megatron_core": ANY, "ensure_weight_tying": ANY,
    "qalora_group_size": ANY,
    "bias": BIAS, "use_dora": FLAG, "lora_bias": FLAG,
    "fan_in_fan_out": FALSE, "megatron_config": NONE, "trainable_token_indices": NONE,
    "lora_ga_config": NONE, "velora_config": NONE, "monteclora_config": NONE,
    "alora_invocation_tokens": NONE, "use_qalora": FALSE, "layer_replication": NONE,
    "target_parameters": NONE, "use_bdlora": NONE, "arrow_config": NONE, "kasa_config": NONE,
}

ADALORA: dict[str, Check] = {
    **LORA,
    "use_dora": FALSE, "lora_bias": FALSE, "use_rslora": FALSE,
    "target_r": ANY, "init_r": ANY, "tinit": ANY, "tfinal": ANY, "deltaT": ANY, "beta1": ANY, "beta2": ANY,
    "orth_reg_weight": ANY, "total_step": ANY,
}

VERA: dict[str, Check] = {
    **COMMON,
    "r": ANY, "projection_prng_key": ANY, "save_projection": FLAG, "vera_dropout": ANY, "d_initial": ANY,
    "init_weights": ANY, "bias": BIAS, "fan_in_fan_out": FALSE,
}

IA3: dict[str, Check] = {
    **COMMON,
    "feedforward_modules": ANY, "init_ia3_weights": ANY, "fan_in_fan_out": FALSE,
}

LYCORIS: dict[str, Check] = {  # LoHa and LoKr
    **COMMON,
    "r": ANY, "alpha": ANY, "rank_pattern": ANY, "alpha_pattern": ANY, "rank_dropout": ANY,
    "module_dropout": ANY, "use_effective_conv2d": ANY, "init_weights": ANY,
}
LOKR: dict[str, Check] = {**LYCORIS, "decompose_both": ANY, "decompose_factor": ANY, "rank_dropout_scale": ANY}

MISS: dict[str, Check] = {
    **COMMON,
    "r": ANY, "miss_dropout": ANY, "mini_r": ANY, "bias": BIAS,
    "init_weights": _is(True, False, "mini"),  # "bat" makes the delta depend on W itself (refused)
}

ALLOWED: dict[str, dict[str, Check]] = {
    "LORA": LORA, "ADALORA": ADALORA, "VERA": VERA, "IA3": IA3, "LOHA": LYCORIS, "LOKR": LOKR, "MISS": MISS,
}

# what a refused value means, for the message
WHY = {
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input before the adapter",
    "arrow_config": "Arrow routes among several LoRA experts per token",
    "use_bdlora": "BD-LoRA shards the factors block-diagonally",
    "kasa_config": "KaSA adds a singular-value-shaped adapter",
    "init_lora_weights": "this initialiser rewrites the base weights, which the adapter folder does not hold",
    "init_weights": "MiSS 'bat' makes the delta depend on the base weight",
    "fan_in_fan_out": "transposed (Conv1D-style) weights",
    "layer_replication": "layer replication changes the model's depth",
    "trainable_token_indices": "trainable token rows replace embedding rows",
    "target_parameters": "LoRA on raw parameters",
    "modules_to_save": "full trained copies of modules cannot be folded into a low-rank branch",
    "megatron_config": "Megatron-parallel layers",
}


def check_fields(folder: Path, cfg: dict) -> None:
    """Refuse (:class:`Unsupported`, one line naming the field) any field of ``cfg`` the kind's
    allow-list does not know, or a value it does not fold."""
    kind = str(cfg.get("peft_type", "")).upper()
    allowed = ALLOWED.get(kind)
    if allowed is None:
        return  # the registry lookup reports an unsupported peft_type
    for key in sorted(cfg):
        check = allowed.get(key)
        if check is None:
            raise Unsupported(f"{folder / CONFIG}: unknown field {key!r} for {kind}; refusing to guess what it does")
        if not check(cfg[key]):
            why = WHY.get(key)
            raise Unsupported(f"{folder / CONFIG}: {key}={cfg[key]!r} cannot be folded exactly"
                              + (f" ({why})" if why else ""))
