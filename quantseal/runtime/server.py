"""HTTP serving of an exported model, embedding or decoder: the black-box endpoint (DESIGN §6).

Standard library only (``http.server.ThreadingHTTPServer``), onnxruntime underneath; no torch.

=========================  ==================================================================
request                    answer
=========================  ==================================================================
``GET /health``            ``{"status": "ok", "model", "provider", "dim", "inputs", ...}``
``POST /embed``            body ``{"texts": ["...", ...]}`` → ``{"embeddings": [[...], ...]}``
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

Every answer is JSON.  A malformed request (not JSON, missing or mistyped fields, an empty or
too-large batch, token ids outside the vocabulary, ...) gets HTTP 400 ``{"error": "..."}``; an
unknown path 404, a wrong method 405, an over-long body 413.  The server keeps serving after any of
them.  Inference runs one request at a time (a lock): onnxruntime already uses the cores.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from ..errors import BadInput
from .pipelines import CausalLM, Embedder

log = logging.getLogger(__name__)

MAX_BATCH = 256
MAX_TOKENS = 512  # per row of a token-level query (BERT's position table)
MAX_BODY = 16 << 20  # bytes
MAX_NEW_TOKENS = 256


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a message for the client."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


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
    if not ragged and len({len(r) for r in value}) != 1:
        raise RequestError(f"rows of '{field}' differ in length; pad them or omit 'attention_mask'")
    return value


class EmbeddingService:
    """The request logic, independent of HTTP: validate a JSON payload, run the model, answer."""

    def __init__(self, embedder: Embedder, max_batch: int = MAX_BATCH, max_tokens: int = MAX_TOKENS):
        if max_batch < 1 or max_tokens < 1:
            raise BadInput("max_batch and max_tokens must be at least 1")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.vocab_size = embedder.tokenizer.vocab_size
        self._lock = threading.Lock()
        self.dim = int(self._run_texts(["ok"]).shape[1])  # warm-up; also proves the model runs
        self.routes = {"/embed": self.embed}
        self.provider = embedder.provider

    @classmethod
    def from_path(cls, model: str | Path, provider: str = "auto", threads: int | None = None,
                  tokenizer: str | Path | None = None, max_length: int | None = None, **kw) -> "EmbeddingService":
        return cls(Embedder(model, tokenizer=tokenizer, provider=provider, threads=threads, max_length=max_length), **kw)

    def health(self) -> dict:
        sess = self.embedder.session
        meta = {k: v for k, v in sess.metadata.items() if k in ("quantseal.version", "quantseal.family",
                                                                  "quantseal.model_type", "quantseal.pooling")}
        return {"status": "ok", "model": sess.path.name, "provider": sess.provider, "dim": self.dim,
                "inputs": sess.input_names, "output": "sentence_embedding", "vocab_size": self.vocab_size,
                "max_batch": self.max_batch, "max_tokens": self.max_tokens, "metadata": meta}

    def _run_texts(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.embedder.embed(texts)

    def _run_ids(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            return self.embedder.session.run(feeds, ["sentence_embedding"])["sentence_embedding"]

    def embed(self, payload) -> dict:
        """A decoded JSON payload → the answer dict; :class:`RequestError` when it is malformed."""
        if not isinstance(payload, dict):
            raise RequestError("the body must be a JSON object with 'texts' or 'input_ids'")
        if ("texts" in payload) == ("input_ids" in payload):
            raise RequestError("give exactly one of 'texts' (list of strings) or 'input_ids' (list of lists of ints)")
        if "texts" in payload:
            texts = payload["texts"]
            if not isinstance(texts, list) or not texts:
                raise RequestError("'texts' must be a non-empty list of strings")
            if len(texts) > self.max_batch:
                raise RequestError(f"batch of {len(texts)} texts is too large (at most {self.max_batch} per request)")
            if not all(isinstance(t, str) for t in texts):
                raise RequestError("'texts' must hold strings only")
            vectors = self._run_texts(texts)
        else:
            vectors = self._run_ids(self._id_feeds(payload))
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
                 max_new_tokens: int = MAX_NEW_TOKENS):
        if max_batch < 1 or max_tokens < 1 or max_new_tokens < 0:
            raise BadInput("max_batch and max_tokens must be at least 1, max_new_tokens non-negative")
        self.lm = lm
        self.max_batch, self.max_tokens, self.max_new_tokens = max_batch, max_tokens, max_new_tokens
        self.vocab_size = int(lm.tokenizer.get_vocab_size())
        self._lock = threading.Lock()
        self.routes = {"/generate": self.generate, "/logits": self.logits}
        self.provider = lm.provider
        with self._lock:  # warm-up; also proves the model runs
            self.vocab_out = int(lm.logits(np.array([[0]]))[0].shape[-1])

    @classmethod
    def from_path(cls, model: str | Path, provider: str = "auto", threads: int | None = None,
                  tokenizer: str | Path | None = None, **kw) -> "GenerationService":
        return cls(CausalLM(model, tokenizer=tokenizer, provider=provider, threads=threads), **kw)

    def health(self) -> dict:
        sess = self.lm.session
        meta = {k: v for k, v in sess.metadata.items() if k in ("quantseal.version", "quantseal.family",
                                                                  "quantseal.model_type")}
        return {"status": "ok", "model": sess.path.name, "provider": sess.provider, "output": "logits",
                "vocab_size": self.vocab_out, "max_batch": self.max_batch, "max_tokens": self.max_tokens,
                "max_new_tokens": self.max_new_tokens, "metadata": meta}

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
            ids = self.lm.encode(payload["prompt"])
            if not ids:
                raise RequestError("the prompt encodes to no tokens")
        else:
            ids = _int_matrix([payload["input_ids"]], "input_ids", 1, self.max_tokens, ragged=True)[0]
            self._ids([ids])
        if len(ids) + n > self.max_tokens:
            raise RequestError(f"prompt of {len(ids)} tokens + {n} new exceeds {self.max_tokens}")
        with self._lock:
            new = self.lm.generate_ids(ids, n)
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
        with self._lock:  # right-padded: the real tokens keep positions 0..len-1
            last = self.lm.next_logits(rows, tokens)
        return {"logits": last.tolist(), "n": int(last.shape[0]), "dim": int(last.shape[1])}


def service_for(model: str | Path, provider: str = "auto", threads: int | None = None,
                tokenizer: str | Path | None = None, max_batch: int = MAX_BATCH, max_length: int | None = None):
    """The service an exported file calls for: :class:`GenerationService` for a decoder (a
    ``logits`` output), else :class:`EmbeddingService`."""
    from .session import Session

    outputs = Session(model, provider="cpu").output_names
    cls = GenerationService if "logits" in outputs else EmbeddingService
    extra = {} if max_length is None else {"max_length": max_length}  # embedders' truncation length
    if extra and cls is GenerationService:
        raise BadInput("--max-length applies to embedding models; this is a decoder")
    return cls.from_path(model, provider=provider, threads=threads, tokenizer=tokenizer, max_batch=max_batch, **extra)


class _Handler(BaseHTTPRequestHandler):
    server_version = "quantseal"
    protocol_version = "HTTP/1.1"
    service: EmbeddingService | GenerationService  # set on the subclass made by make_server

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message, "status": status})

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(HTTPStatus.OK, self.service.health())
        elif path in self.service.routes:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST {path} with a JSON body")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r} ({self._paths()})")

    def _paths(self) -> str:
        return describe_routes(self.service)

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
            try:
                n = int(length)
            except ValueError:
                self.close_connection = True
                raise RequestError("bad Content-Length") from None
            if n < 0 or n > MAX_BODY:
                self.close_connection = True  # the body is not read: the connection cannot be reused
                raise RequestError(f"body of {n} bytes is too large (at most {MAX_BODY})",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            raw = self.rfile.read(n)
            if path not in self.service.routes:
                raise RequestError(f"no such path {path!r} ({self._paths()})", HTTPStatus.NOT_FOUND)
            try:
                payload = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(f"the body is not valid JSON ({exc})") from None
            self._send(HTTPStatus.OK, self.service.routes[path](payload))
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except BadInput as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # a bug or a runtime failure: answer, log, keep serving
            log.exception("error while answering %s", path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__})")


def make_server(service: EmbeddingService | GenerationService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see :func:`server_url`)."""
    handler = type("Handler", (_Handler,), {"service": service})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def describe_routes(service) -> str:
    """``POST /embed, GET /health`` (or the decoder's routes) for a startup message."""
    return ", ".join([*(f"POST {p}" for p in service.routes), "GET /health"])
