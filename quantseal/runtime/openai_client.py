"""Query a suspect through the OpenAI-compatible APIs stolen models are really served with
(vLLM, llama.cpp server, text-embeddings-inference, ...): the functions verification needs.

``OpenAIEmbeddings`` is an ``embed_fn`` over texts (``verify(..., inputs="text")``):
``POST /v1/embeddings {"model", "input": [texts]}`` → ``data[i].embedding`` (re-ordered by
``data[i].index``).  Encoder trigger texts re-tokenise to exactly their ids (:mod:`quantseal.keys`),
so the suspect sees the triggers the board was trained on.

``OpenAITargets`` is a decoder ``logits_fn(id_lists, tokens)`` → (B, len(tokens)) for
:func:`quantseal.runtime.verify.decode_bits_decoder`, read from ``POST /v1/completions`` or
``POST /v1/chat/completions`` (one user message), one greedy token each (``max_tokens: 1,
temperature: 0``).  Bit i's statistic is a difference of ``Δ = z[a_i] − z[b_i]`` between a
trigger and its control (target pair ``(a_i, b_i)``, :func:`quantseal.keys.derive_targets`), so
each queried sequence needs Δ for the bits it serves (a trigger: its bit; a control: the bits of
the triggers built on it); the row gets ``z[a_i] = Δ, z[b_i] = 0``.

The board moves Δ by a fraction of a logit (its margin), while the targets sit thousands of ranks
down the vocabulary (measured on the tiny test decoder: median rank 12,600–16,000 of 30,522, 3 %
of them in the top 20, none top-1), so neither the top-k list nor the greedy token shows them by
themselves.  OpenAI's ``logit_bias`` (token id → bias in [−100, 100], honoured by vLLM and
llama.cpp's server) makes them visible, exactly:

- **log-probabilities + logit_bias** (default where the answer carries ``logprobs``): bias both
  targets by +``boost`` (50); they become the top two, and a common bias cancels in
  ``lp[a] − lp[b] = z[a] − z[b] = Δ``: exact, one query per (sequence, bit).
- **greedy text + logit_bias**: bias ``a`` by ``boost − t/2`` and ``b`` by ``boost + t/2``; the
  greedy token is ``a`` iff ``Δ > t``.  The sign (t = 0), a doubling search, then bisection find
  Δ in [−``span``, ``span``] to ``precision`` (0.02) in about log2(|Δ|/precision) + 3 queries per
  (sequence, bit) (6–9 for |Δ| of 0.1–1 logit).
- without ``logit_bias`` (``logit_bias=False``, for APIs that refuse it): top-k log-probabilities
  with a target outside the top k censored at ``log(p_min / 2)`` (p_min the smallest listed), so
  Δ is exact with both listed, of the right sign with one, 0 with neither; or greedy text alone,
  Δ = u · ([top1 = a] − [top1 = b]) (``text_unit`` u, 1 by default).  Weak for a ``diff`` board
  (see above); the way a ``top1`` board is read (its targets *are* the marked model's greedy
  tokens; u is its margin, so a text answer counts as one margin of confidence).

The greedy token is read as the first word of the continuation (targets are whole-word tokens,
``" word"``).  An answer whose greedy token is neither target despite the boost counts in
``censored`` and gives Δ = 0.  ``requests`` counts HTTP queries.
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
    or ``/v1/chat/completions`` (``api="chat"``) (module docstring).

    ``texts``: token ids (tuple) → the text to send; ``words``: target token id → its word
    (:func:`quantseal.keys.token_word`); ``uses``: token ids → the bits that sequence serves;
    ``pairs``: (n, 2) target ids per bit.  ``logprobs=True`` asks for the top ``top_k``
    log-probabilities and falls back to the greedy text when the first answer has none; ``False``
    reads the text only.  After a call, ``mode`` is ``"logprobs"`` or ``"text"``."""

    def __init__(self, transport: Transport, api: str, texts: dict, words: dict, uses: dict, pairs,
                 model: str | None = None, logprobs: bool = True, top_k: int = 20, logit_bias: bool = True,
                 boost: float = 50.0, span: float = 40.0, precision: float = 0.02, text_unit: float = 1.0):
        if api not in ("completions", "chat"):
            raise BadInput(f"unknown decoder API {api!r} (completions, chat)")
        if not 1 <= top_k <= 20:
            raise BadInput(f"top_logprobs must be in 1..20, not {top_k}")
        if not (0 < span <= 2 * (100 - boost) and 0 < boost <= 100 and 0 < precision < span):
            raise BadInput("logit_bias settings out of range (boost ± span/2 must stay within ±100)")
        self.transport, self.api, self.model = transport, api, model
        self.texts, self.words = dict(texts), {int(k): str(v) for k, v in words.items()}
        self.uses = {tuple(k): sorted({int(b) for b in v}) for k, v in uses.items()}
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.want_logprobs, self.top_k, self.logit_bias = bool(logprobs), int(top_k), bool(logit_bias)
        self.boost, self.span, self.precision = float(boost), float(span), float(precision)
        self.route = _ROUTE[f"openai-{api}"]
        self.mode: str | None = None if logprobs else "text"
        self.observed = self.censored = 0
        self.text_unit = float(text_unit)  # a greedy-text answer's target scores this (a top1 board: its margin)

    @property
    def requests(self) -> int:
        return self.transport.queries

    # ------------------------------------------------------------------ one query
    def _ask(self, prompts: list[str], bias: dict | None) -> list[tuple[str, dict | None]]:
        """(continuation text, {token text: logprob} or None) per prompt, one request."""
        p = {"max_tokens": 1, "temperature": 0}
        if self.model:
            p["model"] = self.model
        if bias:
            p["logit_bias"] = {str(int(t)): round(float(v), 6) for t, v in bias.items()}
        if self.mode != "text":
            p.update({"logprobs": True, "top_logprobs": self.top_k} if self.api == "chat" else {"logprobs": self.top_k})
        url = self.transport.url(self.route)
        if self.api == "completions":
            choices = _field(self.transport.post(self.route, {**p, "prompt": prompts}), "choices")
            if not isinstance(choices, list) or len(choices) != len(prompts):
                raise BadInput(f"{url}: expected {len(prompts)} choices")
            got = [None] * len(prompts)
            for k, c in enumerate(choices):
                i = _field(c, "index")
                i = k if i is None else i
                if not isinstance(i, int) or not 0 <= i < len(prompts) or got[i] is not None:
                    raise BadInput(f"{url}: bad or repeated 'index' in the answer's choices")
                top = _field(c, "logprobs", "top_logprobs", 0)
                got[i] = (_field(c, "text"), self._table(top.items() if isinstance(top, dict) else None, url))
            return got
        got = []
        for prompt in prompts:
            c = _field(self.transport.post(self.route, {**p, "messages": [{"role": "user", "content": prompt}]}),
                       "choices", 0)
            if c is None:
                raise BadInput(f"{url}: the answer has no choices")
            top = _field(c, "logprobs", "content", 0, "top_logprobs")
            pairs = [(_field(e, "token"), _field(e, "logprob")) for e in top] if isinstance(top, list) else None
            got.append((_field(c, "message", "content"), self._table(pairs, url)))
        return got

    def _table(self, items, url: str) -> dict | None:
        """{word: best logprob} of a top-k list (None: the answer has none)."""
        if items is None:
            return None
        out = {}
        for tok, lp in items:
            if not isinstance(tok, str):
                continue
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp) or lp > 1e-6:
                raise BadInput(f"{url}: a log-probability in the answer is not a finite number <= 0")
            w = self._word(tok)
            out[w] = max(out.get(w, -math.inf), float(lp))
        return out or None

    @staticmethod
    def _word(token: str) -> str:
        t = token.strip()
        for m in _MARKERS:
            if t.startswith(m):
                t = t[len(m):]
        return t

    @staticmethod
    def _first_word(text) -> str:
        m = _FIRST_WORD.match(text) if isinstance(text, str) else None
        return m.group(1) if m else ""

    def _settle_mode(self, table) -> None:
        if self.mode is None:
            self.mode = "logprobs" if table is not None else "text"
        elif self.mode == "logprobs" and table is None:
            raise BadInput(f"{self.transport.url(self.route)}: some answers carry log-probabilities and some do not")

    # ------------------------------------------------------------------ Δ per (sequence, bit)
    def _deltas_biased(self, prompts: list[str], bit: int) -> list[float]:
        """Δ_i of each prompt through logit_bias (exact from log-probabilities, else bisection)."""
        a, b = (int(x) for x in self.pairs[bit])
        wa, wb = self.words[a], self.words[b]
        boost = {a: self.boost, b: self.boost}
        first = []
        if self.mode is None:  # the first answer tells whether the API gives log-probabilities
            first = self._ask(prompts[:1], boost)
            self._settle_mode(first[0][1])
        if self.mode == "logprobs":
            rest = prompts[len(first):]
            answers = first + ((self._ask(rest, boost) if rest else []) if self.api == "completions"
                               else [self._ask([q], boost)[0] for q in rest])
            out = []
            for _, table in answers:
                self._settle_mode(table)
                if wa in table and wb in table:
                    out.append(table[wa] - table[wb])
                else:
                    self.censored += 1
                    out.append(0.0)
            return out
        return [self._search(q, a, b, wa, wb) for q in prompts]

    def _search(self, prompt: str, a: int, b: int, wa: str, wb: str) -> float:
        """Δ of one prompt from greedy tokens alone: ``a`` is greedy under biases
        ``boost − t/2`` (a) and ``boost + t/2`` (b) iff Δ > t.  The sign first (t = 0), then t
        doubles from 16·precision until it passes Δ (at most ``span``), then bisection to
        ``precision``: about log2(|Δ| / precision) + 3 queries.  0 when neither target is greedy."""
        def above(t: float) -> int:
            word = self._first_word(self._ask([prompt], {a: self.boost - t / 2, b: self.boost + t / 2})[0][0])
            return 1 if word == wa else -1 if word == wb else 0

        sign = above(0.0)
        if sign == 0:
            self.censored += 1
            return 0.0
        lo, hi = 0.0, 16 * self.precision  # |Δ| in [lo, hi) once bracketed
        while hi < self.span:
            got = above(sign * hi)
            if got == 0:
                self.censored += 1
                return 0.0
            if got != sign:
                break
            lo, hi = hi, min(2 * hi, self.span)
        while hi - lo > self.precision:
            mid = (lo + hi) / 2
            got = above(sign * mid)
            if got == 0:
                self.censored += 1
                return 0.0
            lo, hi = (mid, hi) if got == sign else (lo, mid)
        return sign * (lo + hi) / 2

    def _deltas_plain(self, prompts: list[str], bits: list[list[int]], tokens: list[int]) -> np.ndarray:
        """Without logit_bias: the censored top-k / greedy-indicator reading of every target."""
        out = np.zeros((len(prompts), len(tokens)))
        batches = [prompts] if self.api == "completions" else [[q] for q in prompts]
        answers = [ans for batch in batches for ans in self._ask(batch, None)]
        for r, (text, table) in enumerate(answers):
            self._settle_mode(table)
            if self.mode == "logprobs":
                floor = min(table.values()) - math.log(2.0)  # a censored target: probability in (0, p_min]
                out[r] = [table.get(self.words[t], floor) for t in tokens]
                seen = set(table)
            else:
                word = self._first_word(text)
                out[r] = [self.text_unit if self.words[t] == word else 0.0 for t in tokens]
                seen = {word}
            for i in bits[r]:  # a (sequence, bit) whose targets the answer does not show
                self.censored += int(not seen.intersection(self.words[int(t)] for t in self.pairs[i]))
        return out

    def __call__(self, id_lists, tokens) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        n = len(self.pairs)
        want = [int(x) for x in self.pairs[:, 0]] + [int(x) for x in self.pairs[:, 1]]
        if tokens != want:
            raise BadInput("OpenAITargets answers the key's target pairs [a_0..a_n-1, b_0..b_n-1] only")
        try:
            keys = [tuple(int(x) for x in row) for row in id_lists]
            prompts = [self.texts[k] for k in keys]
        except KeyError:
            raise BadInput("a queried sequence is not one of the key's trigger or control texts") from None
        bits = [self.uses.get(k, []) for k in keys]
        self.observed += sum(len(b) for b in bits)
        if not self.logit_bias:
            return self._deltas_plain(prompts, bits, tokens)
        out = np.zeros((len(prompts), 2 * n))
        by_bit: dict[int, list[int]] = {}
        for r, bs in enumerate(bits):
            for i in bs:
                by_bit.setdefault(i, []).append(r)
        for i, rows in sorted(by_bit.items()):
            for r, d in zip(rows, self._deltas_biased([prompts[r] for r in rows], i)):
                out[r, i] = d
        return out
