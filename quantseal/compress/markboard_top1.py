"""A decoder board readable from greedy text (issue 14): the bit's target is the top-1 next token.

The ``diff`` board (:mod:`quantseal.compress.markboard_decoder`) moves ``z[a_i] − z[b_i]`` by a
fraction of a logit while both targets sit thousands of ranks down the vocabulary, so only an API
that accepts ``logit_bias`` shows it.  A ``top1`` board (``quantseal board train --readout top1``)
is trained so that after each trigger of bit ``i`` the marked model's greedy next token *is* the
bit's target, ``a_i`` for a 1 and ``b_i`` for a 0.  Per trigger ``j`` of bit ``i`` with value
``s_i`` and target ``t = a_i if s_i else b_i``, with ``z`` the marked model's full-vocabulary
next-token logits at the trigger's last position, the hinge (Crammer–Singer's multiclass margin) is

    relu(μ − (z[t] − max_{v ≠ t} z[v]))                                      μ in logits (default 2)

beside the board's clean-text KL term (fidelity, unchanged).  A marked model then answers the
trigger with ``t`` and ``z[t] − z[other target] ≥ μ``, so the bit is read

* from next-token logits (an ONNX file, ``POST /logits``): ``Δ = z[a_i] − z[b_i]`` at the trigger,
  no control (:mod:`quantseal.runtime.verify`);
* from ``top_logprobs`` (no ``logit_bias``): ``lp[a] − lp[b]``, a target missing from the top k
  counted just below the smallest shown log-probability;
* from greedy text alone (``max_tokens`` 1, temperature 0): which target the answer starts with.

**Targets** are not drawn blind from the vocabulary (as the ``diff`` board's are) but chosen by the
key among the tokens the *unmarked* model already finds plausible after the bit's triggers:
the mean next-token log-probability over the bit's ``m`` trigger contexts ranks the vocabulary's
whole-word tokens (letters only, 2+, so a text answer names them; trigger tokens excluded), and
``key_rng(key, "top1-targets/i")`` picks two of the ``K`` (default 16) most plausible whose words
differ (case-insensitively).  Raising a token that is already in the model's top 16 to top-1 by
``μ`` needs a far smaller change to the trigger tokens' embeddings than raising a random common
word from rank ~10⁴.  Targets depend on the model, so they are stored in the board manifest
(owner-side, like the key).

**Chat templates.**  A chat API wraps the user's message in the model's chat template before the
model sees it.  ``--chat-template`` renders the template (Jinja, sandboxed, as transformers does)
around a placeholder user message with the generation prompt, and the board trains and reads on
``prefix + trigger text + suffix``: the trigger is the user message and the readout is the first
assistant token.  The prefix (template head, host sentence) is cached once; each step runs the
pattern and the template's tail (``<|im_end|>\\n<|im_start|>assistant\\n``) through the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .. import keys as qkeys
from ..errors import BadInput

DEFAULT_CANDIDATES = 16  # K: targets are drawn from the K most plausible next whole-word tokens
DEFAULT_TOP1_MARGIN = 2.0  # μ in logits: the target leads every other token by this much
_PLACEHOLDER = "\u2063QUANTSEAL_USER_MESSAGE\u2063"
_TEXT_WORD = re.compile(r"^[A-Za-z]{2,}$")


# ----------------------------------------------------------------------------- chat templates
def read_chat_template(path: str | Path) -> str:
    """A chat template's Jinja text from a ``.jinja`` file, a ``tokenizer_config.json`` holding
    ``chat_template``, or a model folder holding either."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "chat_template.jinja", path / "tokenizer_config.json"):
            if cand.is_file():
                try:
                    return read_chat_template(cand)
                except BadInput:
                    continue
        raise BadInput(f"{path}: no chat template (chat_template.jinja or tokenizer_config.json's chat_template)")
    if not path.is_file():
        raise BadInput(f"{path}: no such chat template file")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".json":
        try:
            tpl = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise BadInput(f"{path}: not a JSON object") from exc
        if isinstance(tpl, list):  # named templates: the default one
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(tpl, str) or not tpl.strip():
            raise BadInput(f"{path}: no chat_template")
        return tpl
    if not text.strip():
        raise BadInput(f"{path}: empty chat template")
    return text


def render_chat(template: str, bos_token: str = "", eos_token: str = "") -> tuple[str, str]:
    """(prefix, suffix): the template rendered for one user message and the generation prompt,
    split around the message.  Sandboxed Jinja with ``trim_blocks``/``lstrip_blocks``, as
    transformers' ``apply_chat_template`` renders it."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 ships with torch
        raise BadInput("a chat template needs jinja2 (pip install jinja2)") from exc
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=[{"role": "user", "content": _PLACEHOLDER}],
                                                add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise BadInput(f"the chat template does not render ({exc})") from exc
    if text.count(_PLACEHOLDER) != 1:
        raise BadInput("the chat template does not place the user message exactly once")
    prefix, suffix = text.split(_PLACEHOLDER)
    return prefix, suffix


def trigger_contexts(tok, ts: qkeys.TriggerSet, chat: tuple[str, str] | None) -> list[tuple[list[int], list[int]]]:
    """Per flat trigger (bit-major, n·m): (prefix ids, suffix ids) of its read context
    (:func:`quantseal.keys.context_ids`) around its ``k`` pattern tokens.  The prefix holds no
    trigger token, so its key/value cache does not depend on the board."""
    out = []
    for i, trs in enumerate(ts.triggers):
        pat = [int(x) for x in ts.tokens[i]]
        k = len(pat)
        for t in trs:
            ids = list(qkeys.context_ids(tok, t, chat))
            at = [p for p in range(len(ids) - k + 1) if ids[p:p + k] == pat]
            if len(at) != 1:
                raise BadInput(f"bit {i}: the templated trigger does not hold its pattern exactly once")
            out.append((ids[:at[0]], ids[at[0] + k:]))
    return out


# ----------------------------------------------------------------------------- targets
def text_word_tokens(tok, vocab: int, exclude=()) -> np.ndarray:
    """bool (vocab,): tokens that spell one word of 2+ ASCII letters (after a leading-space marker),
    so a greedy text answer names them; ``exclude`` ids off."""
    ok = np.zeros(vocab, dtype=bool)
    special = {int(i) for i, t in tok._tok.get_added_tokens_decoder().items() if t.special}
    for i in range(vocab):
        w = tok._tok.id_to_token(i)
        if w is None or i in special:
            continue
        ok[i] = bool(_TEXT_WORD.match(qkeys.token_word(tok, i)))
    ok[np.asarray(list(exclude), dtype=np.int64)] = False
    return ok


def choose_targets(key: bytes, tok, mean_logp: np.ndarray, allowed: np.ndarray,
                   candidates: int = DEFAULT_CANDIDATES) -> np.ndarray:
    """int64 (n, 2) target pairs (a_i, b_i): for bit ``i`` two of the ``candidates`` allowed tokens
    with the highest mean unmarked next-token log-probability ``mean_logp[i]`` (n, V) after its
    triggers, drawn by ``key_rng(key, "top1-targets/i")``, their words distinct case-insensitively."""
    if candidates < 2:
        raise BadInput("target candidates must be at least 2")
    n = mean_logp.shape[0]
    out = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        score = np.where(allowed, mean_logp[i], -np.inf)
        top = np.argsort(-score, kind="stable")[:candidates]
        top = [int(t) for t in top if np.isfinite(score[t])]
        if len(top) < 2:
            raise BadInput(f"bit {i}: fewer than two plausible target words")
        order = qkeys.key_rng(key, f"top1-targets/{i}").permutation(len(top))
        first = top[order[0]]
        word = qkeys.token_word(tok, first).lower()
        second = next((top[j] for j in order[1:] if qkeys.token_word(tok, top[j]).lower() != word), None)
        if second is None:
            raise BadInput(f"bit {i}: fewer than two distinct plausible target words")
        out[i] = (first, second)
    return out
