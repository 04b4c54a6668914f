"""OpenAI-compatible routes of ``quantseal serve``, so verification through them is tested locally.

=============================  ===================================================================
``POST /v1/embeddings``        (encoders) ``{"input": str | [str] | [[int]], "model"?}`` →
                               ``{"object": "list", "data": [{"index", "embedding"}], "usage"}``
``POST /v1/completions``       (decoders) ``{"prompt": str | [str], "max_tokens"?: 16,
                               "logprobs"?: 0..20, "logit_bias"?: {id: bias}}`` → ``{"choices": [{"index", "text",
                               "logprobs": {"tokens", "token_logprobs", "top_logprobs"}}]}``
``POST /v1/chat/completions``  (decoders) ``{"messages": [{"role", "content"}], "max_tokens"?,
                               "logprobs"?: bool, "top_logprobs"?: 0..20}`` → ``{"choices":
                               [{"message": {"role", "content"}, "logprobs": {"content": [...]}}]}``
``GET /v1/models``             ``{"object": "list", "data": [{"id", "object": "model", "owned_by",
                               "parent"?}]}``: the base model (the file's name) and, for a
                               switchable export, each adapter (``parent``: the base's id)
=============================  ===================================================================

**Adapters by ``model``**, as vLLM serves LoRA adapters: on a switchable export
(``export --switchable``) ``"model": NAME`` runs adapter NAME, ``"model": <the base's id>``
the base model (``adapter_id`` 0), no ``model`` the server's default (``serve --adapter``);
any other name is HTTP 404 with OpenAI's error body ``{"error": {"message", "type":
"invalid_request_error", "param": "model", "code": "model_not_found"}}``.  A file without
adapters is one model: ``model`` is echoed, not checked.  Each request feeds its own
``adapter_id``, so concurrent requests for different adapters share one session.

Decoding is greedy whatever ``temperature`` says (``n`` must be 1); ``logit_bias`` (token id →
bias in [−100, 100]) is added to the logits before the greedy choice and the log-probabilities.
A chat prompt is the messages rendered with the model's chat template
(:mod:`quantseal.runtime.chat_template`: the export folder's ``chat_template.jinja`` or
``tokenizer_config.json``, or ``serve --chat-template FILE``), tokenised without adding special
tokens, as vLLM does; a model without a template gets its messages' contents joined by newlines —
the same ids a completion prompt gets.
Log-probabilities are ``log_softmax`` of the model's logits at each generated position; a token's
text is what it adds to the decoded string (``" word"`` for a word-initial token).
"""

from __future__ import annotations

import numpy as np

from .http_server import RequestError

MAX_TOP_LOGPROBS = 20


def _int_field(payload: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = payload.get(name, default)
    if v is None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RequestError(f"'{name}' must be an integer in [{lo}, {hi}]")
    return v


def _logit_bias(payload, vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: {token id (a string): bias in [−100, 100]} added to the logits."""
    raw = payload.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > 1024:
        raise RequestError("'logit_bias' must be an object of at most 1024 token ids")
    out = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) < 12 and int(k) < vocab):
            raise RequestError(f"'logit_bias' key {k[:20]!r} is not a token id in [0, {vocab})")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not -100 <= v <= 100:
            raise RequestError("'logit_bias' values must be numbers in [-100, 100]")
        out[int(k)] = float(v)
    return out


def _common(payload) -> None:
    if not isinstance(payload, dict):
        raise RequestError("the body must be a JSON object")
    if payload.get("n", 1) != 1 or isinstance(payload.get("n", 1), bool):
        raise RequestError("only 'n': 1 is supported")
    if "model" in payload and payload["model"] is not None and not isinstance(payload["model"], str):
        raise RequestError("'model' must be a string")
    if payload.get("stream"):
        raise RequestError("streaming is not supported")
    t = payload.get("temperature", 0)
    if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0):
        raise RequestError("'temperature' must be a non-negative number")


def not_found(model: str, known: list[str]) -> RequestError:
    """HTTP 404 with OpenAI's error body for an unknown ``model``."""
    msg = f"The model {model[:100]!r} does not exist (served: {', '.join(known)})"
    return RequestError(msg, 404, body={"error": {"message": msg, "type": "invalid_request_error", "param": "model",
                                                  "code": "model_not_found"}})


def served(service) -> list[str]:
    """The ``model`` ids a service answers to: the base (the file's name), then its adapters."""
    names = service.adapter_names
    return [service.name, *sorted(names, key=names.get)]


def model_adapter(service, payload) -> int | None:
    """The ``adapter_id`` the request's ``model`` selects (module docstring); None: the server's."""
    model = payload.get("model")
    if model is None or not service.adapter_names:
        return None
    if model == service.name:
        return 0
    if model not in service.adapter_names:
        raise not_found(model, served(service))
    return service.adapter_names[model]


def models(service) -> dict:
    """``GET /v1/models``: the base model and each adapter, as vLLM lists LoRA adapters."""
    base = {"id": service.name, "object": "model", "created": 0, "owned_by": "quantseal"}
    return {"object": "list", "data": [base, *({"id": n, "object": "model", "created": 0, "owned_by": "quantseal",
                                                "parent": service.name, "root": service.name}
                                               for n in served(service)[1:])]}


def embeddings(service, payload) -> dict:
    """``/v1/embeddings`` on an :class:`~quantseal.runtime.server.EmbeddingService`."""
    _common(payload)
    fmt = payload.get("encoding_format", "float")
    if fmt not in (None, "float"):
        raise RequestError("only 'encoding_format': 'float' is supported")
    adapter = model_adapter(service, payload)
    x = payload.get("input")
    if isinstance(x, str):
        x = [x]
    if isinstance(x, list) and x and all(isinstance(t, str) for t in x):
        vectors = service.embed({"texts": x}, adapter)["embeddings"]
        tokens = None
    elif isinstance(x, list) and x and all(isinstance(r, list) for r in x):
        vectors = service.embed({"input_ids": x}, adapter)["embeddings"]
        tokens = sum(len(r) for r in x)
    else:
        raise RequestError("'input' must be a string, a non-empty list of strings or of token id lists")
    if tokens is None:
        tokens = sum(len(service.embedder.tokenizer.encode_ids(t)) for t in x)
    return {"object": "list", "model": payload.get("model") or service.name,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def token_text(tokenizer, i: int) -> str:
    """What token ``i`` adds to decoded text: ``" word"`` for a word-initial token."""
    piece = tokenizer.id_to_token(int(i)) or ""
    if piece.startswith("##"):
        return piece[2:]
    if piece.startswith(("Ġ", "▁")):
        return " " + tokenizer.decode([int(i)], skip_special_tokens=False).lstrip()
    if type(tokenizer.model).__name__ == "WordPiece":
        return " " + piece
    return tokenizer.decode([int(i)], skip_special_tokens=False)


def greedy_with_logprobs(lm, ids: list[int], n: int, k: int, bias: dict[int, float] | None = None,
                         adapter: int | None = None) -> tuple[list[int], list[float], list[list]]:
    """Greedy continuation of ``ids`` by ``n`` tokens with the KV cache: (new ids, their
    log-probabilities, the top ``k`` (id, logprob) pairs at each step, best first), the logits
    shifted by ``bias`` (token id → added logit) first, as OpenAI's ``logit_bias`` does;
    ``adapter``: a switchable export's adapter id (None: the model's default)."""
    new, lps, tops, past, feed = [], [], [], None, list(ids)
    cols = np.fromiter((bias or {}).keys(), dtype=np.int64)
    shift = np.fromiter((bias or {}).values(), dtype=np.float64)
    for _ in range(n):
        mask = np.ones((1, len(ids) + len(new)), dtype=np.int64)
        logits, past = lm.step(np.array([feed]), mask, past, adapter)
        z = logits[0, -1].astype(np.float64)
        z[cols] += shift
        lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        tok = int(np.argmax(z))
        new.append(tok)
        lps.append(float(lp[tok]))
        if k:
            best = np.argsort(-lp, kind="stable")[:k]
            tops.append([(int(j), float(lp[j])) for j in best])
        if tok in lm.eos_ids:
            break
        feed = [tok]
    return new, lps, tops


def _prompt_ids(service, text: str, what: str) -> list[int]:
    service.check_text(text, what)
    ids = service.lm.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise RequestError(f"{what} encodes to no tokens")
    return ids


def _generate(service, ids: list[int], n: int, k: int, bias: dict[int, float], adapter: int | None):
    if len(ids) + n > service.max_tokens:
        raise RequestError(f"prompt of {len(ids)} tokens + {n} new exceeds {service.max_tokens}")
    with service.lock:
        new, lps, tops = greedy_with_logprobs(service.lm, ids, n, k, bias, adapter)
    finish = "stop" if new and new[-1] in service.lm.eos_ids else "length"
    return new, lps, tops, finish


def completions(service, payload) -> dict:
    """``/v1/completions`` on a :class:`~quantseal.runtime.server.GenerationService`."""
    _common(payload)
    adapter = model_adapter(service, payload)
    if payload.get("echo"):
        raise RequestError("'echo' is not supported")
    prompts = payload.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings")
    if len(prompts) > service.max_batch:
        raise RequestError(f"batch of {len(prompts)} prompts is too large (at most {service.max_batch})")
    n = _int_field(payload, "max_tokens", 16, 0, service.max_new_tokens)
    k = _int_field(payload, "logprobs", 0, 0, MAX_TOP_LOGPROBS) if payload.get("logprobs") is not None else None
    bias = _logit_bias(payload, service.vocab_out)
    tok = service.lm.tokenizer
    ids = [_prompt_ids(service, p, f"prompt {i}") for i, p in enumerate(prompts)]  # all checked first
    choices, used = [], 0
    for i, row in enumerate(ids):
        new, lps, tops, finish = _generate(service, row, n, k or 0, bias, adapter)
        used += len(new)
        lp = None
        if k is not None:
            lp = {"tokens": [token_text(tok, t) for t in new], "token_logprobs": lps,
                  "top_logprobs": [dict((token_text(tok, j), v) for j, v in reversed(top)) for top in tops]}
        choices.append({"index": i, "text": service.lm.decode(new), "logprobs": lp, "finish_reason": finish})
    prompt_tokens = sum(len(r) for r in ids)
    return {"object": "text_completion", "model": payload.get("model") or service.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                      "total_tokens": prompt_tokens + used}}


def chat_completions(service, payload) -> dict:
    """``/v1/chat/completions`` on a :class:`~quantseal.runtime.server.GenerationService`."""
    _common(payload)
    adapter = model_adapter(service, payload)
    msgs = payload.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise RequestError("'messages' must be a non-empty list of {'role': str, 'content': str}")
    key = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    n = _int_field(payload, key, 16, 0, service.max_new_tokens)
    want = payload.get("logprobs", False)
    if not isinstance(want, bool):
        raise RequestError("'logprobs' must be true or false")
    k = _int_field(payload, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    bias = _logit_bias(payload, service.vocab_out)
    for i, m in enumerate(msgs):
        service.check_text(m["content"], f"message {i}")
    template = getattr(service, "chat_template", None)
    if template is None:
        text = "\n".join(m["content"] for m in msgs)
    else:
        try:
            text = template.render([{"role": m["role"], "content": m["content"]} for m in msgs])
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
    ids = _prompt_ids(service, text, "the conversation")
    new, lps, tops, finish = _generate(service, ids, n, k if want else 0, bias, adapter)
    tok = service.lm.tokenizer
    lp = None
    if want:
        def entry(j, v):
            text = token_text(tok, j)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

        lp = {"content": [{**entry(t, v), "top_logprobs": [entry(j, w) for j, w in (tops[s] if k else [])]}
                          for s, (t, v) in enumerate(zip(new, lps))]}
    return {"object": "chat.completion", "model": payload.get("model") or service.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": service.lm.decode(new)},
                         "logprobs": lp, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                      "total_tokens": len(ids) + len(new)}}
