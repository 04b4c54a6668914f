"""The tokenizer files an encoder export writes beside ``model.onnx`` (besides ``tokenizer.json``).

With ``tokenizer.json`` alone, ``transformers.AutoTokenizer.from_pretrained(folder)`` builds a
generic tokenizer whose ``model_input_names`` are ``input_ids`` and ``attention_mask``: no
``token_type_ids``, which the exported graph requires, and no length limit.  So the export adds:

* ``tokenizer_config.json``: the source's, with ``model_input_names`` set to the graph's token
  inputs (transformers' order: ids, token types, mask) and ``model_max_length`` set to the
  model's ``max_seq_length`` (what sentence-transformers truncates at);
* ``special_tokens_map.json`` and ``vocab.txt`` when the source has them (slow tokenizer classes);
* ``sentence_bert_config.json``: ``max_seq_length`` and ``do_lower_case``, as sentence-transformers
  writes it.

Everything is derived from the tokenizer's folder and the ONNX file's own inputs and
``quantseal.*`` metadata, so every writer of an encoder file (plain, adapters, watermark template)
gives the same set.  Deterministic bytes: sorted keys, fixed indentation.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInput
from ..sbert import META_MAX_LENGTH, SBERT_CONFIG, Conventions

TOKEN_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # transformers' BERT order
COPIED = ("special_tokens_map.json", "vocab.txt")
TOKENIZER_CONFIG = "tokenizer_config.json"


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def companion_files(tokenizer_json: Path, model) -> dict[str, bytes]:
    """``{file name: bytes}`` to write beside an exported encoder ``model`` (an
    ``onnx.ModelProto``) whose ``tokenizer.json`` is ``tokenizer_json``.  Empty for a file without
    the encoder conventions in its metadata (decoders)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if META_MAX_LENGTH not in meta:
        return {}
    conv = Conventions.from_metadata(meta)
    folder = Path(tokenizer_json).parent
    inputs = {i.name for i in model.graph.input}
    cfg = {}
    if (folder / TOKENIZER_CONFIG).is_file():
        try:
            cfg = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{folder / TOKENIZER_CONFIG}: not valid JSON ({exc})") from exc
        if not isinstance(cfg, dict):
            raise BadInput(f"{folder / TOKENIZER_CONFIG}: expected a JSON object")
    cfg["model_input_names"] = [n for n in TOKEN_INPUTS if n in inputs]
    cfg["model_max_length"] = conv.max_seq_length
    out = {TOKENIZER_CONFIG: _dump(cfg)}
    for name in COPIED:
        if (folder / name).is_file():
            out[name] = (folder / name).read_bytes()
    out[SBERT_CONFIG] = _dump({"max_seq_length": conv.max_seq_length, "do_lower_case": conv.do_lower_case})
    return out
