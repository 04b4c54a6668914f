"""A client of ``quantseal serve`` (or any endpoint speaking its JSON): standard library + numpy.

``EndpointEmbedder(url).embed(texts)`` → float32 (n, H); ``.embed_ids(batch)`` takes a token
batch (``{"input_ids": (B, T), "attention_mask": (B, T), ...}`` numpy arrays or lists), so it can
stand in for a local model wherever a token-level ``embed_fn`` is expected (black-box
verification).  ``EndpointCausalLM(url)`` is the decoder side: ``generate(prompt)`` and
``next_logits(id_lists, tokens)``.  Every failure, an endpoint that does not answer included, is a
:class:`~quantseal.errors.BadInput` naming the URL; deadlines, the answer size cap, retries
and authentication headers are the :class:`~quantseal.runtime.transport.Transport`'s.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .transport import Transport


class EndpointEmbedder:
    """Embeddings from an HTTP endpoint.  ``url``: its base (``http://127.0.0.1:8000``) or its
    ``/embed`` address; ``timeout``: seconds per query; ``adapter``: a switchable export's adapter,
    sent as ``"adapter"`` in every request (None: the server's); further keywords (``deadline``,
    ``max_bytes``, ``qps``, ``headers``, ``retries``) go to the :class:`~.transport.Transport`."""

    def __init__(self, url: str, timeout: float = 60.0, adapter: str | None = None, **transport):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadInput(f"{url!r}: an endpoint URL starts with http:// or https://")
        base = url.rstrip("/")
        if base.endswith("/embed"):
            base = base[: -len("/embed")]
        self.base = base
        self.timeout = timeout
        self.adapter = adapter
        self.transport = Transport(base, timeout=timeout, **transport)

    def _request(self, path: str, payload: dict | None = None) -> dict:
        if payload is not None and self.adapter is not None:
            payload = {**payload, "adapter": self.adapter}
        return self.transport.request("GET" if payload is None else "POST", path, payload)

    def health(self) -> dict:
        return self._request("/health")

    def _embeddings(self, payload: dict, n: int) -> np.ndarray:
        out = self._request("/embed", payload)
        try:
            vectors = np.asarray(out["embeddings"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{self.base}/embed: the answer has no numeric 'embeddings' matrix") from exc
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise BadInput(f"{self.base}/embed: expected {n} embeddings, got an array of shape {list(vectors.shape)}")
        return vectors

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), H)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise BadInput("no texts to embed")
        return self._embeddings({"texts": texts}, len(texts))

    def embed_ids(self, batch) -> np.ndarray:
        """A token batch → float32 (B, H).  ``batch``: a dict with ``input_ids`` and optionally
        ``attention_mask`` / ``token_type_ids`` (arrays or nested lists), or a list of id lists."""
        if not isinstance(batch, dict):
            batch = {"input_ids": batch}
        if "input_ids" not in batch:
            raise BadInput("a token batch needs 'input_ids'")
        payload = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            value = batch.get(key)
            if value is None:
                continue
            payload[key] = [[int(x) for x in row] for row in (value.tolist() if hasattr(value, "tolist") else value)]
        return self._embeddings(payload, len(payload["input_ids"]))

    def __call__(self, batch) -> np.ndarray:
        """An ``embed_fn`` for verification: a list of texts, or a token batch (dict)."""
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(t, str) for t in batch):
            return self.embed(list(batch))
        return self.embed_ids(batch)

    def __repr__(self) -> str:
        return f"EndpointEmbedder({self.base!r})"


class EndpointCausalLM(EndpointEmbedder):
    """A decoder served by ``quantseal serve``: greedy ``/generate`` and next-token ``/logits``."""

    def __init__(self, url: str, timeout: float = 60.0, adapter: str | None = None, **transport):
        super().__init__(url, timeout, adapter, **transport)
        for suffix in ("/generate", "/logits"):
            if self.base.endswith(suffix):
                self.base = self.base[: -len(suffix)]
                self.transport = Transport(self.base, timeout=timeout, **transport)

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        out = self._request("/generate", {"prompt": prompt, "max_new_tokens": int(max_new_tokens)})
        if not isinstance(out.get("text"), str):
            raise BadInput(f"{self.base}/generate: the answer has no 'text'")
        return out["text"]

    def next_logits(self, id_lists, tokens=None) -> np.ndarray:
        """float32 (len(id_lists), len(tokens) or V): each sequence's next-token logits."""
        payload = {"input_ids": [[int(x) for x in row] for row in id_lists]}
        if tokens is not None:
            payload["tokens"] = [int(t) for t in tokens]
        out = self._request("/logits", payload)
        try:
            logits = np.asarray(out["logits"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{self.base}/logits: the answer has no numeric 'logits' matrix") from exc
        want = len(payload["input_ids"])
        if logits.ndim != 2 or logits.shape[0] != want or (tokens is not None and logits.shape[1] != len(tokens)):
            raise BadInput(f"{self.base}/logits: expected {want} rows, got an array of shape {list(logits.shape)}")
        return logits

    def __repr__(self) -> str:
        return f"EndpointCausalLM({self.base!r})"
