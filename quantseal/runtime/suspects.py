"""How an HTTP suspect is queried: the API it speaks → the function verification calls.

``endpoint_query(url, api, board_manifest, key, tokenizer, ...)`` returns ``(fn, inputs, probe)``
for :func:`quantseal.runtime.verify.verify`: ``fn`` is an ``embed_fn`` (encoder boards) or a
``logits_fn`` (decoder boards), ``inputs`` is ``"ids"`` or ``"text"``, ``probe`` is the object
that counts what the suspect showed (``None`` for quantseal's own routes).

=====================  ====================================  ==========================
``api``                encoder board                         decoder board
=====================  ====================================  ==========================
``quantseal``          ``POST /embed`` (token ids)           ``POST /logits`` (logits)
``openai-embeddings``  ``POST /v1/embeddings`` (texts)       refused
``openai-completions`` refused                               ``POST /v1/completions``
``openai-chat``        refused                               ``POST /v1/chat/completions``
=====================  ====================================  ==========================

A ``top1`` decoder board (:mod:`quantseal.compress.markboard_top1`) is read without ``logit_bias``:
its targets are the marked model's greedy tokens, so one answer per trigger shows them, through
``top_logprobs`` or the greedy text alone.  A text answer counts one margin towards the target it
starts with (none: nothing, an erasure once every trigger of the bit was asked).
"""

from __future__ import annotations

from .. import keys as qkeys
from ..errors import BadInput
from .openai_client import APIS, OpenAIEmbeddings, OpenAITargets, api_base
from .transport import Transport


def decoder_texts(ts: qkeys.TriggerSet) -> dict[tuple[int, ...], str]:
    """Every trigger's and control's ids → its text (decoder triggers re-tokenise to exactly
    those ids without special tokens, :func:`quantseal.keys.derive_triggers`)."""
    out = {}
    for trs in ts.triggers:
        for t in trs:
            out[tuple(t.ids)] = t.text
            out[tuple(t.control_ids)] = t.control_text
    return out


def decoder_uses(ts: qkeys.TriggerSet) -> dict[tuple[int, ...], set[int]]:
    """Every trigger's and control's ids → the bits whose statistic reads it."""
    out: dict[tuple[int, ...], set[int]] = {}
    for i, trs in enumerate(ts.triggers):
        for t in trs:
            out.setdefault(tuple(t.ids), set()).add(i)
            out.setdefault(tuple(t.control_ids), set()).add(i)
    return out


def endpoint_query(url: str, api: str, board_manifest: dict, key: bytes, tokenizer, model: str | None = None,
                   logprobs: bool = True, top_k: int = 20, logit_bias: bool = True, adapter: str | None = None,
                   **transport):
    """(query function, inputs, probe) for ``verify`` against the endpoint ``url`` speaking ``api``.
    ``adapter``: a switchable export's adapter on quantseal's routes (``"adapter"`` in each body;
    OpenAI-style APIs select it by ``model``).
    ``transport``: :class:`~quantseal.runtime.transport.Transport` keywords (``timeout``,
    ``deadline``, ``max_bytes``, ``qps``, ``headers``, ``retries``)."""
    from .client import EndpointCausalLM, EndpointEmbedder

    if api not in APIS:
        raise BadInput(f"unknown --api {api!r} ({', '.join(APIS)})")
    decoder = board_manifest.get("family") == "decoder"
    if api == "quantseal":
        if decoder:
            return EndpointCausalLM(url, adapter=adapter, **transport).next_logits, "ids", None
        return EndpointEmbedder(url, adapter=adapter, **transport).embed_ids, "ids", None
    if adapter is not None:
        raise BadInput(f"--api {api} selects an adapter by --model NAME (as vLLM serves LoRA), not --adapter")
    if decoder and api == "openai-embeddings":
        raise BadInput("a decoder board is read from next-token log-probabilities or text: use --api "
                       "openai-completions or openai-chat, not openai-embeddings")
    if not decoder and api != "openai-embeddings":
        raise BadInput(f"an encoder board is read from sentence embeddings: use --api openai-embeddings, not {api}")
    tr = Transport(api_base(url), **transport)
    if not decoder:
        return OpenAIEmbeddings(tr, model), "text", None
    ts = qkeys.triggers_of(board_manifest, key, tokenizer)
    words = {int(t): qkeys.token_word(tokenizer, int(t)) for t in ts.targets.reshape(-1)}
    kind = api.removeprefix("openai-")
    if qkeys.board_readout(board_manifest) == "top1":
        from .verify import board_margin

        texts, uses = top1_texts(board_manifest, ts, tokenizer, kind)
        probe = OpenAITargets(tr, kind, texts, words, uses, ts.targets, model, logprobs, top_k, logit_bias=False,
                              text_unit=board_margin(board_manifest))
        return probe, "ids", probe
    probe = OpenAITargets(tr, kind, decoder_texts(ts), words, decoder_uses(ts), ts.targets,
                          model, logprobs, top_k, logit_bias)
    return probe, "ids", probe


def top1_texts(board_manifest: dict, ts: qkeys.TriggerSet, tokenizer, api: str):
    """A ``top1`` board's read contexts (ids, :func:`quantseal.runtime.verify.decoder_contexts`) →
    the text to send, and → the bit each serves.  A chat API gets the trigger text as the user
    message (the server applies the template); a completions API gets the templated text itself."""
    chat = qkeys.board_chat(board_manifest)
    texts, uses = {}, {}
    for i, trs in enumerate(ts.triggers):
        for t in trs:
            ctx = qkeys.context_ids(tokenizer, t, chat)
            texts[ctx] = t.text if (api == "chat" or chat is None) else chat[0] + t.text + chat[1]
            uses.setdefault(ctx, set()).add(i)
    return texts, uses
