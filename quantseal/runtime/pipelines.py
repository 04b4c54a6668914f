"""Pipelines on top of a :class:`~quantseal.runtime.session.Session` and a ``tokenizer.json``.

``Embedder``: texts → sentence embeddings (n, D) float32 from an exported encoder, whose graph
already holds the pooling and normalisation; truncation length and lowercasing follow the model's
sentence-transformers conventions recorded in the file (:mod:`quantseal.sbert`).  ``CausalLM``:
logits and greedy generation with the KV cache from an exported decoder
(:mod:`quantseal.export.decoder` describes its inputs and outputs).  Tokenisation is the
``tokenizers`` library on ``tokenizer.json``: neither torch nor transformers is imported (DESIGN §2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..sbert import Conventions
from ..text import TextTokenizer
from .session import Session

TOKENIZER = "tokenizer.json"
ADAPTER_INPUT = "adapter_id"  # a switchable export's input (quantseal.export.adapters.switchable)
ADAPTERS_METADATA = "quantseal.adapters"


def adapter_ids(metadata: dict[str, str]) -> dict[str, int]:
    """Adapter name → ``adapter_id`` of a switchable export (its ``quantseal.adapters`` metadata;
    id 0 is the base model); empty for any other file."""
    import json

    raw = metadata.get(ADAPTERS_METADATA)
    if not raw:
        return {}
    try:
        return {str(a["name"]): int(a["id"]) for a in json.loads(raw)}
    except (ValueError, TypeError, KeyError) as exc:
        raise BadInput(f"corrupt {ADAPTERS_METADATA} metadata ({exc})") from exc


def adapter_id(names: dict[str, int], name: str | None, where) -> int:
    """The id of adapter ``name`` (None: 0, the base model); an unknown name, or a name for a
    file without switchable adapters, is a :class:`BadInput` listing what the file has."""
    if name is None:
        return 0
    if not names:
        raise BadInput(f"{where}: has no switchable adapters (export with --adapter ... --switchable); "
                       f"cannot select {name!r}")
    if name not in names:
        raise BadInput(f"{where}: no adapter named {name!r} (it has {', '.join(sorted(names, key=names.get))})")
    return names[name]


def is_switchable(session: Session) -> bool:
    """Whether ``session``'s model takes an ``adapter_id`` (``export --switchable``)."""
    return ADAPTER_INPUT in session.input_names


def resolve_adapter(names: dict[str, int], default: int, adapter: str | int | None, where) -> int:
    """The ``adapter_id`` to feed: ``adapter`` None → ``default`` (the pipeline's own choice); an
    int → that id (0 the base model, 1..J the adapters); a name → its id (:func:`adapter_id`).
    Per call, so requests with different adapters share one pipeline (one session)."""
    if adapter is None:
        return default
    if isinstance(adapter, bool) or not isinstance(adapter, (int, np.integer, str)):
        raise BadInput(f"{where}: an adapter is chosen by name or id, not {type(adapter).__name__}")
    if isinstance(adapter, str):
        return adapter_id(names, adapter, where)
    if not 0 <= int(adapter) <= len(names):
        raise BadInput(f"{where}: adapter id {int(adapter)} is not in 0..{len(names)} (0: the base model)")
    return int(adapter)


def _adapter_feed(pipeline, adapter: str | int | None) -> int | None:
    if not pipeline.switchable:
        if adapter is not None and not (isinstance(adapter, (int, np.integer)) and int(adapter) == 0):
            adapter_id({}, str(adapter), pipeline.session.path)  # refused: the file has no adapters
        return None
    return resolve_adapter(pipeline.adapter_names, pipeline.adapter_id, adapter, pipeline.session.path)


def find_tokenizer(model_path: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The folder holding ``tokenizer.json``: ``tokenizer`` (the file or its folder) when given,
    else the model file's folder."""
    if tokenizer is not None:
        t = Path(tokenizer)
        folder = t.parent if t.is_file() and t.name == TOKENIZER else t
        if t.is_file() and t.name != TOKENIZER:
            raise BadInput(f"{t}: expected a file named {TOKENIZER} or the folder holding it")
    else:
        folder = Path(model_path).parent
    if not (folder / TOKENIZER).is_file():
        raise BadInput(f"no {TOKENIZER} in {folder} (export writes one next to the model; or pass --tokenizer)")
    return folder


def sentence_tokenizer(folder: str | Path, max_length: int, lowercase: bool = False) -> TextTokenizer:
    """``folder/tokenizer.json`` truncating at ``max_length`` tokens (special tokens included), as
    sentence-transformers' tokenizer call does; ``lowercase``: a ``Lowercase`` normaliser in front
    unless the tokenizer already has one (sentence-transformers' ``do_lower_case``)."""
    from tokenizers import Tokenizer
    from tokenizers.normalizers import Lowercase, Sequence

    path = Path(folder) / TOKENIZER
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise BadInput(f"{path}: cannot read the tokenizer ({exc})") from exc
    if lowercase:
        norm = tok.normalizer
        has = isinstance(norm, Lowercase) or (isinstance(norm, Sequence) and any(isinstance(n, Lowercase) for n in norm))
        if not has:
            tok.normalizer = Sequence([Lowercase()] + (list(norm) if isinstance(norm, Sequence)
                                                       else [norm] if norm is not None else []))
    return TextTokenizer.from_backend(tok, max_length=max_length)


class Embedder:
    """Sentence embeddings through onnxruntime.

    ``model_path``: an ONNX file exported by ``quantseal export`` (output ``sentence_embedding``).
    ``tokenizer``: ``tokenizer.json`` or its folder (default: beside the model).
    ``max_length``: truncation length in tokens, special tokens included (default: the model's
    ``max_seq_length`` recorded at export, 256 for all-MiniLM-L6-v2; 128 for older files); at most
    the model's ``max_position_embeddings``.
    ``adapter``: the name of one of a switchable export's adapters (``adapter_names``); None is
    the base model (``adapter_id`` 0).  ``embed(texts, adapter=...)`` overrides it per call.
    """

    def __init__(self, model_path: str | Path, tokenizer: str | Path | None = None, provider: str = "auto",
                 threads: int | None = None, max_length: int | None = None, batch_size: int = 32,
                 adapter: str | None = None):
        self.session = Session(model_path, provider=provider, threads=threads)
        if "sentence_embedding" not in self.session.output_names:
            hint = "; a decoder: use --prompt / CausalLM" if "logits" in self.session.output_names else ""
            raise BadInput(f"{model_path}: not an embedding model (outputs {self.session.output_names[:4]}{hint})")
        self.conventions = Conventions.from_metadata(self.session.metadata)
        self.switchable = is_switchable(self.session)
        self.adapter_names = adapter_ids(self.session.metadata) if self.switchable else {}
        self.adapter = adapter
        self.adapter_id = adapter_id(self.adapter_names, adapter, model_path)
        max_length = self.conventions.max_seq_length if max_length is None else int(max_length)
        limit = self.conventions.max_positions
        if max_length < 2:
            raise BadInput(f"max length must be at least 2 tokens ([CLS] and [SEP]), not {max_length}")
        if limit is not None and max_length > limit:
            raise BadInput(f"max length {max_length} exceeds the model's {limit} positions (max_position_embeddings)")
        self.max_length = max_length
        self.tokenizer = sentence_tokenizer(find_tokenizer(model_path, tokenizer), max_length,
                                            self.conventions.do_lower_case)
        if batch_size < 1:
            raise BadInput(f"batch size must be at least 1, not {batch_size}")
        self.batch_size = batch_size

    @property
    def provider(self) -> str:
        return self.session.provider

    def feeds(self, tokens: dict[str, np.ndarray], adapter: str | int | None = None) -> dict[str, np.ndarray]:
        """``tokens`` plus, for a switchable export, ``adapter_id`` (a scalar: the given adapter,
        by name or id, else this embedder's)."""
        ident = self.adapter_feed(adapter)
        return tokens if ident is None else {**tokens, ADAPTER_INPUT: np.array(ident, dtype=np.int64)}

    def adapter_feed(self, adapter: str | int | None = None) -> int | None:
        """The ``adapter_id`` a call feeds (None for a file without adapters, where only None or
        0 is accepted): ``adapter`` by name or id, None for this pipeline's own choice."""
        return _adapter_feed(self, adapter)

    def embed(self, texts: list[str], adapter: str | int | None = None) -> np.ndarray:
        """float32 (len(texts), H), each row of unit length; ``adapter``: a switchable export's
        adapter for this call, by name or id (default: the embedder's)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise BadInput("no texts to embed")
        out = []
        for i in range(0, len(texts), self.batch_size):
            feeds = self.feeds(self.tokenizer(texts[i:i + self.batch_size]), adapter)
            out.append(self.session.run(feeds, ["sentence_embedding"])["sentence_embedding"])
        return np.concatenate(out).astype(np.float32, copy=False)


def _extra_caches(meta: dict[str, str], where) -> list[tuple[str, str]]:
    """(past, present) name prefixes of KV caches beyond ``past_key_values`` / ``present``
    (metadata ``quantseal.extra_caches``: an X-LoRA export's scaling pass has its own)."""
    import json

    try:
        pairs = json.loads(meta.get("quantseal.extra_caches", "[]"))
        return [(str(p), str(q)) for p, q in pairs]
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{where}: corrupt quantseal.extra_caches metadata ({exc})") from exc


class CausalLM:
    """Next-token logits and greedy generation through onnxruntime.

    ``model_path``: an ONNX file exported from a decoder by ``quantseal export`` (inputs
    ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value``; outputs ``logits``,
    ``present.{i}.key/value``).  ``tokenizer``: ``tokenizer.json`` or its folder (default: beside
    the model).  Generation stops after ``max_new_tokens`` or at an end-of-sequence token (the
    model's ``eos_token_id``, recorded at export).  ``adapter``: a switchable export's adapter by
    name (None: the base model, ``adapter_id`` 0).
    """

    def __init__(self, model_path: str | Path, tokenizer: str | Path | None = None, provider: str = "auto",
                 threads: int | None = None, adapter: str | None = None):
        from tokenizers import Tokenizer

        self.session = Session(model_path, provider=provider, threads=threads)
        meta = self.session.metadata
        if "logits" not in self.session.output_names or "quantseal.num_layers" not in meta:
            raise BadInput(f"{model_path}: not an exported decoder (outputs {self.session.output_names})")
        self.num_layers = int(meta["quantseal.num_layers"])
        self.num_kv_heads = int(meta["quantseal.num_kv_heads"])
        self.head_dim = int(meta["quantseal.head_dim"])
        self.eos_ids = {int(x) for x in meta.get("quantseal.eos_token_id", "").split(",") if x.strip()}
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.switchable = is_switchable(self.session)  # export --switchable: adapter by name
        self.adapter_names = adapter_ids(meta) if self.switchable else {}
        self.adapter = adapter
        self.adapter_id = adapter_id(self.adapter_names, adapter, model_path)
        for past, present in _extra_caches(meta, model_path):  # an X-LoRA export's scaling-pass cache
            self._past_names += [f"{past}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
            self._present_names += [f"{present}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        path = find_tokenizer(model_path, tokenizer) / TOKENIZER
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise BadInput(f"{path}: cannot read the tokenizer ({exc})") from exc
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    @property
    def provider(self) -> str:
        return self.session.provider

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The cache of no tokens: float32 (batch, kv_heads, 0, head_dim) per layer and key/value."""
        dtype = np.float16 if self.session.input_types.get(self._past_names[0]) == "tensor(float16)" else np.float32
        z = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=dtype)
        return {n: z for n in self._past_names}

    def adapter_feed(self, adapter: str | int | None = None) -> int | None:
        """The ``adapter_id`` a call feeds (None for a file without adapters, where only None or
        0 is accepted): ``adapter`` by name or id, None for this pipeline's own choice."""
        return _adapter_feed(self, adapter)

    def step(self, ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None = None,
             adapter: str | int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass.  ids: int64 (B, T); attention_mask: int64 (B, past + T); ``past``:
        the previous call's cache (None: empty); ``adapter``: a switchable export's adapter for
        this call, by name or id (None: the pipeline's).  Returns (logits (B, T, V), the new cache)."""
        ids = np.asarray(ids, dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(self.empty_past(ids.shape[0]) if past is None else past)
        ident = self.adapter_feed(adapter)
        if ident is not None:
            feeds[ADAPTER_INPUT] = np.array(ident, dtype=np.int64)
        out = self.session.run(feeds, ["logits", *self._present_names])
        present = {p: out[q] for p, q in zip(self._past_names, self._present_names)}
        return out["logits"].astype(np.float32, copy=False), present  # a float16 graph's too

    def logits(self, ids, attention_mask=None, adapter: str | int | None = None) -> np.ndarray:
        """float32 (B, T, V) logits of a batch of token ids (B, T) (or one sequence (T,) → (T, V))."""
        ids = np.asarray(ids, dtype=np.int64)
        single = ids.ndim == 1
        ids = ids[None] if single else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise BadInput(f"token ids must be (batch, sequence) with sequence ≥ 1, got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        out, _ = self.step(ids, mask, adapter=adapter)
        return out[0] if single else out

    def next_logits(self, rows, tokens=None, adapter: str | int | None = None) -> np.ndarray:
        """float32 (len(rows), len(tokens) or V): each row's next-token logits after its last
        token.  ``rows``: id lists (lengths may differ; right-padded here, so every real token keeps
        positions 0..len−1 and causal attention makes the padding irrelevant); ``tokens``: the
        vocabulary ids to return, in that order (None: all).  What ``POST /logits`` answers."""
        rows = [[int(x) for x in r] for r in rows]
        if not rows or any(len(r) == 0 for r in rows):
            raise BadInput("next_logits needs at least one non-empty row")
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        out = self.logits(ids, mask, adapter)
        last = out[np.arange(len(rows)), mask.sum(1) - 1]
        if tokens is not None:
            last = last[:, np.asarray(tokens, dtype=np.int64)]
        return np.asarray(last, dtype=np.float32)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 20, use_cache: bool = True,
                     adapter: str | int | None = None) -> list[int]:
        """Greedy continuation (new token ids only) of one prompt.  ``use_cache=False`` re-runs the
        whole sequence at each step (the reference the cache must reproduce)."""
        ids = [int(x) for x in prompt_ids]
        if not ids:
            raise BadInput("empty prompt")
        if max_new_tokens < 0:
            raise BadInput(f"max_new_tokens must be non-negative, not {max_new_tokens}")
        new: list[int] = []
        past = None
        feed = ids
        while len(new) < max_new_tokens:
            if use_cache:
                mask = np.ones((1, len(ids) + len(new)), dtype=np.int64)
                logits, past = self.step(np.array([feed]), mask, past, adapter)
            else:
                logits = self.logits(np.array([ids + new]), adapter=adapter)
            tok = int(np.argmax(logits[0, -1]))
            new.append(tok)
            if tok in self.eos_ids:
                break
            feed = [tok]
        return new

    def generate(self, prompt: str, max_new_tokens: int = 20, use_cache: bool = True,
                 adapter: str | int | None = None) -> str:
        """Greedy continuation of ``prompt`` as text (the prompt not repeated)."""
        if not prompt:
            raise BadInput("empty prompt")
        return self.decode(self.generate_ids(self.encode(prompt), max_new_tokens, use_cache, adapter))
