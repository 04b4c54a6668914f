"""The output Fisher of a decoder without the model in memory (issue #12: data-aware plans streamed).

:func:`.fisher.output_fisher` back-propagates the LM loss through the whole loaded model.  This is
the same diagonal empirical Fisher (LQ-LoRA §3.2),

    F_W = (1 / S) Σ_b (∂ℓ_b / ∂W)²,     ℓ_b = n_b · mean next-token cross-entropy of batch b,

for every Linear ``W`` of the blocks and (optionally) the token table, computed by the chain rule
one block at a time from a :class:`~quantseal.lazy_source.LazySource` (S = sequences, n_b = the
batch's sequences):

1. **forward** — block 0's inputs ``X_0`` come from the calibration ids' table rows
   (:func:`.streaming.capture_rows`); block i is read, maps ``X_i → X_{i+1}`` and is released.
   Every boundary ``X_i`` is kept (a :class:`~.spill.SpillStore` per block, spilled to disk beyond
   the activation cap).
2. **head** — with ``ĥ = norm(X_L)`` and the head matrix ``E`` (the tied table or ``lm_head``)
   read in vocabulary chunks ``E_c``: pass 1 the log-normaliser ``lse = logsumexp(ĥ Eᵀ)`` by a
   running logsumexp, pass 2 ``∂ℓ/∂ĥ = Σ_c D_c E_c`` with ``D_c = w (softmax_c − onehot_c)``
   (w = n_b / valid tokens on every position whose next token is a label, else 0); then
   ``G_L = ∂ℓ/∂X_L`` through the final norm (autograd on the norm alone).
3. **backward** — block L−1 … 0 is read again with its Linears' weights requiring grad; per batch
   its forward is recomputed from ``X_i`` and ``G_{i+1}`` back-propagated: ``(∂ℓ_b/∂W)²`` is
   accumulated in float64 (as :func:`.fisher.output_fisher` does) and ``G_i = ∂ℓ_b/∂X_i`` kept
   for the block below.  The block's Fishers are written as soon as its last batch is done.
4. **table** (a ``--budget-mb`` plan) — ``∂ℓ_b/∂E = D_bᵀ ĥ_b`` (the head, when tied) ``+`` the
   scatter of ``G_0`` over the batch's ids (the lookup), squared and accumulated a chunk of rows
   at a time (pass 3 over the head).

Memory: one block's weights with their gradients and float64 accumulators, the boundaries (spilled
beyond the cap) and one chunk of logits; never the model or the ``(V, H)`` table.  The Fishers go to
one safetensors file (float32, :func:`.fisher.floor_fisher` applied) and come back as
:class:`~quantseal.lazy_source.TensorRef`s, so the candidate table's workers read their own.

Equal to :func:`.fisher.output_fisher` on the same batches up to float summation order (the head
is chunked over the vocabulary): tests/compress/test_fisher_stream.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..lazy_source import LazySource, TensorRef, fix_mmap_threshold
from ..models import blocks, compressible_linears, final_norm, get_submodule
from ..tensorfile import SafetensorsWriter, TensorInfo
from .calibration import BlockInputs, block_forward
from .fisher import floor_fisher
from .streaming import capture_rows, run_block_spilled

# block 0's input is the table lookup itself (no scaling), so ∂ℓ/∂E's lookup half is a scatter of G_0
LOOKUP_IS_INPUT = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
CHUNK_BYTES = 32 << 20


def head_key(source: LazySource) -> str:
    """The stored head matrix: ``lm_head.weight``, or the token table when the head is tied."""
    tied = bool(getattr(source.model.config, "tie_word_embeddings", False))
    return source.fam.embedding_attr + ".weight" if tied or "lm_head.weight" not in source.stored else "lm_head.weight"


def _label_weights(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels (B, T) int64, w (B, T) float32)``: the next token each position predicts (−1 where
    none) and its weight in ℓ_b = n_b · mean CE (transformers' causal-LM loss: labels shifted by one,
    padding ignored)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    labels = torch.full_like(ids, -1)
    labels[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -1)
    valid = labels >= 0
    w = valid.float() * (ids.shape[0] / max(int(valid.sum()), 1))
    return labels, w


def _head_rows(source: LazySource, key: str) -> list[tuple[int, int]]:
    v, h = source.stored[key].shape
    per = max(1, CHUNK_BYTES // (4 * h))
    return [(r0, min(r0 + per, v)) for r0 in range(0, v, per)]


def _logit_grads(hn: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                 e: torch.Tensor, r0: int) -> torch.Tensor:
    """``D_c = w (softmax − onehot)`` on the rows ``r0 : r0 + len(e)`` of the vocabulary: ``(n, c)``
    for ``hn: (n, H)``, ``lse, labels, w: (n,)``, ``e: (c, H)``."""
    d = torch.addmm(-lse[:, None], hn, e.T).exp_()  # softmax over the chunk's rows
    hit = (labels >= r0) & (labels < r0 + e.shape[0])
    rows = torch.nonzero(hit).squeeze(1)
    d[rows, labels[rows] - r0] -= 1.0
    return d.mul_(w[:, None])


def streamed_output_fisher(source: LazySource, batches: list[dict[str, torch.Tensor]], out: str | Path,
                           table: bool = False, cap_bytes: float = 1024e6,
                           progress: Callable[[int], None] | None = None) -> dict[str, TensorRef]:
    """``{name: TensorRef}`` of every block Linear's floored Fisher (and the token table's when
    ``table``), written to the safetensors file ``out`` (see the module notes)."""
    fix_mmap_threshold()
    fam = source.fam
    model_type = source.model.config.model_type
    if fam.name != "decoder" or model_type not in LOOKUP_IS_INPUT:
        raise ValueError(f"the streamed Fisher covers {sorted(LOOKUP_IS_INPUT)} decoders, not {model_type}")
    emb = fam.embedding_attr
    hkey = head_key(source)
    skip = frozenset({emb, "lm_head"})
    model = source.load_outside_blocks("cpu", skip=skip)
    names = list(compressible_linears(model, fam))
    targets = names + ([emb] if table else [])
    specs = {n: TensorInfo(torch.float32, source.stored[n + ".weight"].shape) for n in targets}
    writer = SafetensorsWriter(out, specs)
    try:
        _run(source, model, batches, names, table, cap_bytes, writer, progress, hkey)
        writer.close(sync=False)
    except BaseException:
        writer.abort()
        Path(out).unlink(missing_ok=True)
        raise
    return {n: TensorRef(str(out), n, n) for n in targets}


def _run(source: LazySource, model: torch.nn.Module, batches: list, names: list[str], table: bool, cap: float,
         writer: SafetensorsWriter, progress, hkey: str) -> None:
    fam = source.fam
    stack = blocks(model, fam)
    n_seq = sum(b["input_ids"].shape[0] for b in batches)
    # 1. forward: every block's inputs kept (each store spills beyond its share of the cap)
    share = cap / (len(stack) + 1)
    xs: list[BlockInputs] = [capture_rows(source, model, batches, torch.device("cpu"), share)]
    for i, block in enumerate(stack):
        source.load_module(block, f"{fam.blocks_attr}.{i}")
        xs.append(run_block_spilled(block, xs[-1], share))
        source.release(block)
    # 2. head: lse (pass 1), ∂ℓ/∂ĥ (pass 2), then through the final norm
    norm = final_norm(model, fam)[1]
    lw = [_label_weights(b) for b in batches]
    with torch.no_grad():
        hn = [norm(xs[-1].hidden[j].float()).reshape(-1, xs[-1].hidden[j].shape[-1]) for j in range(len(batches))]
    chunks = _head_rows(source, hkey)
    lse = [torch.full((h.shape[0],), -math.inf) for h in hn]
    for r0, r1 in chunks:
        e = source.get_rows(hkey, r0, r1)
        for j, h in enumerate(hn):
            lse[j] = torch.logaddexp(lse[j], torch.logsumexp(h @ e.T, dim=1))
    g_hn = [torch.zeros_like(h) for h in hn]
    for r0, r1 in chunks:
        e = source.get_rows(hkey, r0, r1)
        for j, h in enumerate(hn):
            labels, w = (t.reshape(-1) for t in lw[j])
            g_hn[j] += _logit_grads(h, lse[j], labels, w, e, r0) @ e
    g = []
    for j in range(len(batches)):
        x = xs[-1].hidden[j].float().requires_grad_(True)
        norm(x).reshape(g_hn[j].shape).backward(g_hn[j])
        g.append(x.grad)
    xs.pop().hidden.close()
    del g_hn
    # 3. backward, block by block from the top
    for i in reversed(range(len(stack))):
        block = stack[i]
        prefix = f"{fam.blocks_attr}.{i}"
        source.load_module(block, prefix)
        for p in block.parameters():
            p.requires_grad_(False)
        params = {n: get_submodule(model, n).weight for n in names if n.startswith(prefix + ".")}
        acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        x_i = xs.pop()
        for j in range(len(batches)):
            x = x_i.hidden[j].float().requires_grad_(True)
            block_forward(block, x, x_i.args[j], x_i.kwargs[j]).backward(g[j])
            for n, p in params.items():
                acc[n] += p.grad.double() ** 2
                p.grad = None
            g[j] = x.grad
        for n in params:
            writer.put(n, floor_fisher((acc[n] / n_seq).float()))
        x_i.hidden.close()
        del acc, params
        source.release(block)
        if progress:
            progress(1)
    if table:
        _table_fisher(source, batches, fam.embedding_attr, hkey, hn, lse, lw, g, n_seq, writer)


def _table_fisher(source: LazySource, batches: list, emb: str, hkey: str, hn: list, lse: list, lw: list,
                  g0: list, n_seq: int, writer: SafetensorsWriter) -> None:
    """Step 4: ``Σ_b (D_bᵀ ĥ_b [tied] + scatter(G_0,b))² / S`` a chunk of table rows at a time, then
    :func:`.fisher.floor_fisher` over the whole table (its mean needs every chunk first: the raw
    chunks wait in a scratch file beside ``writer``'s, not in memory)."""
    key = emb + ".weight"
    tied = hkey == key
    v, h = source.stored[key].shape
    chunks = _head_rows(source, key)
    scratch = writer.path.with_name(writer.path.name + ".table-raw")
    total = 0.0
    try:
        with open(scratch, "wb") as raw:
            for r0, r1 in chunks:
                e = source.get_rows(hkey, r0, r1) if tied else None
                acc = torch.zeros((r1 - r0, h), dtype=torch.float64)
                for j, batch in enumerate(batches):
                    grad = torch.zeros((r1 - r0, h))
                    if tied:
                        labels, w = (t.reshape(-1) for t in lw[j])
                        grad += _logit_grads(hn[j], lse[j], labels, w, e, r0).T @ hn[j]
                    ids = batch["input_ids"].reshape(-1)
                    sel = (ids >= r0) & (ids < r1)
                    grad.index_add_(0, ids[sel] - r0, g0[j].reshape(-1, h)[sel])
                    acc += grad.double() ** 2
                f = (acc / n_seq).float()
                total += float(f.double().sum())
                raw.write(f.numpy().tobytes())
        floor = torch.tensor(1e-2 * total / (v * h), dtype=torch.float32)  # floor_fisher's frac · mean(F)
        with open(scratch, "rb") as raw:
            for r0, r1 in chunks:
                f = torch.frombuffer(bytearray(raw.read((r1 - r0) * h * 4)), dtype=torch.float32).reshape(r1 - r0, h)
                writer.put_rows(emb, r0, f + floor)
    finally:
        scratch.unlink(missing_ok=True)
