"""Text for calibration and evaluation, and tokenisation without torch.

Both ends use it: compression (calibration batches) and the runtime (a device needs only
onnxruntime, numpy and ``tokenizers``), so it imports neither torch nor transformers.

The default corpus is CPython's own ``pydoc_data.topics`` (English prose, ships with every
Python).  It is split deterministically by topic: even-numbered topics (sorted by key) are the
calibration half, odd-numbered ones the held-out evaluation half.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import BadInput

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _clean_sentences(text: str, lo: int = 60, hi: int = 250) -> list[str]:
    """Prose sentences of ``lo``–``hi`` characters: code, headings and tables dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(l.startswith("   ") for l in lines) or para.lstrip().startswith(("*", "=", "-", "+", ">>>")):
            continue
        flat = " ".join(l.strip() for l in lines)
        for sent in _SENTENCE_END.split(flat):
            sent = sent.strip()
            if lo <= len(sent) <= hi and sent[0].isupper() and sent[-1] in ".!?" and sent.count('"') % 2 == 0:
                out.append(sent)
    return out


def pydoc_sentences(part: str = "all") -> list[str]:
    """Clean sentences of ``pydoc_data.topics``; ``part`` is "calibration", "evaluation" or "all"."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "calibration":
        keys = keys[0::2]
    elif part == "evaluation":
        keys = keys[1::2]
    elif part != "all":
        raise ValueError(f"unknown part {part!r}")
    seen: set[str] = set()
    out = []
    for key in keys:
        for s in _clean_sentences(topics[key]):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


def read_text_file(path: str | Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text") from exc
    if "\x00" in content:
        raise BadInput(f"{path}: holds NUL bytes (binary data, not UTF-8 text)")
    lines = [l.strip() for l in content.splitlines()]
    lines = [l for l in lines if l]
    if not lines:
        raise BadInput(f"{path}: no text in the file")
    return lines


def utf8_text(text: str, what: str) -> str:
    """``text`` if it can be written as UTF-8, else a :class:`BadInput` naming ``what``: Python
    hands non-UTF-8 command-line bytes over as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} {ascii(text)[:60]}: not valid UTF-8 text") from None
    return text


def calibration_texts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The calibration texts: a file's lines, or the calibration half of ``pydoc_data``."""
    texts = read_text_file(path) if path is not None else pydoc_sentences("calibration")
    return texts[:limit] if limit else texts


class TextTokenizer:
    """A model folder's ``tokenizer.json`` through the ``tokenizers`` library → numpy int64."""

    def __init__(self, model_dir: str | Path, max_length: int = 128):
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise BadInput(f"{model_dir}: no tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise BadInput(f"{path}: cannot read the tokenizer ({exc})") from exc
        self._setup(tok, max_length)

    @classmethod
    def from_backend(cls, tokenizer, max_length: int = 128) -> "TextTokenizer":
        """From a ``tokenizers.Tokenizer`` object (e.g. converted from a GGUF file)."""
        self = cls.__new__(cls)
        self._setup(tokenizer, max_length)
        return self

    def _setup(self, tok, max_length: int) -> None:
        self._tok = tok
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.max_length = max_length
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_ids(self, text: str, special: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=special).ids

    def __call__(self, texts: list[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Batch → ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 (B, T), right-padded."""
        encs = self._tok.encode_batch(list(texts))
        width = pad_to or max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = min(len(e.ids), width)
            ids[i, :n] = e.ids[:n]
            mask[i, :n] = 1
            types[i, :n] = e.type_ids[:n]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def pad_batch(self, id_lists: list[list[int]]) -> dict[str, np.ndarray]:
        """Already-tokenised sequences → a right-padded batch."""
        width = max(len(x) for x in id_lists)
        ids = np.full((len(id_lists), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(id_lists), width), dtype=np.int64)
        for i, x in enumerate(id_lists):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
