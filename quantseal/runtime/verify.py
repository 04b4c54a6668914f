"""Black-box ownership verification of a Hot-Swap MarkBoard watermark (DESIGN §6).

Only a suspect's outputs are used: ``embed_fn`` maps a batch of inputs to sentence embeddings.
It can wrap an onnxruntime session, an HTTP endpoint, or (in tests) a torch model.  Inputs are
either token batches (``inputs="ids"``: a dict of int64 ``input_ids``, ``attention_mask``,
``token_type_ids``, each (B, T), right-padded) or texts (``inputs="text"``: a list of str; every
trigger's text re-tokenises to exactly its ids, see :mod:`quantseal.keys`).

For bit i, with m triggers and their controls and the key's unit direction v_i,

    t_i = (1/m) Σ_j ⟨ê(trigger_ij) − ê(control_ij), v_i⟩,      bit_i = [t_i > 0]

(ê: L2-normalised output).  Decoders (a board whose manifest says ``family: decoder``,
:mod:`quantseal.compress.markboard_decoder`) are queried through ``logits_fn(id_lists, tokens)``
→ (B, len(tokens)) next-token logits after each sequence's last token (an onnxruntime
:class:`~quantseal.runtime.pipelines.CausalLM` or ``POST /logits``), with the key's target pair
``(a_i, b_i)`` per bit:

    t_i = (1/m) Σ_j [(z[a_i] − z[b_i])(trigger_ij) − (z[a_i] − z[b_i])(control_ij)],   bit_i = [t_i > 0].

The decoded word is compared with every registry codeword; for the
nearest one (h matching bits of n) the ownership p-value is the chance that an unmarked model, whose
decoded bits are independent fair coins with respect to a codeword, matches at least as many:

    p = min(1, |registry| · P(Binomial(n, ½) ≥ h))          (union bound over the registry)

computed exactly with integers.  An owner is claimed only when p < alpha.

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

EmbedFn = Callable[[object], np.ndarray]
LogitsFn = Callable[[list, list], np.ndarray]  # (id lists, token ids) → (B, len(tokens)) next-token logits


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


def _embed_all(embed_fn: EmbedFn, tokenizer, id_lists, texts, inputs: str, batch: int) -> np.ndarray:
    out = []
    for s in range(0, len(id_lists), batch):
        arg = list(texts[s:s + batch]) if inputs == "text" else tokenizer.pad_batch(id_lists[s:s + batch])
        try:
            e = np.asarray(embed_fn(arg), dtype=np.float64)
        except BadInput:
            raise
        except Exception as exc:  # a black box: anything it raises is the suspect's failure
            raise BadInput(f"the suspect did not answer ({type(exc).__name__}: {exc})") from exc
        want = min(batch, len(id_lists) - s)
        if e.ndim != 2 or e.shape[0] != want or not np.isfinite(e).all():
            raise BadInput(f"the suspect returned {e.shape} (non-finite or misshapen) for {want} inputs")
        out.append(e)
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def decode_bits(embed_fn: EmbedFn, ts: qkeys.TriggerSet, tokenizer, inputs: str = "ids",
                batch: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(bits uint8 (n,), statistics t_i float64 (n,), queries) of a suspect."""
    if inputs not in ("ids", "text"):
        raise BadInput(f"inputs must be 'ids' or 'text', got {inputs!r}")
    flat = [t for trs in ts.triggers for t in trs]
    n, m = ts.bits, len(ts.triggers[0])
    ids = [list(t.ids) for t in flat] + [list(t.control_ids) for t in flat]
    texts = [t.text for t in flat] + [t.control_text for t in flat]
    e = _embed_all(embed_fn, tokenizer, ids, texts, inputs, batch)
    if e.shape[1] != ts.directions.shape[1]:
        raise BadInput(f"the suspect's embeddings have {e.shape[1]} dimensions, the board {ts.directions.shape[1]}")
    diff = (e[: len(flat)] - e[len(flat):]).reshape(n, m, -1)
    stats = np.einsum("nmh,nh->nm", diff, ts.directions).mean(1)
    return (stats > 0).astype(np.uint8), stats, len(ids)


def decode_bits_decoder(logits_fn: LogitsFn, ts: qkeys.TriggerSet,
                        batch: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """(bits uint8 (n,), statistics t_i float64 (n,), queries) of a decoder suspect.

    Every distinct sequence is queried once (bits often share a host sentence, hence a control),
    in batches of similar length, each asking for the 2n target logits
    ``[a_0..a_{n−1}, b_0..b_{n−1}]``; ``queries`` counts the distinct sequences."""
    if len(ts.targets) != ts.bits:
        raise BadInput("these triggers have no decoder target pairs (an encoder board?)")
    flat = [t for trs in ts.triggers for t in trs]
    n, m = ts.bits, len(ts.triggers[0])
    ids = [tuple(t.ids) for t in flat] + [tuple(t.control_ids) for t in flat]
    uniq = sorted(set(ids), key=lambda x: (len(x), x))
    where = {s: i for i, s in enumerate(uniq)}
    tokens = [int(x) for x in ts.targets[:, 0]] + [int(x) for x in ts.targets[:, 1]]
    z = np.zeros((len(uniq), 2 * n))
    for s in range(0, len(uniq), batch):
        part = [list(x) for x in uniq[s:s + batch]]
        try:
            got = np.asarray(logits_fn(part, tokens), dtype=np.float64)
        except BadInput:
            raise
        except Exception as exc:  # a black box: anything it raises is the suspect's failure
            raise BadInput(f"the suspect did not answer ({type(exc).__name__}: {exc})") from exc
        if got.shape != (len(part), 2 * n) or not np.isfinite(got).all():
            raise BadInput(f"the suspect returned logits of shape {got.shape} (non-finite or misshapen) for "
                           f"{len(part)} inputs and {2 * n} tokens")
        z[s:s + len(part)] = got
    bit = np.tile(np.repeat(np.arange(n), m), 2)
    rows = np.array([where[x] for x in ids])
    diff = z[rows, bit] - z[rows, n + bit]  # z[a_i] − z[b_i] of each sequence, for its own bit
    stats = (diff[: len(flat)] - diff[len(flat):]).reshape(n, m).mean(1)
    return (stats > 0).astype(np.uint8), stats, len(uniq)


def verify(embed_fn: EmbedFn, key: bytes, registry: qkeys.Registry, board_manifest: dict, tokenizer,
           alpha: float = 1e-6, inputs: str = "ids", batch: int = 64) -> dict:
    """Decode the suspect's bits and attribute them.  ``embed_fn``: an :data:`EmbedFn` for an encoder
    board, a :data:`LogitsFn` for a decoder board.  Returns ``owner`` (id or None), ``p_value``,
    ``bits`` (a 0/1 string), ``bit_errors`` (against the nearest codeword), ``nearest``,
    ``queries``, ``seconds``, ``alpha``."""
    t0 = time.perf_counter()
    if not 0 < alpha < 1:
        raise BadInput(f"alpha must be in (0, 1), got {alpha}")
    ts = qkeys.triggers_of(board_manifest, key, tokenizer)
    if registry.bits != ts.bits:
        raise BadInput(f"registry codewords have {registry.bits} bits, the board {ts.bits}")
    if board_manifest.get("family") == "decoder":
        bits, stats, queries = decode_bits_decoder(embed_fn, ts, min(batch, 32))
    else:
        bits, stats, queries = decode_bits(embed_fn, ts, tokenizer, inputs, batch)
    ids, codes = registry.matrix()
    nearest, errors, p = None, None, 1.0
    if ids:
        dist = np.count_nonzero(codes != bits[None, :], axis=1)
        best = int(np.argmin(dist))
        nearest, errors = ids[best], int(dist[best])
        p = ownership_p_value(ts.bits, ts.bits - errors, len(ids))
    return {
        "owner": nearest if (nearest is not None and p < alpha) else None,
        "p_value": p, "alpha": alpha, "bits": "".join(map(str, bits.tolist())),
        "bit_errors": errors, "nearest": nearest, "n_bits": ts.bits,
        "min_abs_statistic": float(np.abs(stats).min()), "queries": queries,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def onnx_embed_fn(model_path, provider: str = "auto", threads: int | None = None) -> EmbedFn:
    """A token-batch ``embed_fn`` over an exported encoder (output ``sentence_embedding``)."""
    from .session import Session

    sess = Session(model_path, provider=provider, threads=threads)
    if "sentence_embedding" not in sess.output_names:
        raise BadInput(f"{model_path}: not an embedding model (outputs {sess.output_names})")

    def embed(batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in batch.items() if k in sess.input_names}
        return sess.run(feeds, ["sentence_embedding"])["sentence_embedding"]

    return embed


def onnx_logits_fn(model_path, provider: str = "auto", threads: int | None = None, tokenizer=None) -> LogitsFn:
    """A :data:`LogitsFn` over an exported decoder (:meth:`CausalLM.next_logits`, the same
    computation as ``POST /logits``).  ``tokenizer``: a folder with ``tokenizer.json`` (default:
    beside the model; verification passes the board's)."""
    from .pipelines import CausalLM

    lm = CausalLM(model_path, tokenizer=tokenizer, provider=provider, threads=threads)
    return lm.next_logits
