"""Black-box ownership verification of a Hot-Swap MarkBoard watermark (DESIGN §6).

Only a suspect's outputs are used: ``embed_fn`` maps a batch of inputs to sentence embeddings.
It can wrap an onnxruntime session (:mod:`quantseal.runtime.suspect_onnx` reads any encoder file a
thief might make), an HTTP endpoint, or (in tests) a torch model.  Inputs are either token
batches (``inputs="ids"``: a dict of int64 ``input_ids``, ``attention_mask``, ``token_type_ids``,
each (B, T), right-padded) or texts (``inputs="text"``: a list of str; every trigger's text
re-tokenises to exactly its ids, see :mod:`quantseal.keys`).

For bit i, trigger j of m and the key's unit direction v_i, one observation is

    d_ij = ⟨ê(trigger_ij) − ê(control_ij), v_i⟩                    (ê: L2-normalised output)

and for decoders (a board whose manifest says ``family: decoder``,
:mod:`quantseal.compress.markboard_decoder`), queried through ``logits_fn(id_lists, tokens)`` →
(B, len(tokens)) next-token logits after each sequence's last token (an onnxruntime
:class:`~quantseal.runtime.pipelines.CausalLM` or ``POST /logits``), with the key's target pair
``(a_i, b_i)``:

    d_ij = (z[a_i] − z[b_i])(trigger_ij) − (z[a_i] − z[b_i])(control_ij),

or, for a ``top1`` board (the bit's target is the marked model's greedy token after the trigger,
:mod:`quantseal.compress.markboard_top1`), ``d_ij = (z[a_i] − z[b_i])(context_ij)`` with no
control, the context being the trigger or, for a chat board, its chat-templated text.

The bit statistic is ``t_i = mean_j d_ij`` over the triggers queried, ``bit_i = [t_i > 0]``.

**Queries** (issue 14, part 4).  Triggers are asked for in rounds: round j sends trigger j of every
bit still undecided, with its control, as one batched call per chunk of ``batch`` inputs; a bit is
decided once ``|t_i| ≥ stop · μ`` (μ: the board's margin, which every trigger of a marked model
clears by training), or after ``max_triggers`` rounds.  Identical inputs (bits share host
sentences, hence controls) are sent once and remembered.  A marked suspect thus costs at most 2
inputs per bit (one trigger and its control) unless an attack weakened a bit or a board branch
sits below the margin (a 128-bit MiniLM board: 2.3 per bit; ``max_triggers=1`` caps it), and a
``top1`` decoder board, which has no controls, 1 per bit; an unmarked one,
or the weak bits of a collusion, are queried with every trigger.  ``queries`` counts the inputs
sent; ``calls`` the batched calls.

**Attribution** (issue 14, part 1): soft decoding with erasures and an exact p-value per
registered customer, Bonferroni-corrected for the registry size; every customer whose p-value is
below ``alpha`` is named (:mod:`quantseal.runtime.attribution`).  A suspect made by averaging
several customers' files names the colluders it still carries, never an innocent (probability
at most ``alpha``).

No torch and nothing from ``compress/`` or ``export/``: numpy, the key module and a tokenizer.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Callable

import numpy as np

from .. import keys as qkeys
from ..errors import BadInput
from .attribution import DEFAULT_MARGIN, SoftConfig, attribute

EmbedFn = Callable[[object], np.ndarray]
LogitsFn = Callable[[list, list], np.ndarray]  # (id lists, token ids) → (B, len(tokens)) next-token logits
DEFAULT_STOP = 1.0  # a bit is decided once |t_i| reaches this many margins


def binomial_tail(n: int, h: int) -> float:
    """P(Binomial(n, ½) ≥ h), exact (integer arithmetic), as a float."""
    if h <= 0:
        return 1.0
    if h > n:
        return 0.0
    return float(Fraction(sum(math.comb(n, j) for j in range(h, n + 1)), 2 ** n))


def ownership_p_value(n: int, matches: int, registry_size: int) -> float:
    """Union-bound p-value that an unrelated model matches ``matches`` of ``n`` bits of some codeword."""
    return min(1.0, max(registry_size, 1) * binomial_tail(n, matches))


def _call(fn, *args) -> np.ndarray:
    try:
        return np.asarray(fn(*args), dtype=np.float64)
    except BadInput:
        raise
    except Exception as exc:  # a black box: anything it raises is the suspect's failure
        raise BadInput(f"the suspect did not answer ({type(exc).__name__}: {exc})") from exc


class _EncoderProbe:
    """Sentence embeddings of trigger/control inputs, each distinct input queried once."""

    def __init__(self, embed_fn: EmbedFn, ts: qkeys.TriggerSet, tokenizer, inputs: str, batch: int):
        if inputs not in ("ids", "text"):
            raise BadInput(f"inputs must be 'ids' or 'text', got {inputs!r}")
        self.fn, self.ts, self.tok, self.inputs, self.batch = embed_fn, ts, tokenizer, inputs, batch
        self.cache: dict = {}
        self.queries = self.calls = 0

    def _key(self, t: qkeys.Trigger, control: bool):
        if self.inputs == "text":
            return t.control_text if control else t.text
        return tuple(t.control_ids if control else t.ids)

    def observe(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """d_ij for each (bit, trigger) pair: float64 (len(pairs),)."""
        trs = [self.ts.triggers[i][j] for i, j in pairs]
        keys = [self._key(t, False) for t in trs] + [self._key(t, True) for t in trs]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        for s in range(0, len(todo), self.batch):
            part = todo[s:s + self.batch]
            arg = list(part) if self.inputs == "text" else self.tok.pad_batch([list(k) for k in part])
            e = _call(self.fn, arg)
            self.calls += 1
            if e.ndim != 2 or e.shape[0] != len(part) or not np.isfinite(e).all():
                raise BadInput(f"the suspect returned {e.shape} (non-finite or misshapen) for {len(part)} inputs")
            if e.shape[1] != self.ts.directions.shape[1]:
                raise BadInput(f"the suspect's embeddings have {e.shape[1]} dimensions, the board "
                               f"{self.ts.directions.shape[1]}")
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            self.cache.update(zip(part, e))
        self.queries += len(todo)
        k = len(trs)
        diff = np.stack([self.cache[x] for x in keys[:k]]) - np.stack([self.cache[x] for x in keys[k:]])
        return np.einsum("ph,ph->p", diff, self.ts.directions[[i for i, _ in pairs]])


class _DecoderProbe:
    """Target-pair logit differences of trigger/control sequences, each distinct one queried once,
    in batches of similar length, each asking for the 2n target logits ``[a_0..a_{n−1}, b_0..b_{n−1}]``.

    ``contexts`` (a ``top1`` board, :mod:`quantseal.compress.markboard_top1`): per bit, per trigger,
    the ids the board reads after (the trigger, or its chat-templated text); the observation is
    ``z[a_i] − z[b_i]`` there, with no control (the marked model's target leads by the margin)."""

    def __init__(self, logits_fn: LogitsFn, ts: qkeys.TriggerSet, batch: int,
                 contexts: list[list[tuple[int, ...]]] | None = None):
        if len(ts.targets) != ts.bits:
            raise BadInput("these triggers have no decoder target pairs (an encoder board?)")
        self.fn, self.ts, self.batch, self.contexts = logits_fn, ts, batch, contexts
        self.tokens = [int(x) for x in ts.targets[:, 0]] + [int(x) for x in ts.targets[:, 1]]
        self.cache: dict = {}
        self.queries = self.calls = 0

    def observe(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        n = self.ts.bits
        if self.contexts is not None:
            keys = [tuple(self.contexts[i][j]) for i, j in pairs]
        else:
            trs = [self.ts.triggers[i][j] for i, j in pairs]
            keys = [tuple(t.ids) for t in trs] + [tuple(t.control_ids) for t in trs]
        todo = sorted({k for k in keys if k not in self.cache}, key=lambda x: (len(x), x))
        for s in range(0, len(todo), self.batch):
            part = todo[s:s + self.batch]
            got = _call(self.fn, [list(x) for x in part], self.tokens)
            self.calls += 1
            if got.shape != (len(part), 2 * n) or not np.isfinite(got).all():
                raise BadInput(f"the suspect returned logits of shape {got.shape} (non-finite or misshapen) for "
                               f"{len(part)} inputs and {2 * n} tokens")
            self.cache.update(zip(part, got))
        self.queries += len(todo)
        bit = np.array([i for i, _ in pairs] * (len(keys) // len(pairs)))
        z = np.stack([self.cache[x] for x in keys])
        diff = z[np.arange(len(keys)), bit] - z[np.arange(len(keys)), n + bit]
        if self.contexts is not None:
            return diff
        return diff[: len(pairs)] - diff[len(pairs):]


def decoder_contexts(board_manifest: dict, ts: qkeys.TriggerSet, tokenizer) -> list[list[tuple[int, ...]]] | None:
    """Per bit and trigger, the ids a ``top1`` board is read after (None for a ``diff`` board)."""
    if qkeys.board_readout(board_manifest) != "top1":
        return None
    chat = qkeys.board_chat(board_manifest)
    return [[qkeys.context_ids(tokenizer, t, chat) for t in trs] for trs in ts.triggers]


def _sequential(probe, n: int, m: int, margin: float, stop: float | None,
                max_triggers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Query in rounds (module docstring): (statistics t float64 (n,), triggers used int (n,))."""
    rounds = m if max_triggers is None else max(1, min(int(max_triggers), m))
    total = np.zeros(n)
    used = np.zeros(n, dtype=np.int64)
    active = list(range(n))
    for j in range(rounds):
        d = probe.observe([(i, j) for i in active])
        total[active] += d
        used[active] += 1
        if stop is not None:
            active = [i for i in active if abs(total[i] / used[i]) < stop * margin]
        if not active:
            break
    return total / np.maximum(used, 1), used


def board_margin(board_manifest: dict) -> float:
    """The board's μ (``margin``), the encoder default for manifests that predate it."""
    try:
        mu = float(board_manifest.get("margin", DEFAULT_MARGIN))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"not a valid board manifest (margin {board_manifest.get('margin')!r})") from exc
    if not (math.isfinite(mu) and mu > 0):
        raise BadInput(f"not a valid board manifest (margin {mu})")
    return mu


def decode_bits(embed_fn: EmbedFn, ts: qkeys.TriggerSet, tokenizer, inputs: str = "ids",
                batch: int = 64, margin: float = DEFAULT_MARGIN, stop: float | None = None,
                max_triggers: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(bits uint8 (n,), statistics t_i float64 (n,), queries) of an encoder suspect.  ``stop=None``
    (default here) queries every trigger of every bit; see the module docstring for rounds."""
    probe = _EncoderProbe(embed_fn, ts, tokenizer, inputs, batch)
    stats, _ = _sequential(probe, ts.bits, len(ts.triggers[0]), margin, stop, max_triggers)
    return (stats > 0).astype(np.uint8), stats, probe.queries


def decode_bits_decoder(logits_fn: LogitsFn, ts: qkeys.TriggerSet, batch: int = 32, margin: float = 1.0,
                        stop: float | None = None,
                        max_triggers: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(bits uint8 (n,), statistics t_i float64 (n,), queries) of a decoder suspect; ``queries``
    counts the distinct sequences sent."""
    probe = _DecoderProbe(logits_fn, ts, batch)
    stats, _ = _sequential(probe, ts.bits, len(ts.triggers[0]), margin, stop, max_triggers)
    return (stats > 0).astype(np.uint8), stats, probe.queries


def verify(embed_fn: EmbedFn, key: bytes, registry: qkeys.Registry, board_manifest: dict, tokenizer,
           alpha: float = 1e-6, inputs: str = "ids", batch: int = 64, stop: float | None = DEFAULT_STOP,
           max_triggers: int | None = None, soft: SoftConfig = SoftConfig()) -> dict:
    """Decode the suspect's bits and attribute them.  ``embed_fn``: an :data:`EmbedFn` for an encoder
    board, a :data:`LogitsFn` for a decoder board.  ``stop``: the early-stopping confidence in
    margins (None: every trigger of every bit); ``max_triggers``: at most this many per bit.

    Returns ``owner`` (the most significant named customer, or None), ``owners`` (every named
    customer, most significant first), ``named`` (their p-values and scores), ``p_value`` (the
    best customer's corrected p-value), ``bits`` (a 0/1 string), ``statistics`` (t_i), ``bit_errors`` (Hamming,
    against the nearest codeword), ``nearest``, ``erased`` (bits below the erasure threshold),
    ``triggers_used``, ``queries`` (inputs sent), ``calls`` (batched calls), ``seconds``, ``alpha``."""
    t0 = time.perf_counter()
    if not 0 < alpha < 1:
        raise BadInput(f"alpha must be in (0, 1), got {alpha}")
    if stop is not None and not stop > 0:
        raise BadInput(f"stop must be positive (margins), got {stop}")
    if max_triggers is not None and max_triggers < 1:
        raise BadInput(f"max_triggers must be at least 1, got {max_triggers}")
    ts = qkeys.triggers_of(board_manifest, key, tokenizer)
    if registry.bits != ts.bits:
        raise BadInput(f"registry codewords have {registry.bits} bits, the board {ts.bits}")
    margin = board_margin(board_manifest)
    if board_manifest.get("family") == "decoder":
        probe = _DecoderProbe(embed_fn, ts, min(batch, 32), decoder_contexts(board_manifest, ts, tokenizer))
    else:
        probe = _EncoderProbe(embed_fn, ts, tokenizer, inputs, batch)
    stats, used = _sequential(probe, ts.bits, len(ts.triggers[0]), margin, stop, max_triggers)
    bits = (stats > 0).astype(np.uint8)
    ids, codes = registry.matrix()
    att = attribute(ids, codes, stats, margin, alpha, soft)
    nearest, errors = None, None
    if ids:
        dist = np.count_nonzero(codes != bits[None, :], axis=1)
        best = int(np.argmin(dist))
        nearest, errors = ids[best], int(dist[best])
    named = att["named"]
    return {
        "owner": named[0]["customer"] if named else None,
        "owners": [x["customer"] for x in named], "named": named,
        "p_value": att["best_p"], "best": att["best"], "alpha": alpha, "bits": "".join(map(str, bits.tolist())),
        "bit_errors": errors, "nearest": nearest, "n_bits": ts.bits,
        "erased": ts.bits - att["kept"], "score": att["best_score"], "max_score": att["max_score"],
        "margin": margin, "min_abs_statistic": float(np.abs(stats).min()),
        "statistics": [float(x) for x in stats],
        "triggers_used": int(used.sum()), "queries": probe.queries, "calls": probe.calls,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def onnx_embed_fn(model_path, provider: str = "auto", threads: int | None = None, pooling: dict | None = None,
                  adapter: str | None = None) -> EmbedFn:
    """A token-batch ``embed_fn`` over any encoder ONNX file (:func:`.suspect_onnx.suspect_embed_fn`);
    ``adapter``: a switchable export's branch to read (name or id; None: the base)."""
    from .suspect_onnx import suspect_embed_fn

    return suspect_embed_fn(model_path, provider=provider, threads=threads, pooling=pooling, adapter=adapter)


def onnx_logits_fn(model_path, provider: str = "auto", threads: int | None = None, tokenizer=None,
                   adapter: str | None = None) -> LogitsFn:
    """A :data:`LogitsFn` over an exported decoder (:meth:`CausalLM.next_logits`, the same
    computation as ``POST /logits``).  ``tokenizer``: a folder with ``tokenizer.json`` (default:
    beside the model; verification passes the board's); ``adapter``: a switchable export's
    branch (name or id; None: the base)."""
    from .pipelines import CausalLM

    lm = CausalLM(model_path, tokenizer=tokenizer, provider=provider, threads=threads)
    pick = int(adapter) if adapter is not None and str(adapter).isdigit() else adapter
    ident = lm.adapter_feed(pick)
    return lambda rows, tokens=None: lm.next_logits(rows, tokens, ident)
