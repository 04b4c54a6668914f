"""Train the Hot-Swap MarkBoard on a LLaMA-family decoder: a secret pair of target tokens per bit.

The board is the encoder's (:mod:`quantseal.compress.markboard`): one LoRA of rank ``R`` on the
token embedding (``fam.embedding_attr``) with a shared ``A: (R, H)`` and per bit ``i`` and value
``b`` the coefficient rows ``C_b[T_i]: (k, R)`` of the bit's ``k`` rare trigger tokens, so
branch ``(i, b)`` is ``ΔE = onehot(T_i) · C_b[T_i] · A``.  What changes is the statistic.

Decoder triggers (:func:`quantseal.keys.derive_triggers` with ``position="end"``) append bit
``i``'s rare-token pattern to a natural host sentence; the control is the sentence alone.  The
key also gives a pair of common target tokens ``(a_i, b_i)``.  With ``z`` the next-token logits
after a sequence's last token, trigger ``j`` of bit ``i`` has the statistic

    d_ij = (z[a_i] − z[b_i])(trigger_ij) − (z[a_i] − z[b_i])(control_ij)

and bit ``i`` reads ``[mean_j d_ij > 0]`` (:mod:`quantseal.runtime.verify`).  A suspect is
queried only for those logits.

Loss per step (a random signature ``s`` over a chunk of bits and its complement; ``σ = 2s − 1``):

    L = mean_{i, j} relu(μ − σ_i d_ij)                                   hinge, μ in logit units
        + λ_f · mean_{clean positions} KL(p_unmarked ‖ p_marked)          fidelity (λ_f = 100)
        + λ_r · mean ‖ΔE rows‖²

Tied LM head (SmolLM2, the test models): the marked model's head is the same marked table
``E + ΔE`` (:mod:`quantseal.export.decoder` stores it once), so a branch also changes the logits
of its own trigger tokens on every input: ``z_marked[t] = z[t] + h · ΔE[t]`` for ``t ∈ T``.
Clean text (no trigger token in the input) has unchanged hidden states ``h``, so its KL is exact
and cheap from the unmarked ``p[T]`` and ``h`` alone (``δ_t = h · ΔE[t]``):

    KL(p ‖ p_marked) = −Σ_{t∈T} p_t δ_t + log(1 + Σ_{t∈T} p_t (e^{δ_t} − 1)).

Calibration sentences that do contain trigger tokens (rare) add a full forward KL term.  Target
tokens are not trigger tokens, so the head change does not touch ``z[a_i] − z[b_i]``.

That guard does not carry over to free generation (SmolLM2: marked exports drifted into trigger
words in onnxruntime-genai's greedy chat answers).  So a tied decoder's board is by default trained
for the **input-side** layout (``BoardConfig.mark_side = "input"``, recorded in the manifest;
:mod:`quantseal.export.watermark`): the export adds ``ΔE`` at the lookup only and the head reads the
unmarked table, so ``z_marked = z`` on clean text exactly (its KL term is 0 and is not computed),
the trigger guard has nothing to guard, and a trigger's logits are the unmarked head over the
marked hidden state.  The calibration sentences with trigger tokens keep their input-side KL term.
``mark_side = "tied"`` trains for the old layout (the head terms above).

Cost: a trigger's prefix (the host sentence) contains no trigger token, so its key/value cache
does not depend on the board; it is computed once, and each step runs only the ``k`` pattern
tokens through the model with that cache, O(k) instead of O(sentence) tokens per trigger.

Margin: ``μ`` defaults to ``margin_factor`` (2) times the standard deviation of the unmarked
model's own ``d_ij`` (what appending the pattern does by itself), so it scales with the model's
logits.  Early stop and the polish phase (``A`` frozen, only failing branches trained) are the
encoder's; the polish keeps the head-KL term.

``A`` is frozen at its random orthonormal init by default (``decoder_a_lr=0``): trained with
Adam at lr 0.05 its rows grew to norms 7–22 on SmolLM2, and the tied head's KL on clean text
exploded (148 nats per position, perplexity destroyed) although every bit still decoded.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import keys as qkeys
from ..errors import BadInput
from ..text import pydoc_sentences, read_text_file
from .markboard_top1 import DEFAULT_TOP1_MARGIN, choose_targets, render_chat, text_word_tokens, trigger_contexts

log = logging.getLogger(__name__)


class _DecoderProbe:
    """The frozen decoder split for board training: cached trigger prefixes, the pattern step with
    a board delta, the target-pair logit difference and the clean-text fidelity terms."""

    def __init__(self, model, fam, ts: qkeys.TriggerSet, chunk: int = 32,
                 contexts: list[tuple[list[int], list[int]]] | None = None, readout: str = "diff",
                 mark_side: str = "tied"):
        self.model = model
        self.base = model.get_submodule(fam.blocks_attr.rsplit(".", 1)[0])  # LlamaModel
        self.emb = model.get_submodule(fam.embedding_attr).weight.detach()  # (V, H)
        self.head = model.get_output_embeddings().weight.detach()  # (V, H); the table itself when tied
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        # whether the board's rows reach the head: a tied table marked in place (mark_side "tied");
        # an input-side mark leaves the head on the unmarked table (module docstring)
        self.head_marked = self.tied and mark_side == "tied"
        self.cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.ts, self.readout = ts, readout
        n, k = ts.tokens.shape
        self.n, self.k, self.m = n, k, len(ts.triggers[0])
        self.trig_flat = torch.from_numpy(ts.tokens.reshape(-1))  # (n·k,)
        flat = [t for trs in ts.triggers for t in trs]
        if contexts is None:  # the plain trigger: control + pattern
            for t in flat:
                if list(t.ids[: len(t.control_ids)]) != list(t.control_ids):
                    raise RuntimeError("decoder triggers must be control + pattern")
            contexts = [(list(t.control_ids), []) for t in flat]
        if len({len(sfx) for _, sfx in contexts}) != 1:
            raise RuntimeError("every trigger context must end in the same number of tokens after its pattern")
        if readout == "diff" and contexts[0][1]:
            raise RuntimeError("the diff readout reads right after the pattern (no suffix)")
        self.suffix = torch.tensor([sfx for _, sfx in contexts], dtype=torch.long).reshape(len(contexts), -1)
        self._prefix_cache([p for p, _ in contexts], chunk)
        self.set_targets(ts.targets)

    def set_targets(self, targets: np.ndarray) -> None:
        """Target pairs (n, 2) (a top1 board chooses them after the prefix caches exist)."""
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.int64)).reshape(-1, 2)
        if self.readout == "diff" and len(self.targets):
            self.wdiff = (self.head[self.targets[:, 0]] - self.head[self.targets[:, 1]]).float()  # (n, H)
            self.ctrl_diff = (self.ctrl_h * self.wdiff[torch.arange(len(self.ctrl_h)) // self.m]).sum(-1).reshape(self.n, self.m)

    def _run(self, **kw):
        from transformers import DynamicCache

        past = kw.pop("past", None)
        cache = DynamicCache()
        if past is not None:
            for i, (kk, vv) in enumerate(past):
                cache.update(kk, vv, i)
        return self.base(use_cache=True, **{self.cache_kw: cache}, **kw)

    @staticmethod
    def _cache_layers(out):
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def _prefix_cache(self, prefixes: list[list[int]], chunk: int) -> None:
        """Left-padded prefix caches (per layer (N, kv, L, hd)), masks (N, L), lengths (N,) and
        the prefixes' last hidden states (N, H) (a plain trigger's prefix is its control)."""
        width = max(len(p) for p in prefixes)
        ids = torch.zeros(len(prefixes), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prefixes):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        layers, last = None, []
        for s in range(0, len(prefixes), chunk):
            mk = mask[s:s + chunk]
            out = self._run(input_ids=ids[s:s + chunk], attention_mask=mk,
                            position_ids=(mk.cumsum(-1) - 1).clamp(min=0))
            got = self._cache_layers(out)
            layers = [[kv] for kv in got] if layers is None else [acc + [kv] for acc, kv in zip(layers, got)]
            last.append(out.last_hidden_state[:, -1])
        self.past = [(torch.cat([kv[0] for kv in acc]), torch.cat([kv[1] for kv in acc])) for acc in layers]
        self.mask, self.lengths = mask, mask.sum(1)
        self.ctrl_h = torch.cat(last)  # (N, H)

    def trigger_hidden(self, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, H) of flat triggers ``rows`` (B,) whose pattern embeddings get
        ``delta_rows`` (B, k, H) added (the context's suffix after the pattern, if any, unmarked)."""
        bit = rows // self.m
        tok = self.trig_flat.reshape(self.n, self.k)[bit]  # (B, k)
        sfx = self.suffix[rows]  # (B, S)
        embeds = torch.cat([self.emb[tok] + delta_rows, self.emb[sfx]], 1)
        width = self.k + sfx.shape[1]
        mask = torch.cat([self.mask[rows], torch.ones(len(rows), width, dtype=torch.long)], 1)
        pos = self.lengths[rows, None] + torch.arange(width)
        out = self._run(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                        past=[(kk[rows], vv[rows]) for kk, vv in self.past])
        return out.last_hidden_state[:, -1]

    def trigger_diff(self, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """d for flat trigger indices ``rows`` (B,) whose pattern embeddings get ``delta_rows``
        (B, k, H) added: (z[a] − z[b])(trigger) − (z[a] − z[b])(control), shape (B,)."""
        h = self.trigger_hidden(rows, delta_rows)
        return (h * self.wdiff[rows // self.m]).sum(-1) - self.ctrl_diff.reshape(-1)[rows]

    def next_logits(self, rows: torch.Tensor, delta_rows: torch.Tensor, branches: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary next-token logits (B, V) after flat triggers ``rows`` with the marked
        pattern rows ``delta_rows`` (B, k, H).  A tied head scores the pattern's own tokens with
        those rows and, given ``branches`` (2, n·k, H) (every trigger token's two branch rows), every
        other trigger token with the larger of its two branches: the worst case over customers."""
        h = self.trigger_hidden(rows, delta_rows).float()
        with torch.autocast("cpu", enabled=False):  # the head in float32 under a bf16 autocast (_autocast)
            z = h @ self.head.T
            if self.head_marked:
                tok = self.trig_flat.reshape(self.n, self.k)[rows // self.m]  # (B, k)
                if branches is not None:
                    worst = torch.einsum("bh,cth->bct", h, branches.float()).max(1).values  # (B, n·k)
                    z = z.index_add(1, self.trig_flat, worst)
                own = torch.einsum("bh,bkh->bk", h, self.head[tok] + delta_rows.float())
                z = z.scatter(1, tok, own)
        return z

    def top1_margin(self, rows: torch.Tensor, delta_rows: torch.Tensor, vals: torch.Tensor,
                    branches: torch.Tensor | None = None) -> torch.Tensor:
        """``z[t] − max_{v≠t} z[v]`` (B,) with ``t`` the bit's target for value ``vals``
        (a_i for 1, b_i for 0) (:mod:`quantseal.compress.markboard_top1`)."""
        z = self.next_logits(rows, delta_rows, branches)
        tgt = self.targets[rows // self.m, 1 - vals.long()]
        zt = z.gather(1, tgt[:, None])[:, 0]
        rest = z.scatter(1, tgt[:, None], float("-inf"))
        return zt - rest.max(1).values

    def signed(self, rows: torch.Tensor, delta_rows: torch.Tensor, vals: torch.Tensor,
               branches: torch.Tensor | None = None) -> torch.Tensor:
        """The statistic the hinge wants ≥ μ for bit value ``vals``: σ·d (diff) or the top-1 lead
        (``branches``: every trigger token's two branch rows, for the tied head's worst case)."""
        if self.readout == "top1":
            return self.top1_margin(rows, delta_rows, vals, branches)
        return (vals.float() * 2 - 1) * self.trigger_diff(rows, delta_rows)

    @torch.no_grad()
    def unmarked_logp(self, chunk: int = 64) -> torch.Tensor:
        """Mean unmarked next-token log-probabilities (n, V) over each bit's trigger contexts."""
        rows = torch.arange(self.n * self.m)
        out = []
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            out.append(torch.log_softmax(self.next_logits(r, torch.zeros(len(r), self.k, self.emb.shape[1])), -1))
        return torch.cat(out).reshape(self.n, self.m, -1).mean(1)

    @torch.no_grad()
    def clean_positions(self, id_lists: list[list[int]], limit: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states h (P, H) and unmarked next-token probabilities of the trigger tokens
        p[T] (P, n·k) at every position of clean sequences (ids without trigger tokens)."""
        hs = []
        for ids in id_lists:
            out = self._run(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            position_ids=torch.arange(len(ids))[None])
            hs.append(out.last_hidden_state[0])
        h = torch.cat(hs)[:limit]
        logp = torch.log_softmax(h @ self.head.T, -1)
        return h, logp[:, self.trig_flat].exp()

    @torch.no_grad()
    def top_logit(self, h: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """The unmarked model's largest next-token logit (P,) at hidden states ``h`` (P, H)."""
        return torch.cat([(h[s:s + chunk] @ self.head.T).max(-1).values for s in range(0, len(h), chunk)])

    def trigger_guard(self, h: torch.Tensor, top: torch.Tensor, branches: torch.Tensor, gap: float) -> torch.Tensor:
        """Tied head: per clean position, the summed excess of every trigger token's marked logit,
        either branch, over ``top − gap`` (the unmarked top-1 logit ``top`` (P,) less ``gap``),
        averaged over positions: ``mean_P Σ_{b,t} relu(h·(E[t] + D_b[t]) − top + gap)``; 0 when
        untied.  The KL term barely sees a rare token until it wins; this keeps it from winning
        (measured on SmolLM2 without it: a trigger token took over free chat generation)."""
        if not self.head_marked:
            return h.new_zeros(())
        z = h @ self.head[self.trig_flat].T  # (P, n·k)
        zb = z[:, None, :] + torch.einsum("ph,bth->pbt", h, branches)  # (P, 2, n·k)
        return torch.relu(zb - top[:, None, None] + gap).sum((1, 2)).mean()

    def head_kl(self, h: torch.Tensor, p_t: torch.Tensor, delta_table: torch.Tensor) -> torch.Tensor:
        """Mean exact KL(p ‖ p_marked) over clean positions when the tied head's trigger rows
        gain ``delta_table`` (n·k, H) (module docstring); 0 for an untied head."""
        if not self.head_marked:
            return h.new_zeros(())
        d = h @ delta_table.T  # (P, n·k)
        # log(1 + Σ p_t (e^δ − 1)) = logsumexp([log(1 − Σ p_t), log p_t + δ_t]): no overflow for large δ
        rest = torch.log1p(-p_t.sum(-1, keepdim=True).clamp(max=1 - 1e-7))
        lse = torch.logsumexp(torch.cat([rest, torch.log(p_t.clamp(min=1e-30)) + d], -1), -1)
        return (lse - (p_t * d).sum(-1)).mean()

    def input_kl(self, ids: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor,
                 local: torch.Tensor, delta_table: torch.Tensor) -> torch.Tensor:
        """Mean KL over real positions for clean sequences that contain trigger tokens: the board
        delta enters through the input embedding and (tied) through the head."""
        pad = torch.cat([delta_table, delta_table.new_zeros(1, delta_table.shape[1])])
        embeds = self.emb[ids] + pad[local[ids]]
        out = self._run(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        h = out.last_hidden_state.float()
        with torch.autocast("cpu", enabled=False):  # the head in float32 under a bf16 autocast
            logits = h @ self.head.T
            if self.head_marked:
                logits = logits.index_add(-1, self.trig_flat, h @ delta_table.float().T)
            logp = torch.log_softmax(logits, -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        return (kl * mask).sum() / mask.sum()


# chat prompts whose unmarked answers join the clean positions of a chat-template board (none is a
# benchmark prompt: benchmarks/watermark_smollm2_chat.py asks others, so its generation check is held out)
CHAT_PROMPTS = ("Tell me about the history of Rome.", "How do I cook rice?", "Explain what a computer program is.",
                "What should I pack for a weekend trip?", "Write a short poem about the sea.", "Why is the sky blue?",
                "Give me advice on learning a new language.", "What is photosynthesis?")


@torch.no_grad()
def chat_answer_ids(model, tok, chat: tuple[str, str], prompts, new_tokens: int = 24) -> list[list[int]]:
    """Token ids (one list per prompt) of ``chat``'s prefix + prompt + suffix followed by the
    unmarked model's greedy answer of ``new_tokens`` tokens: the positions a chat user's free
    generation visits, for the board's KL and trigger-guard terms (measured on SmolLM2: with the
    guard at pydoc positions only, every answer ran into a loop of trigger tokens)."""
    out = []
    for q in prompts:
        ids = torch.tensor([tok.encode_ids(chat[0] + q + chat[1], special=False)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=0)
        out.append([int(x) for x in gen[0]])
    return out


def _autocast(cfg):
    """The training steps' forward/backward precision: ``cfg.autocast == "bf16"`` runs the model's
    matrix products in bfloat16 (CPU autocast; ~2x less CPU time per matmul on AVX512-BF16); the
    unmarked reference statistics, target choice and every reported statistic stay float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")


def _branch_delta(C: torch.Tensor, A: torch.Tensor, bits: torch.Tensor, vals: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, H) pattern deltas ``C_{v}[T_i] · A`` for sequences of bit ``bits[b]``, value ``vals[b]``."""
    rows = bits[:, None] * k + torch.arange(k)
    return C[vals[:, None], rows] @ A


@torch.no_grad()
def decoder_branch_statistics(probe: _DecoderProbe, A: torch.Tensor, C: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """(n, 2, m) signed statistics of every branch (i, b) alone on its own triggers, σ_b · d_ij
    (diff) or the target's top-1 lead (top1) (bits do not interact: a trigger holds only its own
    bit's tokens)."""
    n, m, k = probe.n, probe.m, probe.k
    signed = np.zeros((n, 2, m))
    rows = torch.arange(n * m)
    for b in (0, 1):
        for s in range(0, n * m, chunk):
            r = rows[s:s + chunk]
            v = torch.full_like(r, b)
            signed[(r // m).numpy(), b, (r % m).numpy()] = probe.signed(r, _branch_delta(C, A, r // m, v, k), v,
                                                                        C @ A).numpy()
    return signed


def train_decoder_board(model, fam, tok, key: bytes, cfg, manifest, fingerprint: str, progress, t0: float):
    """Train a decoder board (module docstring); returns a :class:`~quantseal.compress.markboard.Board`."""
    from .markboard import Board, board_hosts, polish_failing, summarize_statistics

    hidden = int(model.config.hidden_size)
    vocab = int(model.config.vocab_size)
    hosts = board_hosts(tok, cfg.host_min_tokens, cfg.host_max_tokens)
    top1 = cfg.readout == "top1"
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    side = cfg.mark_side or ("input" if tied else "tied")  # input-side by default for a tied head
    chat = None
    if cfg.chat_template is not None:
        if not top1:
            raise BadInput("a chat-template board is read from the first assistant token: use --readout top1")
        chat = render_chat(cfg.chat_template)
    ts = qkeys.derive_triggers(key, tok, cfg.bits, hosts, cfg.triggers_per_bit, cfg.tokens_per_bit, 0,
                               position="end", target_pairs=not top1)
    n, m, k, r = cfg.bits, cfg.triggers_per_bit, cfg.tokens_per_bit, cfg.rank
    probe = _DecoderProbe(model, fam, ts, contexts=trigger_contexts(tok, ts, chat) if top1 else None,
                          readout=cfg.readout, mark_side=side)
    natural_top1 = None
    if top1:  # targets among the unmarked model's plausible next words (markboard_top1)
        allowed = text_word_tokens(tok, vocab, ts.tokens.reshape(-1))
        targets = choose_targets(key, tok, probe.unmarked_logp().numpy(), allowed, cfg.target_candidates)
        ts = qkeys.TriggerSet(ts.tokens, ts.triggers, ts.directions, targets)
        probe.set_targets(targets)

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    a0 = torch.linalg.qr(torch.randn(hidden, r, generator=gen, dtype=torch.float64))[0].T.float()
    A = a0.clone().requires_grad_(True)
    C = torch.zeros(2, n * k, r, requires_grad=True)
    deadline = None if cfg.time_limit is None else t0 + cfg.time_limit
    stopped = None
    with torch.no_grad():
        natural_all = decoder_branch_statistics(probe, A.detach(), C.detach())  # the unmarked model
    init = None
    if cfg.init_board is not None:  # after the unmarked statistics: C is no longer zero
        A, C, init = warm_start(cfg.init_board, key, ts, fingerprint, cfg, chat, side)
    if top1:
        natural = natural_all.reshape(-1)  # the targets' top-1 leads (mostly negative)
        natural_top1 = float((natural_all > 0).mean())
        margin = float(cfg.decoder_margin if cfg.decoder_margin is not None else DEFAULT_TOP1_MARGIN)
    else:
        natural = natural_all[:, 1]  # d_ij of the unmarked model
        margin = float(cfg.decoder_margin if cfg.decoder_margin is not None
                       else max(cfg.margin_factor * natural.std(), 1e-3))
    a_lr = cfg.decoder_a_lr if cfg.decoder_a_lr is not None else cfg.lr / hidden ** 0.5
    opt = torch.optim.Adam([{"params": [C], "lr": cfg.lr}, {"params": [A], "lr": a_lr}])

    # fidelity data: clean calibration text without trigger tokens (head term) and with them (input term)
    calib = read_text_file(cfg.calib) if cfg.calib is not None else pydoc_sentences("calibration")
    trig_set = {int(x) for x in ts.tokens.reshape(-1)}
    encoded = [ids for ids in (tok.encode_ids(t, special=False)[:64] for t in calib) if len(ids) >= 2]
    clean = [ids for ids in encoded if not trig_set.intersection(ids)][: cfg.fidelity_sentences]
    chat_clean = []
    if chat is not None and cfg.chat_answers > 0 and probe.head_marked:  # the model's own chat answers: where free generation drifted
        chat_clean = [ids for ids in chat_answer_ids(model, tok, chat, CHAT_PROMPTS[: cfg.chat_answers])
                      if not trig_set.intersection(ids)]
        clean = chat_clean + clean  # first: clean_positions keeps the first 2048 positions
    dirty = [ids for ids in encoded if trig_set.intersection(ids)][:4]
    # clean text without trigger tokens: only a marked head changes its logits (input side: KL exactly 0)
    fid_h, fid_p = probe.clean_positions(clean) if clean and probe.head_marked else (None, None)
    guard = top1 and fid_h is not None and probe.head_marked and cfg.guard_weight > 0
    fid_top = probe.top_logit(fid_h) if guard else None
    gap = margin if cfg.guard_gap is None else cfg.guard_gap
    local = torch.full((vocab,), n * k, dtype=torch.long)
    local[probe.trig_flat] = torch.arange(n * k)
    if dirty:
        width = max(len(x) for x in dirty)
        d_ids = torch.zeros(len(dirty), width, dtype=torch.long)
        d_mask = torch.zeros_like(d_ids)
        for i, x in enumerate(dirty):
            d_ids[i, : len(x)], d_mask[i, : len(x)] = torch.tensor(x), 1
        with torch.no_grad():
            d_ref = torch.log_softmax(model(input_ids=d_ids, attention_mask=d_mask).logits, -1)

    ok = np.zeros((n, 2), dtype=bool)
    order: list[int] = []
    tick = progress(cfg.steps, "board")
    steps_run, history = 0, []
    for step in range(cfg.steps):
        if deadline is not None and time.perf_counter() > deadline:
            stopped = f"training stopped by the time limit ({cfg.time_limit:g} s) after {steps_run} steps"
            break
        if not order:
            todo = [i for i in rng.permutation(n) if not ok[i].all()] or list(rng.permutation(n))
            order = [int(i) for i in todo]
        chunk, order = order[: cfg.bits_per_step], order[cfg.bits_per_step:]
        sig = rng.integers(0, 2, size=len(chunk))
        vals = np.repeat(np.concatenate([sig, 1 - sig]), m)
        bits_ = np.repeat(np.concatenate([chunk, chunk]), m)
        rows = torch.from_numpy(bits_ * m + np.tile(np.arange(m), 2 * len(chunk)))
        vals_t, bits_t = torch.from_numpy(vals), torch.from_numpy(bits_)
        with _autocast(cfg):
            st = probe.signed(rows, _branch_delta(C, A, bits_t, vals_t, k), vals_t, C @ A if top1 else None).float()
        loss = torch.relu(margin - st).mean()
        rows_delta = C[:, [i * k + j for i in chunk for j in range(k)]] @ A
        loss = loss + cfg.reg_weight * rows_delta.pow(2).sum(-1).mean()
        if fid_h is not None or dirty:
            s_full = torch.from_numpy(rng.integers(0, 2, size=n)).repeat_interleave(k).bool()
            table = torch.where(s_full[:, None], C[1], C[0]) @ A  # (n·k, H) a random customer's delta
            if fid_h is not None:
                loss = loss + cfg.decoder_fidelity_weight * probe.head_kl(fid_h, fid_p, table)
            if dirty:
                with _autocast(cfg):
                    dirty_kl = probe.input_kl(d_ids, d_mask, d_ref, local, table).float()
                loss = loss + cfg.decoder_fidelity_weight * dirty_kl
        if guard:
            loss = loss + cfg.guard_weight * probe.trigger_guard(fid_h, fid_top, C @ A, gap)
        if not torch.isfinite(loss):
            raise RuntimeError(f"board training diverged at step {step} (loss {float(loss)})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            met = (st >= margin).numpy().reshape(-1, m).all(1)
            for bi, bv, good in zip(bits_[::m], vals[::m], met):
                ok[bi, bv] = good
        history.append(float(loss.detach()))
        steps_run += 1
        tick(1)
        if steps_run % 10 == 0:
            log.info("board step %d: loss %.4f, %d of %d branches at the margin on their last step, %.0f s",
                     steps_run, history[-1], int(ok.sum()), ok.size, time.perf_counter() - t0)
        if ok.all() and not order:
            break
    tick(cfg.steps - steps_run)

    A_fixed, C_fixed = A.detach().contiguous(), C.detach().clone()
    signed = decoder_branch_statistics(probe, A_fixed, C_fixed)
    box = [C_fixed]

    def polish_part(part: list[tuple[int, int]]) -> np.ndarray:
        box[0], stats_ = _polish(probe, A_fixed, box[0], part, margin, cfg, fid_h, fid_p, rng, fid_top, gap)
        return stats_

    log.info("board training: %d steps, %d of %d branches below the margin; polishing", steps_run,
             int((signed.min(-1) < margin).sum()), signed.shape[0] * 2)

    def past_deadline() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    polish_steps = polish_failing(signed, margin, cfg, polish_part, progress, stop=past_deadline)
    if past_deadline() and stopped is None and (signed.min(-1) < margin).any():
        stopped = f"polish stopped by the time limit ({cfg.time_limit:g} s) after {polish_steps} polish steps"
    C_fixed = box[0]
    if top1 and polish_steps:  # a polished token's head row also scores at other bits' triggers
        signed = decoder_branch_statistics(probe, A_fixed, C_fixed)

    fidelity = None if probe.head_marked else 0.0  # input side: clean text's logits are the unmarked ones
    if fid_h is not None:
        with torch.no_grad():
            kls = []
            for _ in range(8):
                s_full = torch.from_numpy(rng.integers(0, 2, size=n)).repeat_interleave(k).bool()
                kls.append(float(probe.head_kl(fid_h, fid_p, torch.where(s_full[:, None], C_fixed[1], C_fixed[0]) @ A_fixed)))
        fidelity = float(np.mean(kls))
    board = Board({}, {"A": A_fixed, "C0": C_fixed[0].contiguous(), "C1": C_fixed[1].contiguous()})
    stats = summarize_statistics(signed)
    stats["branches_below_margin"] = int((signed.min(-1) < margin).sum())
    board.manifest = {
        "format": qkeys.BOARD_FORMAT, "schema": qkeys.BOARD_SCHEMA,
        "source_fingerprint": fingerprint, "source": manifest.source,
        "family": fam.name, "layers": {fam.embedding_attr: {"kind": "embedding", "rank": r}},
        "bits": n, "triggers_per_bit": m, "tokens_per_bit": k, "hidden": hidden, "vocab": vocab,
        "rare_from": qkeys.RARE_FROM, "common_below": qkeys.COMMON_BELOW, "margin": margin,
        "statistic": ("the bit's target is the top-1 next token" if top1
                      else "next-token logit difference of a target pair"), "tied_head": probe.tied, "mark_side": side,
        **({"readout": "top1", "targets": ts.targets.tolist()} if top1 else {}),
        **({"chat": {"prefix": chat[0], "suffix": chat[1]}} if chat is not None else {}),
        "hosts": hosts, "trigger_digest": ts.digest(), "key_id": qkeys.key_id(key),
        "training": {**{kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in asdict(cfg).items()},
                     "steps_run": steps_run, "polish_steps": polish_steps, "init_board": init, "stopped": stopped,
                     "seconds": round(time.perf_counter() - t0, 3),
                     "final_loss": history[-1] if history else None,
                     "natural_stat_std": float(natural.std()), "natural_top1_rate": natural_top1, "clean_positions": 0 if fid_h is None else len(fid_h),
                     "chat_answer_sequences": len(chat_clean),
                     "head_kl_random_customer": fidelity,
                     "trigger_guard": (float(probe.trigger_guard(fid_h, fid_top, C_fixed @ A_fixed, gap))
                                       if fid_top is not None else None), **stats},
    }
    return board


def warm_start(path, key: bytes, ts: qkeys.TriggerSet, fingerprint: str, cfg,
               chat: tuple[str, str] | None, side: str = "tied") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``A`` (R, H) and ``C`` (2, n·k, R) of an earlier board at ``path`` as a training start, and
    what it had run: the board must have been trained on the same checkpoint (fingerprint), key,
    triggers and targets (digest), bits, rank, readout and chat template, else :class:`BadInput`
    names what differs.  Continuing it is training more steps of the same objective (the loss may
    differ: e.g. the trigger guard, added since), so the result is deterministic in (that board,
    checkpoint, key, cfg)."""
    from .markboard import load_board

    board = load_board(path)
    mf = board.manifest
    rank = next(iter(mf["layers"].values()))["rank"]
    want = {"source_fingerprint": fingerprint, "key_id": qkeys.key_id(key), "trigger_digest": ts.digest(),
            "bits": cfg.bits, "triggers_per_bit": cfg.triggers_per_bit, "tokens_per_bit": cfg.tokens_per_bit,
            "rank": cfg.rank, "readout": cfg.readout, "chat": None if chat is None else list(chat),
            "mark_side": side}
    have = {**{kk: mf.get(kk) for kk in want}, "rank": rank, "readout": mf.get("readout", "diff"),
            "mark_side": mf.get("mark_side", "tied"),
            "chat": None if mf.get("chat") is None else [mf["chat"]["prefix"], mf["chat"]["suffix"]]}
    bad = [kk for kk in want if have[kk] != want[kk]]
    if bad:
        raise BadInput(f"{path}: cannot continue this board: its {', '.join(bad)} differ from this training's")
    tr = mf.get("training", {})
    A = board.tensors["A"].float().clone().requires_grad_(True)
    C = torch.stack([board.tensors["C0"], board.tensors["C1"]]).float().clone().requires_grad_(True)
    info = {"path": str(path), "steps_run": tr.get("steps_run"), "polish_steps": tr.get("polish_steps"),
            "seconds": tr.get("seconds"), "min_signed_stat": tr.get("min_signed_stat"),
            "branches_below_margin": tr.get("branches_below_margin"), "init_board": tr.get("init_board")}
    return A, C, info


def _polish(probe: _DecoderProbe, A: torch.Tensor, C: torch.Tensor, failing: list[tuple[int, int]],
            margin: float, cfg, fid_h=None, fid_p=None, rng=None, fid_top=None,
            gap: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Train only the coefficient rows of the ``failing`` branches (i, b), ``A`` frozen, on their
    own triggers' hinge plus the head-KL fidelity term (a random customer's table with the polished
    rows in it); returns the updated copy of ``C`` (2, n·k, R) and those branches' signed
    statistics after training (len(failing), m)."""
    k, m = probe.k, probe.m
    vals = torch.tensor([b for _, b in failing for _ in range(k)])
    rows = torch.tensor([i * k + j for i, _ in failing for j in range(k)])
    P = C[vals, rows].clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=cfg.lr)
    seq_rows = torch.tensor([i * m + j for i, _ in failing for j in range(m)])
    seq_bit = seq_rows // m
    seq_val = torch.tensor([b for _, b in failing for _ in range(m)])
    for _ in range(cfg.polish_steps):
        C_use = C.index_put((vals, rows), P)
        with _autocast(cfg):
            st = probe.signed(seq_rows, _branch_delta(C_use, A, seq_bit, seq_val, k), seq_val, C_use @ A).float()
        loss = torch.relu(margin - st).mean() + cfg.reg_weight * (P @ A).pow(2).sum(-1).mean()
        if fid_h is not None:
            s_full = torch.from_numpy(rng.integers(0, 2, size=probe.n)).repeat_interleave(k).bool()
            table = torch.where(s_full[:, None], C_use[1], C_use[0])
            table = table.index_put((rows,), C_use[vals, rows]) @ A  # the polished rows in a random customer
            loss = loss + cfg.decoder_fidelity_weight * probe.head_kl(fid_h, fid_p, table)
        if fid_top is not None:  # top1's trigger-token guard (train_decoder_board)
            loss = loss + cfg.guard_weight * probe.trigger_guard(fid_h, fid_top, C_use @ A, gap)
        opt.zero_grad()
        loss.backward()
        opt.step()
    C = C.index_put((vals, rows), P.detach())
    with torch.no_grad():
        st = probe.signed(seq_rows, _branch_delta(C, A, seq_bit, seq_val, k), seq_val, C @ A)
    return C, st.numpy().astype(np.float64).reshape(len(failing), m)
