"""Query a suspect through the OpenAI-compatible APIs stolen models are really served with
(vLLM, llama.cpp server, text-embeddings-inference, ...): the functions verification needs.

``OpenAIEmbeddings`` is an ``embed_fn`` over texts (``verify(..., inputs="text")``):
``POST /v1/embeddings {"model", "input": [texts]}`` → ``data[i].embedding`` (re-ordered by
``data[i].index``).  Encoder trigger texts re-tokenise to exactly their ids (:mod:`quantseal.keys`),
so the suspect sees the triggers the board was trained on.

``OpenAITargets`` is a decoder ``logits_fn(id_lists, tokens)`` →
(B, len(tokens)) for :func:`quantseal.runtime.verify.decode_bits_decoder`, read from
``POST /v1/completions`` (prompts batched) or ``POST /v1/chat/completions`` (one user message per
query), each asked for one greedy token (``max_tokens: 1, temperature: 0``).  The decoder
statistic of bit i is a difference of ``z[a_i] − z[b_i]`` between a trigger and its control
(target pair ``(a_i, b_i)`` from :func:`quantseal.keys.derive_targets`).  What stands in for z:

- **top-k log-probabilities** (``logprobs``/``top_logprobs``): log-probabilities differ from
  logits by one constant per sequence, so ``lp[a] − lp[b] = z[a] − z[b]`` exactly when both are
  listed.  A target outside the top k is censored: its probability lies in (0, p_min] (p_min the
  smallest listed), and it is imputed at ``log(p_min / 2)``.  With one target listed the sign of
  the difference is then still right, with neither listed it is 0 (no information).
- **greedy text only**: the one observation is the top-1 token, read as the first word of the
  continuation (a target is a whole-word token, so its text is ``" word"``).  ``z`` is the
  indicator of that token: ``z[a] − z[b] ∈ {+1, 0, −1}`` (a is top-1 / neither / b is top-1), and
  the bit statistic is the mean over the bit's triggers of ``[top1 = a] − [top1 = b]`` after the
  trigger minus the same after its control.  A bit none of whose triggers puts a target at top-1
  reads 0 (decoded as bit 0: against an innocent codeword still a fair coin).  How many bits this
  reads depends on whether the board made a target top-1: ``hits`` / ``observed`` count it.

Each query's text is the trigger's own text (``texts``: ids → text, from the key's trigger set).
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..errors import BadInput
from .transport import Transport

APIS = ("quantseal", "openai-embeddings", "openai-completions", "openai-chat")
_ROUTE = {"openai-embeddings": "/v1/embeddings", "openai-completions": "/v1/completions",
          "openai-chat": "/v1/chat/completions"}
_FIRST_WORD = re.compile(r"\s*([^\W\d_]+)")
_MARKERS = ("Ġ", "▁", "##")


def api_base(url: str) -> str:
    """The server root of an OpenAI-style URL: a trailing ``/v1`` or route is dropped."""
    base = url.rstrip("/")
    for suffix in (*_ROUTE.values(), "/v1"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _field(obj, *path):
    """``obj[path[0]][path[1]]...`` or None where anything along the way is missing or mistyped."""
    for p in path:
        if isinstance(p, int):
            if not isinstance(obj, list) or not -len(obj) <= p < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[p] if isinstance(p, int) else obj.get(p)
    return obj


class OpenAIEmbeddings:
    """An ``embed_fn`` over texts through ``POST /v1/embeddings``; float32 (len(texts), H)."""

    def __init__(self, transport: Transport, model: str | None = None):
        self.transport, self.model = transport, model
        self.route = _ROUTE["openai-embeddings"]

    def __call__(self, texts) -> np.ndarray:
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise BadInput("the /v1/embeddings API takes texts (verify with inputs='text')")
        payload = {"input": list(texts), "encoding_format": "float"}
        if self.model:
            payload["model"] = self.model
        out = self.transport.post(self.route, payload)
        data = out.get("data")
        url = self.transport.url(self.route)
        if not isinstance(data, list) or len(data) != len(texts):
            raise BadInput(f"{url}: expected 'data' with {len(texts)} embeddings")
        rows = [None] * len(texts)
        for k, item in enumerate(data):
            i = _field(item, "index")
            i = k if i is None else i
            if not isinstance(i, int) or not 0 <= i < len(texts) or rows[i] is not None:
                raise BadInput(f"{url}: bad or repeated 'index' in the answer's data")
            rows[i] = _field(item, "embedding")
        try:
            e = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadInput(f"{url}: the answer's embeddings are not a numeric matrix") from None
        if e.ndim != 2:
            raise BadInput(f"{url}: the answer's embeddings have shape {list(e.shape)}")
        return e


class OpenAITargets:
    """A decoder ``logits_fn(id_lists, tokens)`` through ``/v1/completions`` (``api="completions"``)
    or ``/v1/chat/completions`` (``api="chat"``).

    ``texts``: token ids (tuple) → the text to send; ``words``: target token id → its word
    (:func:`quantseal.keys.token_word`).  ``logprobs=True`` asks for the top ``top_k``
    log-probabilities and falls back to the greedy text when the first answer has none;
    ``False`` reads the text only.  After a call, ``mode`` is ``"logprobs"`` or ``"text"``,
    ``observed`` the sequences read and ``hits`` those whose top-1 token was one of the targets."""

    def __init__(self, transport: Transport, api: str, texts: dict, words: dict, model: str | None = None,
                 logprobs: bool = True, top_k: int = 20):
        if api not in ("completions", "chat"):
            raise BadInput(f"unknown decoder API {api!r} (completions, chat)")
        if not 1 <= top_k <= 20:
            raise BadInput(f"top_logprobs must be in 1..20, not {top_k}")
        self.transport, self.api, self.model = transport, api, model
        self.texts, self.words = dict(texts), {int(k): str(v) for k, v in words.items()}
        self.want_logprobs, self.top_k = bool(logprobs), int(top_k)
        self.route = _ROUTE[f"openai-{api}"]
        self.mode: str | None = None if logprobs else "text"
        self.observed = self.hits = 0

    # ------------------------------------------------------------------ queries
    def _payload(self) -> dict:
        p = {"max_tokens": 1, "temperature": 0}
        if self.model:
            p["model"] = self.model
        if self.mode != "text":
            if self.api == "chat":
                p.update(logprobs=True, top_logprobs=self.top_k)
            else:
                p["logprobs"] = self.top_k
        return p

    def _ask(self, prompts: list[str]) -> list[tuple[str, dict | None]]:
        """(continuation text, {token text: logprob} or None) per prompt."""
        url = self.transport.url(self.route)
        if self.api == "completions":
            out = self.transport.post(self.route, {**self._payload(), "prompt": prompts})
            choices = _field(out, "choices")
            if not isinstance(choices, list) or len(choices) != len(prompts):
                raise BadInput(f"{url}: expected {len(prompts)} choices")
            got = [None] * len(prompts)
            for k, c in enumerate(choices):
                i = _field(c, "index")
                i = k if i is None else i
                if not isinstance(i, int) or not 0 <= i < len(prompts) or got[i] is not None:
                    raise BadInput(f"{url}: bad or repeated 'index' in the answer's choices")
                top = _field(c, "logprobs", "top_logprobs", 0)
                got[i] = (_field(c, "text"), top if isinstance(top, dict) else None)
            return got
        got = []
        for prompt in prompts:
            payload = {**self._payload(), "messages": [{"role": "user", "content": prompt}]}
            c = _field(self.transport.post(self.route, payload), "choices", 0)
            if c is None:
                raise BadInput(f"{url}: the answer has no choices")
            top = _field(c, "logprobs", "content", 0, "top_logprobs")
            table = None
            if isinstance(top, list):
                table = {}
                for e in top:
                    tok, lp = _field(e, "token"), _field(e, "logprob")
                    if isinstance(tok, str) and isinstance(lp, (int, float)) and not isinstance(lp, bool):
                        table[tok] = max(float(lp), table.get(tok, -math.inf))
            got.append((_field(c, "message", "content"), table))
        return got

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _word(token: str) -> str:
        t = token.strip()
        for m in _MARKERS:
            if t.startswith(m):
                t = t[len(m):]
        return t

    def _from_logprobs(self, table: dict, tokens: list[int], url: str) -> np.ndarray:
        lps = {}
        for tok, lp in table.items():
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp) or lp > 1e-6:
                raise BadInput(f"{url}: a log-probability in the answer is not a finite number <= 0")
            w = self._word(tok)
            lps[w] = max(lps.get(w, -math.inf), float(lp))
        if not lps:
            raise BadInput(f"{url}: the answer's top log-probabilities are empty")
        floor = min(lps.values()) - math.log(2.0)  # a censored target: probability in (0, p_min]
        return np.array([lps.get(self.words[t], floor) for t in tokens])

    def _from_text(self, text, tokens: list[int], url: str) -> np.ndarray:
        if not isinstance(text, str):
            raise BadInput(f"{url}: the answer has no text")
        m = _FIRST_WORD.match(text)
        word = m.group(1) if m else ""
        return np.array([1.0 if self.words[t] == word else 0.0 for t in tokens])

    def __call__(self, id_lists, tokens) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        missing = [t for t in tokens if t not in self.words]
        if missing:
            raise BadInput(f"no word for target token {missing[0]}")
        try:
            prompts = [self.texts[tuple(int(x) for x in row)] for row in id_lists]
        except KeyError:
            raise BadInput("a queried sequence is not one of the key's trigger or control texts") from None
        url = self.transport.url(self.route)
        out = np.zeros((len(prompts), len(tokens)))
        for i, (text, table) in enumerate(self._ask(prompts)):
            if self.mode is None:
                self.mode = "logprobs" if table is not None else "text"
            if self.mode == "logprobs":
                if table is None:
                    raise BadInput(f"{url}: some answers carry log-probabilities and some do not")
                out[i] = self._from_logprobs(table, tokens, url)
                top1 = max(table, key=table.get)
                hit = self._word(top1) in {self.words[t] for t in tokens}
            else:
                out[i] = self._from_text(text, tokens, url)
                hit = bool(out[i].any())
            self.observed += 1
            self.hits += int(hit)
        return out
