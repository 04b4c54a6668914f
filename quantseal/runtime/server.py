"""HTTP serving of an exported model, embedding or decoder: the black-box endpoint (DESIGN §6).

Standard library only (``http.server.ThreadingHTTPServer``), onnxruntime underneath; no torch.

=========================  ==================================================================
request                    answer
=========================  ==================================================================
``GET /health``            ``{"status": "ok", "model", "provider", "dim", "inputs", ...}``
``POST /embed``            body ``{"texts": ["...", ...]}`` → ``{"embeddings": [[...], ...]}``;
                           a switchable export (``export --switchable``) also takes
                           ``"adapter": NAME`` (default: ``serve --adapter``, else the base)
``POST /embed``            body ``{"input_ids": [[...], ...], "attention_mask": [[...], ...]}``
                           (``attention_mask`` optional: rows may then differ in length and are
                           right-padded; ``token_type_ids`` optional, default zeros) → same answer
=========================  ==================================================================

A decoder (an export with ``logits`` and a KV cache) answers instead:

=========================  ==================================================================
``POST /generate``         body ``{"prompt": "...", "max_new_tokens": 20}`` (or ``"input_ids":
                           [...]`` instead of the prompt) → ``{"text", "ids", "n"}``, greedy
``POST /logits``           body ``{"input_ids": [[...], ...]}`` (rows may differ in length) and
                           optionally ``"tokens": [...]`` → ``{"logits": [[...], ...]}``: each
                           row's next-token logits after its last token, restricted to ``tokens``
                           (in that order) when given — what a completion API's log-prob option
                           exposes
=========================  ==================================================================

Both also answer the OpenAI-compatible routes of :mod:`quantseal.runtime.openai_routes`
(``/v1/embeddings``; ``/v1/completions``, ``/v1/chat/completions`` with log-probabilities).

Every answer is JSON.  A malformed request (not JSON, nested too deeply, missing or mistyped
fields, an empty or too-large batch, a text longer than ``max_chars`` or with a lone surrogate,
token ids outside the vocabulary, ...) gets HTTP 400 ``{"error": "..."}``; an unknown path 404, a
method other than GET/POST 405, an over-long body 413.  The server keeps serving after any of
them.  The HTTP layer (deadlines, worker pool, bearer token) is :mod:`.http_server`.  Texts are
checked against ``max_chars`` before tokenisation and tokenised outside the inference lock; only
``session.run`` holds it (onnxruntime already uses the cores).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from ..errors import BadInput
from . import openai_routes
from .chat_template import ChatTemplate, load_chat_template
from .http_server import HTTPServer, Limits, RequestError, describe_routes  # noqa: F401 - re-exported
from .pipelines import CausalLM, Embedder

log = logging.getLogger(__name__)

MAX_BATCH = 256
MAX_TOKENS = 512  # per row of a token-level query (BERT's position table)
MAX_NEW_TOKENS = 256
MAX_CHARS = 100_000  # per text, checked before tokenisation
_ID_LIMIT = 1 << 31


def check_text(text: str, what: str, max_chars: int) -> None:
    """Refuse a text longer than ``max_chars`` or that is not encodable Unicode (lone surrogates)."""
    if len(text) > max_chars:
        raise RequestError(f"{what} has {len(text)} characters (at most {max_chars})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode (a lone surrogate?)") from None


def _int_matrix(value, field: str, max_rows: int, max_cols: int, ragged: bool) -> list[list[int]]:
    """Validate a JSON list of lists of integers (bools refused)."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"'{field}' must be a non-empty list of lists of integers")
    if len(value) > max_rows:
        raise RequestError(f"batch of {len(value)} rows is too large (at most {max_rows} per request)")
    for i, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise RequestError(f"'{field}'[{i}] must be a non-empty list of integers")
        if len(row) > max_cols:
            raise RequestError(f"'{field}'[{i}] has {len(row)} tokens (at most {max_cols})")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in row):
            raise RequestError(f"'{field}'[{i}] must hold integers only")
        if not all(-_ID_LIMIT < x < _ID_LIMIT for x in row):
            raise RequestError(f"'{field}'[{i}] holds an integer out of range (token ids must lie in the vocabulary)")
    if not ragged and len({len(r) for r in value}) != 1:
        raise RequestError(f"rows of '{field}' differ in length; pad them or omit 'attention_mask'")
    return value


def request_adapter(pipeline, payload: dict) -> int | None:
    """The ``adapter_id`` a quantseal-route request asks for with ``"adapter": NAME`` (None: the
    server's own, ``serve --adapter``); an unknown name is a 404 naming the ones served."""
    name = payload.get("adapter")
    if name is None:
        return None
    if not isinstance(name, str):
        raise RequestError("'adapter' must be the name of one of the model's adapters")
    return resolve(pipeline, name)


def resolve(pipeline, name: str | int) -> int:
    """``name`` (an adapter's name, or an id) → the id the pipeline feeds; :class:`RequestError`
    404 when the model has no such adapter."""
    try:
        return pipeline.adapter_feed(name)
    except BadInput as exc:
        raise RequestError(str(exc).split(": ", 1)[-1], 404) from None


class EmbeddingService:
    """The request logic, independent of HTTP: validate a JSON payload, run the model, answer."""

    def __init__(self, embedder: Embedder, max_batch: int = MAX_BATCH, max_tokens: int = MAX_TOKENS,
                 max_chars: int = MAX_CHARS):
        if max_batch < 1 or max_tokens < 1 or max_chars < 1:
            raise BadInput("max_batch, max_tokens and max_chars must be at least 1")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.vocab_size = embedder.tokenizer.vocab_size
        self.lock = threading.Lock()
        self.dim = int(self._run_texts(["ok"]).shape[1])  # warm-up; also proves the model runs
        self.routes = {"/embed": self.embed, "/v1/embeddings": lambda p: openai_routes.embeddings(self, p)}
        self.get_routes = {"/v1/models": lambda: openai_routes.models(self)}
        self.provider = embedder.provider
        self.name = embedder.session.path.stem
        self.pipeline = embedder
        self.adapter_names = embedder.adapter_names  # name → adapter_id (switchable exports)

    def public_health(self) -> dict:
        """What ``/health`` shows without the bearer token."""
        return {"status": "ok"}

    @classmethod
    def from_path(cls, model: str | Path, provider: str = "auto", threads: int | None = None,
                  tokenizer: str | Path | None = None, max_length: int | None = None, adapter: str | None = None,
                  **kw) -> "EmbeddingService":
        return cls(Embedder(model, tokenizer=tokenizer, provider=provider, threads=threads, max_length=max_length,
                            adapter=adapter), **kw)

    def health(self) -> dict:
        sess = self.embedder.session
        meta = {k: v for k, v in sess.metadata.items() if k in ("quantseal.version", "quantseal.family",
                                                                  "quantseal.model_type", "quantseal.pooling")}
        return {"status": "ok", "model": sess.path.name, "provider": sess.provider, "dim": self.dim,
                "inputs": sess.input_names, "output": "sentence_embedding", "vocab_size": self.vocab_size,
                "max_batch": self.max_batch, "max_tokens": self.max_tokens, "metadata": meta,
                **({"adapters": sorted(self.embedder.adapter_names, key=self.embedder.adapter_names.get),
                    "adapter": self.embedder.adapter} if self.embedder.switchable else {})}

    def _run_texts(self, texts: list[str], adapter: str | int | None = None) -> np.ndarray:
        bs = self.embedder.batch_size
        batches = [self.embedder.feeds(self.embedder.tokenizer(texts[i:i + bs]), adapter)
                   for i in range(0, len(texts), bs)]  # no lock
        out = []
        for feeds in batches:
            with self.lock:
                out.append(self.embedder.session.run(feeds, ["sentence_embedding"])["sentence_embedding"])
        return np.concatenate(out)

    def _run_ids(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self.lock:
            return self.embedder.session.run(feeds, ["sentence_embedding"])["sentence_embedding"]

    def embed(self, payload, adapter: int | None = None) -> dict:
        """A decoded JSON payload → the answer dict; :class:`RequestError` when it is malformed.
        The adapter: the payload's ``"adapter"`` name, else ``adapter`` (an id, from an OpenAI
        route's ``model``), else the server's."""
        if not isinstance(payload, dict):
            raise RequestError("the body must be a JSON object with 'texts' or 'input_ids'")
        if ("texts" in payload) == ("input_ids" in payload):
            raise RequestError("give exactly one of 'texts' (list of strings) or 'input_ids' (list of lists of ints)")
        asked = request_adapter(self.embedder, payload)
        adapter = asked if asked is not None else adapter
        if "texts" in payload:
            texts = payload["texts"]
            if not isinstance(texts, list) or not texts:
                raise RequestError("'texts' must be a non-empty list of strings")
            if len(texts) > self.max_batch:
                raise RequestError(f"batch of {len(texts)} texts is too large (at most {self.max_batch} per request)")
            if not all(isinstance(t, str) for t in texts):
                raise RequestError("'texts' must hold strings only")
            for i, t in enumerate(texts):
                check_text(t, f"text {i}", self.max_chars)
            vectors = self._run_texts(texts, adapter)
        else:
            vectors = self._run_ids(self.embedder.feeds(self._id_feeds(payload), adapter))
        vectors = np.asarray(vectors, dtype=np.float32)
        return {"embeddings": vectors.tolist(), "n": int(vectors.shape[0]), "dim": int(vectors.shape[1])}

    def _id_feeds(self, payload: dict) -> dict[str, np.ndarray]:
        has_mask = payload.get("attention_mask") is not None
        ids = _int_matrix(payload["input_ids"], "input_ids", self.max_batch, self.max_tokens, ragged=not has_mask)
        width = max(len(r) for r in ids)
        arr = np.full((len(ids), width), self.embedder.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros_like(arr)
        for i, row in enumerate(ids):
            arr[i, :len(row)] = row
            mask[i, :len(row)] = 1
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise RequestError(f"token ids must lie in [0, {self.vocab_size})")
        if has_mask:
            m = np.asarray(_int_matrix(payload["attention_mask"], "attention_mask", self.max_batch,
                                       self.max_tokens, ragged=False), dtype=np.int64)
            if m.shape != arr.shape:
                raise RequestError(f"'attention_mask' is {list(m.shape)}, 'input_ids' {list(arr.shape)}")
            if not np.isin(m, (0, 1)).all() or not m.any(axis=1).all():
                raise RequestError("'attention_mask' must hold 0/1 with at least one 1 per row")
            mask = m
        types = np.zeros_like(arr)
        if payload.get("token_type_ids") is not None:
            t = np.asarray(_int_matrix(payload["token_type_ids"], "token_type_ids", self.max_batch,
                                       self.max_tokens, ragged=False), dtype=np.int64)
            if t.shape != arr.shape or not np.isin(t, (0, 1)).all():
                raise RequestError("'token_type_ids' must be 0/1 and shaped like 'input_ids'")
            types = t
        return {"input_ids": arr, "attention_mask": mask, "token_type_ids": types}


class GenerationService:
    """Request logic for a decoder: greedy ``/generate`` and next-token ``/logits``."""

    def __init__(self, lm: CausalLM, max_batch: int = MAX_BATCH, max_tokens: int = MAX_TOKENS,
                 max_new_tokens: int = MAX_NEW_TOKENS, max_chars: int = MAX_CHARS,
                 chat_template: ChatTemplate | None = None):
        if max_batch < 1 or max_tokens < 1 or max_new_tokens < 0 or max_chars < 1:
            raise BadInput("max_batch, max_tokens and max_chars must be at least 1, max_new_tokens non-negative")
        self.lm = lm
        self.max_batch, self.max_tokens, self.max_new_tokens = max_batch, max_tokens, max_new_tokens
        self.max_chars = max_chars
        self.chat_template = chat_template  # /v1/chat/completions renders messages with it (openai_routes)
        self.vocab_size = int(lm.tokenizer.get_vocab_size())
        self.lock = threading.Lock()
        self.routes = {"/generate": self.generate, "/logits": self.logits,
                       "/v1/completions": lambda p: openai_routes.completions(self, p),
                       "/v1/chat/completions": lambda p: openai_routes.chat_completions(self, p)}
        self.get_routes = {"/v1/models": lambda: openai_routes.models(self)}
        self.provider = lm.provider
        self.name = lm.session.path.stem
        self.pipeline = lm
        self.adapter_names = lm.adapter_names  # name → adapter_id (switchable exports)
        with self.lock:  # warm-up; also proves the model runs
            self.vocab_out = int(lm.logits(np.array([[0]]))[0].shape[-1])

    def check_text(self, text: str, what: str) -> None:
        check_text(text, what, self.max_chars)

    def public_health(self) -> dict:
        """What ``/health`` shows without the bearer token."""
        return {"status": "ok"}

    @classmethod
    def from_path(cls, model: str | Path, provider: str = "auto", threads: int | None = None,
                  tokenizer: str | Path | None = None, adapter: str | None = None,
                  chat_template: str | Path | None = "auto", **kw) -> "GenerationService":
        """``chat_template``: ``"auto"`` (the template beside the tokenizer, if any), ``"none"`` / None
        (messages joined by newlines), or a ``.jinja`` / ``tokenizer_config.json`` file."""
        tok = Path(tokenizer) if tokenizer is not None else Path(model).parent
        folder = tok if tok.is_dir() else tok.parent
        template = None
        if chat_template not in (None, "none"):
            template = load_chat_template(folder, None if chat_template == "auto" else chat_template)
        lm = CausalLM(model, tokenizer=tokenizer, provider=provider, threads=threads, adapter=adapter)
        return cls(lm, chat_template=template, **kw)

    def health(self) -> dict:
        sess = self.lm.session
        meta = {k: v for k, v in sess.metadata.items() if k in ("quantseal.version", "quantseal.family",
                                                                  "quantseal.model_type")}
        return {"status": "ok", "model": sess.path.name, "provider": sess.provider, "output": "logits",
                "vocab_size": self.vocab_out, "max_batch": self.max_batch, "max_tokens": self.max_tokens,
                "max_new_tokens": self.max_new_tokens, "metadata": meta,
                "chat_template": None if self.chat_template is None else Path(self.chat_template.origin).name,
                **({"adapters": sorted(self.lm.adapter_names, key=self.lm.adapter_names.get),
                    "adapter": self.lm.adapter} if self.lm.switchable else {})}

    def _ids(self, rows: list[list[int]]) -> None:
        if min(min(r) for r in rows) < 0 or max(max(r) for r in rows) >= self.vocab_out:
            raise RequestError(f"token ids must lie in [0, {self.vocab_out})")

    def generate(self, payload) -> dict:
        if not isinstance(payload, dict) or ("prompt" in payload) == ("input_ids" in payload):
            raise RequestError("the body must be a JSON object with exactly one of 'prompt' or 'input_ids'")
        n = payload.get("max_new_tokens", 20)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.max_new_tokens:
            raise RequestError(f"'max_new_tokens' must be an integer in [0, {self.max_new_tokens}]")
        if "prompt" in payload:
            if not isinstance(payload["prompt"], str) or not payload["prompt"]:
                raise RequestError("'prompt' must be a non-empty string")
            self.check_text(payload["prompt"], "'prompt'")
            ids = self.lm.encode(payload["prompt"])
            if not ids:
                raise RequestError("the prompt encodes to no tokens")
        else:
            ids = _int_matrix([payload["input_ids"]], "input_ids", 1, self.max_tokens, ragged=True)[0]
            self._ids([ids])
        if len(ids) + n > self.max_tokens:
            raise RequestError(f"prompt of {len(ids)} tokens + {n} new exceeds {self.max_tokens}")
        adapter = request_adapter(self.lm, payload)
        with self.lock:
            new = self.lm.generate_ids(ids, n, adapter=adapter)
        return {"text": self.lm.decode(new), "ids": new, "n": len(new)}

    def logits(self, payload) -> dict:
        if not isinstance(payload, dict) or "input_ids" not in payload:
            raise RequestError("the body must be a JSON object with 'input_ids' (list of lists of ints)")
        rows = _int_matrix(payload["input_ids"], "input_ids", self.max_batch, self.max_tokens, ragged=True)
        self._ids(rows)
        tokens = payload.get("tokens")
        if tokens is not None:
            tokens = _int_matrix([tokens], "tokens", 1, self.vocab_out, ragged=True)[0]
            self._ids([tokens])
        adapter = request_adapter(self.lm, payload)
        with self.lock:  # right-padded: the real tokens keep positions 0..len-1
            last = self.lm.next_logits(rows, tokens, adapter)
        return {"logits": last.tolist(), "n": int(last.shape[0]), "dim": int(last.shape[1])}


def service_for(model: str | Path, provider: str = "auto", threads: int | None = None,
                tokenizer: str | Path | None = None, max_batch: int = MAX_BATCH, max_chars: int = MAX_CHARS,
                max_length: int | None = None, adapter: str | None = None, chat_template: str | Path | None = "auto"):
    """The service an exported file calls for: :class:`GenerationService` for a decoder (a
    ``logits`` output), else :class:`EmbeddingService`."""
    from .session import Session

    outputs = Session(model, provider="cpu").output_names
    cls = GenerationService if "logits" in outputs else EmbeddingService
    extra = {} if max_length is None else {"max_length": max_length}  # embedders' truncation length
    if extra and cls is GenerationService:
        raise BadInput("--max-length applies to embedding models; this is a decoder")
    if adapter is not None:
        extra["adapter"] = adapter
    if cls is GenerationService:
        extra["chat_template"] = chat_template
    elif chat_template not in (None, "auto", "none"):
        raise BadInput("--chat-template applies to decoders (/v1/chat/completions); this is an embedding model")
    return cls.from_path(model, provider=provider, threads=threads, tokenizer=tokenizer, max_batch=max_batch,
                         max_chars=max_chars, **extra)


def make_server(service: EmbeddingService | GenerationService, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None, limits: Limits | None = None) -> HTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see :func:`server_url`).
    ``token``: the bearer token every route but ``/health`` then needs."""
    return HTTPServer(service, host, port, token=token, limits=limits)


def server_url(server: HTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
