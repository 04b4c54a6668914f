"""Train the Hot-Swap MarkBoard: two LoRA branches per signature bit on the token embedding.

Encoders here; decoders (a target-token pair per bit, next-token logits) in
:mod:`quantseal.compress.markboard_decoder`, which shares the board layout and files.

Hot-Swap MarkBoard (DESIGN §5): a board is trained once on the compressed model, jointly, with a
random signature drawn at every step, so that any of the 2ⁿ combinations of branches carries its
bits; a customer's model is then made by folding that customer's n branches into the low-rank
factors (:mod:`quantseal.export.watermark`), without training.

Where the branches live.  Planning found that rank-1 branches on MiniLM's late FFN layers do not
learn from random-token triggers (they move every input alike).  Token identity lives in the token
embedding, so the branches live there, on rows the key reserves: bit ``i`` owns ``k`` rare tokens
``T_i`` (disjoint across bits, absent from the host text; :func:`quantseal.keys.derive_triggers`).
The board is one embedding LoRA of rank ``R`` with a shared ``A: (R, H)`` and, per bit and value
``b``, the coefficient rows ``C_b[T_i]: (k, R)``.  Branch ``(i, b)`` is the delta

    ΔE = onehot(T_i) · C_b[T_i] · A          (V, H), non-zero on the k rows of T_i only,

and a customer with codeword ``s`` gets ``L1' = [L1 | Σ_i onehot(T_i) C_{s_i}[T_i]]``,
``L2' = [L2 ; A]``: n branches for the price of rank ``R`` (default 16) whatever n is.

Consequences: text without trigger tokens is embedded *exactly* as by the unmarked model (the
fidelity term below is non-zero only for calibration text that happens to contain a trigger
token), and bits do not interact, so training costs O(n) short sequences.

Loss, per step (a random signature ``s`` over a chunk of bits, and its complement, so every
branch of a visited bit gets a gradient; ``σ_i = 2 s_i − 1``; ``e`` the L2-normalised sentence
embedding, ``v_i`` the key's unit direction):

    L = mean_{i, j} relu(μ − σ_i ⟨e(trigger_ij) − e(control_ij), v_i⟩)
        + λ_f · mean_{clean x ∋ trigger token} (1 − cos(e_marked(x), e_unmarked(x)))
        + λ_r · mean ‖ΔE rows‖²

Training stops early once every branch has met the margin on its last visit.  Those flags go
stale (the shared ``A`` and Adam's momentum keep moving a branch after its visit), so a **polish**
phase follows with ``A`` frozen: every branch is evaluated alone on its triggers, and only the
coefficient rows of the branches below the margin are trained (a fresh optimiser over those rows
alone), then all are evaluated again.  With ``A`` frozen, bit ``i``'s statistic depends on
``C_b[T_i]`` only, so a branch that passed cannot be broken by another branch's polish.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import keys as qkeys
from ..checkpoint import publish_folder
from ..integrity import check_files, file_records
from ..publish import check_output_folder, temp_folder
from ..errors import BadInput, Unsupported
from ..keys import BOARD_FORMAT, BOARD_MANIFEST, BOARD_SCHEMA, read_board_manifest, triggers_of  # noqa: F401
from ..text import TextTokenizer, pydoc_sentences, read_text_file

BOARD_WEIGHTS = "board.safetensors"


@dataclass
class BoardConfig:
    """``quantseal board train`` settings."""

    bits: int = qkeys.DEFAULT_BITS
    triggers_per_bit: int = 4  # m
    tokens_per_bit: int = 2  # k
    rank: int = 16  # R of the shared embedding LoRA
    steps: int = 200  # upper bound; training stops once every branch meets the margin
    polish_rounds: int = 8  # evaluate-all / train-the-failing rounds with A frozen
    polish_steps: int = 15  # steps per polish round
    bits_per_step: int = 16
    lr: float = 0.05
    margin: float = 0.15  # μ, in units of the (unit-norm) sentence embedding
    fidelity_weight: float = 1.0  # λ_f
    reg_weight: float = 1e-3  # λ_r
    seed: int = 0
    calib: Path | None = None
    host_min_tokens: int = 8
    host_max_tokens: int = 20
    # decoders (:mod:`.markboard_decoder`): the hinge margin μ in logit units; None: margin_factor
    # times the standard deviation of the unmarked model's own trigger statistics
    decoder_margin: float | None = None
    margin_factor: float = 2.0
    fidelity_sentences: int = 48  # clean calibration sentences for the decoder's head-KL term
    decoder_fidelity_weight: float = 100.0  # λ_f for decoders: KL in nats per position vs a hinge in logits
    # Adam step for the shared A on decoders.  0 (default): A stays at its random orthonormal init
    # and only the coefficient rows train.  With A trained at lr 0.05, A's rows grew to norms 7-22 on
    # SmolLM2 and the tied head's KL exploded (148 nats per position); at 16 bits, A frozen gave a
    # head KL of 6e-4 and A at lr / sqrt(hidden) (None) 2.6e-3, every branch meeting its margin.
    decoder_a_lr: float | None = 0.0
    # decoders: "diff" (z[a] − z[b] after a trigger vs its control, read with logits or logit_bias) or
    # "top1" (the bit's target is the greedy next token: readable from top_logprobs and greedy text;
    # :mod:`.markboard_top1`; margin default 2 logits unless decoder_margin says otherwise)
    readout: str = "diff"
    chat_template: str | None = None  # top1: Jinja chat template; train and read on the templated trigger
    target_candidates: int = 16  # top1: targets drawn among this many most plausible next words
    # top1, tied head: keep every trigger token (either branch) guard_gap logits (None: the margin)
    # below the unmarked top-1 at clean positions (:meth:`~.markboard_decoder._DecoderProbe.trigger_guard`); 0: off
    guard_weight: float = 1.0
    guard_gap: float | None = None
    # decoders: continue from an earlier board of the same key, checkpoint and triggers (its A and C
    # as the start; :func:`~.markboard_decoder.warm_start`), and/or stop training and polish after
    # time_limit seconds of wall time (the manifest records where it stopped)
    init_board: Path | None = None
    time_limit: float | None = None
    # decoders: "bf16" runs the training steps' model forward/backward under bfloat16 autocast (the
    # reported statistics stay float32); None: float32 throughout
    autocast: str | None = None
    # top1 chat-template boards: the unmarked model's greedy answers to this many built-in chat prompts
    # (markboard_decoder.CHAT_PROMPTS, at most 8) join the clean positions of the KL and guard terms; 0: off
    chat_answers: int = 8
    # decoders: where a customer's mark goes (export/watermark.py): "tied" folds it into the token
    # table (a tied head reads it too), "input" adds it at the lookup only (the head reads the unmarked
    # table: text without trigger tokens is bit-identical); None: "input" for a tied head, else "tied"
    mark_side: str | None = None

    def __post_init__(self):
        if self.bits < 8 or self.bits % 8:
            raise BadInput(f"--bits must be a positive multiple of 8, got {self.bits}")
        if self.polish_rounds < 0 or self.polish_steps < 1:
            raise BadInput("polish_rounds must be ≥ 0 and polish_steps positive")
        for name in ("triggers_per_bit", "tokens_per_bit", "rank", "steps", "bits_per_step"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be positive")
        if not (self.margin > 0 and self.lr > 0 and self.margin_factor > 0):
            raise BadInput("margin, margin_factor and lr must be positive")
        if self.decoder_fidelity_weight < 0 or self.fidelity_weight < 0:
            raise BadInput("fidelity weights must be non-negative")
        if self.readout not in ("diff", "top1"):
            raise BadInput(f"--readout must be diff or top1, not {self.readout!r}")
        if self.chat_template is not None and self.readout != "top1":
            raise BadInput("a chat-template board is read from the first assistant token: use --readout top1")
        if self.guard_weight < 0 or (self.guard_gap is not None and self.guard_gap < 0):
            raise BadInput("guard_weight and guard_gap must be non-negative")
        if self.target_candidates < 2:
            raise BadInput("target_candidates must be at least 2")
        if not 0 <= self.chat_answers <= 8:
            raise BadInput(f"chat_answers must be in 0..8, not {self.chat_answers}")
        if self.autocast not in (None, "bf16"):
            raise BadInput(f"autocast must be bf16 or None, not {self.autocast!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise BadInput(f"--time-limit must be positive seconds, got {self.time_limit}")
        if self.mark_side not in (None, "tied", "input"):
            raise BadInput(f"--mark-side must be tied or input, not {self.mark_side!r}")
        if self.decoder_margin is not None and not self.decoder_margin > 0:
            raise BadInput("decoder_margin must be positive")


@dataclass
class Board:
    """A trained board: its manifest (JSON-able dict), tensors, and the folder it lives in."""

    manifest: dict
    tensors: dict[str, torch.Tensor]  # "A": (R, H) float32; "C0", "C1": (bits·k, R) float32
    path: Path | None = None

    @property
    def layer(self) -> str:
        return next(iter(self.manifest["layers"]))

    def tokenizer(self) -> TextTokenizer:
        if self.path is None:
            raise BadInput("the board has no folder (and so no tokenizer)")
        return TextTokenizer(self.path)

    def branch_rows(self, codeword: np.ndarray) -> torch.Tensor:
        """(bits·k, R) coefficient rows of the customer's chosen branches (bit-major order)."""
        k = self.manifest["tokens_per_bit"]
        pick = torch.from_numpy(np.repeat(np.asarray(codeword, dtype=bool), k))
        return torch.where(pick[:, None], self.tensors["C1"], self.tensors["C0"])


# ----------------------------------------------------------------------------- helpers
def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of a checkpoint's tensors."""
    h = hashlib.sha256(b"quantseal/tensors/v1")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def board_hosts(tok: TextTokenizer, cfg_min: int = 8, cfg_max: int = 20) -> list[str]:
    """Host sentences for triggers: short natural sentences of ``pydoc_data.topics``."""
    return qkeys.host_sentence_pool(tok, pydoc_sentences("all"), cfg_min, cfg_max)


def _batch(tok: TextTokenizer, id_lists) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in tok.pad_batch([list(x) for x in id_lists]).items()}


class _EmbeddingDelta:
    """Maps token ids to their board delta: rows of ``C_b`` (by local trigger index) times ``A``."""

    def __init__(self, token_table: np.ndarray, vocab: int):
        flat = torch.from_numpy(token_table.reshape(-1))
        self.local = torch.full((vocab,), len(flat), dtype=torch.long)
        self.local[flat] = torch.arange(len(flat))

    def rows(self, ids: torch.Tensor, coef: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """ids: (B, T); coef: (B, n_tok, R) per-sequence coefficient tables → (B, T, H)."""
        padded = torch.cat([coef, coef.new_zeros(coef.shape[0], 1, coef.shape[2])], 1)
        loc = self.local[ids.cpu()].to(coef.device)  # (B, T)
        c = torch.gather(padded, 1, loc[..., None].expand(-1, -1, coef.shape[2]))
        return c @ a


def _encode_with_delta(model, fam, batch, delta_rows):
    from ..devices import to_device
    from ..models import embedding, mean_pool_normalize

    batch = to_device(batch, model.device)  # a CPU batch of token ids (board train --device)
    emb = embedding(model, fam)(batch["input_ids"])
    out = model(inputs_embeds=emb + delta_rows, attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    return mean_pool_normalize(out.last_hidden_state, batch["attention_mask"])


# ----------------------------------------------------------------------------- training
def train_board(checkpoint: str | Path, key: bytes, cfg: BoardConfig,
                progress: Callable[[int, str], Callable[[int], None]] | None = None,
                device: str | torch.device = "cpu") -> Board:
    """Train a board on a compressed checkpoint (Q and its L1/L2 frozen).  ``progress(total, desc)``
    returns a ``tick(n)``.  Deterministic in (checkpoint, key, cfg) on a given machine.

    ``device`` (:mod:`quantseal.devices`, ``board train --device``): where an encoder board trains
    (the frozen model, the board's A and C, the statistics); random draws are made on the CPU and
    moved, the board is written from the CPU.  Decoder boards train on the CPU (``cuda`` is refused
    for them, ``auto`` is the CPU)."""
    from ..checkpoint import load_compressed, read_checkpoint
    from ..devices import resolve_device
    from ..models import ENCODER

    requested = str(device)
    device = resolve_device(device)  # cuda without a GPU: one line, before any compute

    t0 = time.perf_counter()
    progress = progress or (lambda total, desc: (lambda n=1: None))
    checkpoint = Path(checkpoint)
    manifest, tensors = read_checkpoint(checkpoint)
    fingerprint = tensors_fingerprint(tensors)
    del tensors
    model, fam, _ = load_compressed(checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    for b in model.buffers():
        b.requires_grad_(False)
    tok = TextTokenizer(checkpoint)
    if fam.name == "decoder":
        from .markboard_decoder import train_decoder_board

        if device.type != "cpu" and requested != "auto":
            raise Unsupported(f"board train --device {requested}: decoder boards train on the CPU yet; use "
                              "--device cpu or auto")

        return train_decoder_board(model, fam, tok, key, cfg, manifest, fingerprint, progress, t0)
    if fam is not ENCODER:
        raise Unsupported(f"watermark boards support encoder and decoder models, not {fam.name}")
    if cfg.mark_side == "input":
        raise BadInput("--mark-side input is for decoder boards (an encoder's mark lives in its token table)")
    if cfg.readout != "diff" or cfg.chat_template is not None:
        raise BadInput("--readout top1 and --chat-template are for decoder boards (an encoder is read from embeddings)")
    hidden = int(model.config.hidden_size)
    vocab = int(model.config.vocab_size)
    model.to(device)

    hosts = board_hosts(tok, cfg.host_min_tokens, cfg.host_max_tokens)
    ts = qkeys.derive_triggers(key, tok, cfg.bits, hosts, cfg.triggers_per_bit, cfg.tokens_per_bit, hidden)
    n, m, k, r = cfg.bits, cfg.triggers_per_bit, cfg.tokens_per_bit, cfg.rank
    delta = _EmbeddingDelta(ts.tokens, vocab)
    v = torch.from_numpy(ts.directions).float().to(device)

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    a0 = torch.linalg.qr(torch.randn(hidden, r, generator=gen, dtype=torch.float64))[0].T.float()
    A = a0.to(device).clone().requires_grad_(True)  # (R, H) orthonormal rows at start
    C = torch.zeros(2, n * k, r, device=device, requires_grad=True)  # C[b]: bit value b
    opt = torch.optim.Adam([A, C], lr=cfg.lr)

    # controls do not contain trigger tokens: their embeddings are fixed
    ctrl = np.zeros((n, m, hidden), dtype=np.float32)
    with torch.no_grad():
        flat = [t for trs in ts.triggers for t in trs]
        for s in range(0, len(flat), 64):
            e = _encode_with_delta(model, fam, _batch(tok, [t.control_ids for t in flat[s:s + 64]]), 0.0)
            ctrl.reshape(n * m, hidden)[s:s + e.shape[0]] = e.cpu().numpy()
    ctrl_t = torch.from_numpy(ctrl).to(device)

    # clean calibration text that contains trigger tokens (fidelity term); usually none
    calib = read_text_file(cfg.calib) if cfg.calib is not None else pydoc_sentences("calibration")
    trig_set = set(int(x) for x in ts.tokens.reshape(-1))
    fid_ids = [ids for ids in (tok.encode_ids(t) for t in calib) if trig_set.intersection(ids)][:64]
    fid_ref = None
    if fid_ids:
        with torch.no_grad():
            fid_ref = _encode_with_delta(model, fam, _batch(tok, fid_ids), 0.0)

    ok = np.zeros((n, 2), dtype=bool)  # branch (i, b) met the margin on its last visit
    order: list[int] = []
    tick = progress(cfg.steps, "board")
    steps_run = 0
    history = []
    for step in range(cfg.steps):
        if not order:
            todo = [i for i in rng.permutation(n) if not ok[i].all()] or list(rng.permutation(n))
            order = [int(i) for i in todo]
        chunk, order = order[: cfg.bits_per_step], order[cfg.bits_per_step:]
        sig = rng.integers(0, 2, size=len(chunk))
        # the drawn signature and its complement: every visited branch gets a gradient
        vals = np.concatenate([sig, 1 - sig])
        bits_ = np.concatenate([chunk, chunk])
        seqs, seq_bit, seq_val, seq_j = [], [], [], []
        for bi, bv in zip(bits_, vals):
            for j, t in enumerate(ts.triggers[bi]):
                seqs.append(t.ids)
                seq_bit.append(bi)
                seq_val.append(bv)
                seq_j.append(j)
        batch = _batch(tok, seqs)
        seq_bit_t = torch.tensor(seq_bit, device=device)
        seq_val_t = torch.tensor(seq_val, device=device)
        coef = C[seq_val_t]  # (B, n·k, R): each sequence's own signature value
        e = _encode_with_delta(model, fam, batch, delta.rows(batch["input_ids"], coef, A))
        stat = ((e - ctrl_t[seq_bit_t, torch.tensor(seq_j, device=device)]) * v[seq_bit_t]).sum(-1)
        sign = seq_val_t.float() * 2 - 1
        hinge = torch.relu(cfg.margin - sign * stat)
        loss = hinge.mean()
        rows = C[:, [i * k + j for i in chunk for j in range(k)]] @ A
        loss = loss + cfg.reg_weight * rows.pow(2).sum(-1).mean()
        if fid_ids:
            s_full = torch.from_numpy(rng.integers(0, 2, size=n)).repeat_interleave(k).to(device)
            coef_c = torch.where(s_full[:, None].bool(), C[1], C[0])
            fb = _batch(tok, fid_ids)
            fe = _encode_with_delta(model, fam, fb, delta.rows(fb["input_ids"], coef_c.expand(len(fid_ids), -1, -1), A))
            loss = loss + cfg.fidelity_weight * (1 - (fe * fid_ref).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            met = (sign * stat >= cfg.margin).cpu().numpy().reshape(-1, m).all(1)
            for bi, bv, good in zip(bits_, vals, met):
                ok[bi, bv] = good
        history.append(float(loss.detach()))
        steps_run += 1
        tick(1)
        if ok.all() and not order:
            break
    tick(cfg.steps - steps_run)

    A_fixed, C_fixed = A.detach().contiguous(), C.detach().clone()
    signed = branch_statistics(model, fam, tok, ts, {"A": A_fixed, "C0": C_fixed[0], "C1": C_fixed[1]}, ctrl)
    box = [C_fixed]

    def polish_part(part: list[tuple[int, int]]) -> np.ndarray:
        box[0], stats_ = _polish(model, fam, tok, ts, delta, A_fixed, box[0], part, ctrl_t, v, cfg)
        return stats_

    polish_steps = polish_failing(signed, cfg.margin, cfg, polish_part, progress)
    C_fixed = box[0]

    board_tensors = {"A": A_fixed.cpu(), "C0": C_fixed[0].cpu().contiguous(), "C1": C_fixed[1].cpu().contiguous()}
    board = Board({}, board_tensors)
    stats = summarize_statistics(signed)
    stats["branches_below_margin"] = int((signed.min(-1) < cfg.margin).sum())
    board.manifest = {
        "format": BOARD_FORMAT, "schema": BOARD_SCHEMA,
        "source_fingerprint": fingerprint, "source": manifest.source,
        "family": fam.name, "layers": {fam.embedding_attr: {"kind": "embedding", "rank": r}},
        "bits": n, "triggers_per_bit": m, "tokens_per_bit": k, "hidden": hidden, "vocab": vocab,
        "rare_from": qkeys.RARE_FROM, "margin": cfg.margin, "hosts": hosts,
        "trigger_digest": ts.digest(), "key_id": qkeys.key_id(key),
        "training": {**{kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in asdict(cfg).items()},
                     "steps_run": steps_run, "polish_steps": polish_steps, "seconds": round(time.perf_counter() - t0, 3),
                     "final_loss": history[-1] if history else None, **stats},
    }
    return board


def polish_failing(signed: np.ndarray, margin: float, cfg: BoardConfig,
                   polish_part: Callable[[list[tuple[int, int]]], np.ndarray],
                   progress: Callable[[int, str], Callable[[int], None]],
                   stop: Callable[[], bool] | None = None) -> int:
    """The polish schedule shared by encoder and decoder boards (module docstring), with ``A``
    frozen: the branches (i, b) whose smallest signed statistic in ``signed`` (n, 2, m) is below
    ``margin`` are trained in chunks of 2·bits_per_step (a training step's worth of sequences) by
    ``polish_part(part)``, which returns their new statistics (len(part), m); only those are
    re-evaluated, since with ``A`` frozen a branch's statistic depends on its own rows alone.
    Updates ``signed`` in place; returns the number of polish steps run.  ``stop()`` true (a time
    limit) ends the polish before its next chunk."""
    failing = [(int(i), int(b)) for i, b in zip(*np.nonzero(signed.min(-1) < margin))]
    chunk = 2 * cfg.bits_per_step
    tick = progress(cfg.polish_rounds * cfg.polish_steps * max(1, -(-len(failing) // chunk)), "polish")
    steps = 0
    for _ in range(cfg.polish_rounds):
        if not failing:
            break
        for s in range(0, len(failing), chunk):
            if stop is not None and stop():
                return steps
            part = failing[s:s + chunk]
            for (i, b), st in zip(part, polish_part(part)):
                signed[i, b] = st
            steps += cfg.polish_steps
            tick(cfg.polish_steps)
        failing = [(i, b) for i, b in failing if signed[i, b].min() < margin]
    return steps


def _polish(model, fam, tok, ts, delta: "_EmbeddingDelta", A: torch.Tensor, C: torch.Tensor,
            failing: list[tuple[int, int]], ctrl_t: torch.Tensor, v: torch.Tensor,
            cfg: BoardConfig) -> tuple[torch.Tensor, np.ndarray]:
    """Train only the coefficient rows ``C_b[T_i]`` of the ``failing`` branches (i, b), with ``A``
    frozen, on the hinge loss of their own triggers.  Returns the updated copy of ``C``
    (2, n·k, R) and those branches' signed statistics after training (len(failing), m)."""
    k, m = cfg.tokens_per_bit, cfg.triggers_per_bit
    dev = C.device
    vals = torch.tensor([b for _, b in failing for _ in range(k)], device=dev)
    rows = torch.tensor([i * k + j for i, _ in failing for j in range(k)], device=dev)
    P = C[vals, rows].clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=cfg.lr)
    seqs = [t.ids for i, _ in failing for t in ts.triggers[i]]
    seq_bit = torch.tensor([i for i, _ in failing for _ in range(m)], device=dev)
    seq_val = torch.tensor([b for _, b in failing for _ in range(m)], device=dev)
    seq_j = torch.tensor([j for _ in failing for j in range(m)], device=dev)
    batch = _batch(tok, seqs)
    sign = seq_val.float() * 2 - 1
    for _ in range(cfg.polish_steps):
        C_use = C.index_put((vals, rows), P)
        e = _encode_with_delta(model, fam, batch, delta.rows(batch["input_ids"], C_use[seq_val], A))
        stat = ((e - ctrl_t[seq_bit, seq_j]) * v[seq_bit]).sum(-1)
        loss = torch.relu(cfg.margin - sign * stat).mean() + cfg.reg_weight * (P @ A).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    C = C.index_put((vals, rows), P.detach())
    with torch.no_grad():
        e = _encode_with_delta(model, fam, batch, delta.rows(batch["input_ids"], C[seq_val], A))
        stat = ((e - ctrl_t[seq_bit, seq_j]) * v[seq_bit]).sum(-1) * sign
    return C, stat.cpu().numpy().astype(np.float64).reshape(len(failing), m)


def summarize_statistics(signed: np.ndarray) -> dict:
    """Accuracy of the per-trigger sign, of the per-bit mean, and the smallest / mean signed
    statistic of a :func:`branch_statistics` array."""
    return {"train_trigger_accuracy": float((signed > 0).mean()),
            "train_bit_accuracy": float((signed.mean(-1) > 0).mean()),
            "min_signed_stat": float(signed.min()), "mean_signed_stat": float(signed.mean())}


@torch.no_grad()
def branch_statistics(model, fam, tok, ts: qkeys.TriggerSet, board_tensors, ctrl: np.ndarray) -> np.ndarray:
    """(n, 2, m) signed statistics σ_b·⟨e(trigger_ij) − e(control_ij), v_i⟩ of every branch (i, b)
    alone on its own triggers (σ_b = 2b − 1; bits do not interact, so this is also what a
    customer's model gives)."""
    n, k = ts.tokens.shape
    m = len(ts.triggers[0])
    delta = _EmbeddingDelta(ts.tokens, int(model.config.vocab_size))
    dev = model.device
    v = torch.from_numpy(ts.directions).float().to(dev)
    signed = np.zeros((n, 2, m))
    for b in (0, 1):
        flat = [t for trs in ts.triggers for t in trs]
        for s in range(0, len(flat), 64):
            part = flat[s:s + 64]
            batch = _batch(tok, [t.ids for t in part])
            coef = board_tensors[f"C{b}"].to(dev).expand(len(part), -1, -1)
            e = _encode_with_delta(model, fam, batch, delta.rows(batch["input_ids"], coef, board_tensors["A"].to(dev)))
            idx = np.arange(s, s + len(part))
            ctrl_rows = torch.from_numpy(ctrl.reshape(n * m, -1)[idx]).to(dev)
            stat = ((e - ctrl_rows) * v[torch.from_numpy(idx // m).to(dev)]).sum(-1).cpu().numpy()
            signed[idx // m, b, idx % m] = stat * (2 * b - 1)
    return signed


# ----------------------------------------------------------------------------- files
def save_board(board: Board, out: str | Path, tokenizer_dir: str | Path) -> Path:
    """Write ``out/board.json`` + ``out/board.safetensors`` (+ the model's tokenizer files)
    atomically.  The key is not inside (only its public id)."""
    out = check_output_folder(out, BOARD_MANIFEST, "board")
    tmp = temp_folder(out)
    try:
        save_file({k: v.contiguous() for k, v in sorted(board.tensors.items())}, str(tmp / BOARD_WEIGHTS),
                  metadata={"format": BOARD_FORMAT})
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        files = file_records(tmp, [BOARD_WEIGHTS])
        (tmp / BOARD_MANIFEST).write_text(json.dumps({**board.manifest, "files": files}, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o700)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    board.path = out
    return out


def load_board(path: str | Path) -> Board:
    path = Path(path)
    manifest = read_board_manifest(path)
    if manifest.get("files"):  # size + sha256 of board.safetensors (boards written before carry none)
        check_files(path, manifest["files"])
    try:
        tensors = load_file(str(path / BOARD_WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{path / BOARD_WEIGHTS}: missing or corrupt ({exc})") from exc
    n, k = manifest["bits"], manifest["tokens_per_bit"]
    r = next(iter(manifest["layers"].values()))["rank"]
    want = {"A": (r, manifest["hidden"]), "C0": (n * k, r), "C1": (n * k, r)}
    for name, shape in want.items():
        if name not in tensors or tuple(tensors[name].shape) != shape or not torch.isfinite(tensors[name]).all():
            raise BadInput(f"{path}: board tensor {name} missing, misshapen or not finite")
    return Board(manifest, tensors, path)
