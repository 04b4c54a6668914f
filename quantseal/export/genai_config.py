"""The files beside a decoder's ``model.onnx`` that onnxruntime-genai loads unchanged.

``genai_config.json`` names the graph's inputs and outputs and the cache geometry, and sets
greedy search defaults; ``tokenizer_config.json`` (the checkpoint's own, or a minimal one naming
the special tokens) sits beside ``tokenizer.json``.  The texts are kept in the ONNX file's
metadata (``quantseal.genai_config``, ``quantseal.tokenizer_config``), so whoever rewrites the
file — a per-customer template swap included — writes the same folder
(:func:`companion_files`).  Pure: dicts and strings in and out.
"""

from __future__ import annotations

import json

from .decoder_arch import DecoderArch

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
META_GENAI = "quantseal.genai_config"
META_TOKENIZER_CONFIG = "quantseal.tokenizer_config"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def genai_config(arch: DecoderArch, config: dict, filename: str = "model.onnx", context_length: int | None = None,
                 generation: dict | None = None, provider: str | None = None) -> dict:
    """onnxruntime-genai's configuration for the graph of :mod:`.decoder_graph` (its input and
    output names, the KV cache shared between past and present: GroupQueryAttention reads the
    valid length of each row from ``attention_mask``).  ``provider`` (``"cuda"`` for a float16
    graph) becomes the session's execution provider; a CPU user clears it (``Config.clear_providers``)."""
    generation = generation or {}
    eos = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = _ids(generation.get("bos_token_id", config.get("bos_token_id")))
    pad = _ids(generation.get("pad_token_id", config.get("pad_token_id"))) or eos[:1]
    context = int(context_length or arch.max_positions)
    return {
        "model": {
            "bos_token_id": bos[0] if bos else 0,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{provider: {}}] if provider else []},
                "filename": filename,
                "head_size": arch.head_dim,
                "hidden_size": arch.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": arch.heads,
                "num_hidden_layers": arch.layers,
                "num_key_value_heads": arch.kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else 0),
            "pad_token_id": pad[0] if pad else 0,
            "type": arch.model_type,
            "vocab_size": arch.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def tokenizer_config(existing: str | None, config: dict, chat_template: str | None = None) -> str:
    """The checkpoint's ``tokenizer_config.json`` when it has one, else a minimal one: a fast
    tokenizer and the special tokens' ids are all onnxruntime-genai reads from it.  A
    ``chat_template`` (the checkpoint's ``chat_template.jinja``, where transformers ≥ 4.50 keeps
    it) joins it as ``"chat_template"`` unless it already holds one, so the export folder carries
    the template a server (vLLM, ``quantseal serve``) renders chats with."""
    if not existing:
        existing = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(
            config.get("max_position_embeddings", 2048)), "clean_up_tokenization_spaces": False}, indent=2)
    if not chat_template or not chat_template.strip():
        return existing
    try:
        cfg = json.loads(existing)
    except json.JSONDecodeError:
        return existing  # not ours to repair: kept byte for byte
    if not isinstance(cfg, dict) or cfg.get("chat_template"):
        return existing
    cfg["chat_template"] = chat_template
    return json.dumps(cfg, indent=2, ensure_ascii=False)


def companion_files(metadata: dict[str, str], filename: str) -> dict[str, bytes]:
    """The files to write beside an ONNX model named ``filename`` whose metadata is
    ``metadata``: ``genai_config.json`` (pointing at ``filename``) and ``tokenizer_config.json``
    for a decoder; nothing for an encoder."""
    text = metadata.get(META_GENAI)
    if not text:
        return {}
    cfg = json.loads(text)
    cfg["model"]["decoder"]["filename"] = filename
    out = {GENAI_CONFIG: (json.dumps(cfg, indent=4) + "\n").encode()}
    tok = metadata.get(META_TOKENIZER_CONFIG)
    if tok:
        out[TOKENIZER_CONFIG] = tok.encode()
    return out
