"""Calibration capture for block-wise reconstruction (GPTQ, CBQ): tokenise calibration text into
batches and stream each transformer block's inputs, one block at a time.

The pattern is GPTQ's capture-and-replay (Frantar et al. 2023, §4 "Step 3"): a forward
pre-hook on block 0 records the hidden states and every other argument the model passes to a
block (the attention mask as the model prepared it, rotary position embeddings for decoders),
then stops the forward pass.  Block ``i + 1``'s inputs are block ``i``'s outputs, so only one
block's worth of activations is held at a time:

    hidden:     (B, T, H) per batch, stored in ``storage_dtype`` (float16 is enough to hold them;
                blocks always run in float32)
    token_mask: (B, T) bool, True on real (non-padding) tokens: reconstruction losses and the
                GPTQ Hessian count only those
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..models import Family, blocks, model_tokenizer


@dataclass
class BlockInputs:
    """What one block receives for every calibration batch."""

    hidden: list[torch.Tensor]  # per batch (B, T, H), storage dtype
    args: list[tuple]  # positional arguments after the hidden states (e.g. BERT's attention mask)
    kwargs: list[dict]  # keyword arguments (e.g. LLaMA's position_embeddings)
    token_mask: list[torch.Tensor]  # per batch (B, T) bool

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def n_tokens(self) -> int:
        return int(sum(m.sum() for m in self.token_mask))

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        """The same batches (masks, positions) with new hidden states."""
        return replace(self, hidden=hidden)


def calibration_batches(model_dir: str | Path, texts: list[str], batch_size: int = 16,
                        max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches, texts sorted by token count (stable, so deterministic) to keep padding
    small.  Each batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 (B, T)."""
    tok = model_tokenizer(model_dir, max_length=max_length)
    lengths = [len(tok.encode_ids(t)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = []
    for i in range(0, len(order), batch_size):
        enc = tok([texts[j] for j in order[i:i + batch_size]])
        out.append({k: torch.from_numpy(v) for k, v in enc.items()})
    return out


class _Stop(Exception):
    pass


def _model_kwargs(fam: Family, batch: dict[str, torch.Tensor]) -> dict:
    names = ("input_ids", "attention_mask", "token_type_ids") if fam.name == "encoder" else (
        "input_ids", "attention_mask")
    kw = {k: v for k, v in batch.items() if k in names}
    if fam.name == "decoder":
        kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, fam: Family, batches: list[dict[str, torch.Tensor]],
                         storage_dtype: torch.dtype = torch.float16, store=None) -> BlockInputs:
    """Inputs of block 0 for every batch; the blocks themselves never run.  The hidden states are
    appended to ``store`` when given (e.g. a :class:`~.spill.SpillStore`), else to a list."""
    first = blocks(model, fam)[0]
    seen: dict = {}

    def hook(_mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    hidden, args, kwargs, masks = ([] if store is None else store), [], [], []
    try:
        for batch in batches:
            try:
                model(**_model_kwargs(fam, batch))
            except _Stop:
                pass
            a, kw = seen["args"], dict(seen["kwargs"])
            h = a[0] if a else kw.pop("hidden_states")
            hidden.append(h.detach().to(storage_dtype))
            args.append(tuple(a[1:]))
            kwargs.append(kw)
            masks.append(batch["attention_mask"].bool())
    finally:
        handle.remove()
    return BlockInputs(hidden, args, kwargs, masks)


def block_forward(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One block on float32 hidden states (B, T, H) → (B, T, H)."""
    out = block(hidden.float(), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _rows_of(v, r0: int, r1: int, n: int):
    """``v`` (a tensor, or a tuple / list / dict of them) cut to batch rows ``r0:r1``: a tensor of
    two or more dimensions whose first is the batch's ``n`` (> 1) is sliced, anything else (a
    broadcast ``(1, T, d)`` rotary table, a 1-D cache position, a flag) passes unchanged."""
    if isinstance(v, torch.Tensor):
        return v[r0:r1] if v.dim() >= 2 and v.shape[0] == n else v
    if isinstance(v, (tuple, list)):
        return type(v)(_rows_of(u, r0, r1, n) for u in v)
    if isinstance(v, dict):
        return {k: _rows_of(u, r0, r1, n) for k, u in v.items()}
    return v


def row_spans(hidden: torch.Tensor, max_tokens: int | None) -> list[tuple[int, int]]:
    """Batch-row ranges of ``hidden: (B, T, H)`` with at most ``max_tokens`` padded tokens each
    (``rows × T``; at least one row); ``None``: the whole batch."""
    b, t = hidden.shape[0], hidden.shape[1]
    if max_tokens is None or b < 2 or b * t <= max_tokens:
        return [(0, b)]
    per = max(1, max_tokens // max(1, t))
    return [(r, min(r + per, b)) for r in range(0, b, per)]


def sub_batch(hidden: torch.Tensor, args: tuple, kwargs: dict, r0: int, r1: int) -> tuple:
    """``(hidden, args, kwargs)`` of batch rows ``r0:r1`` (see :func:`_rows_of`)."""
    n = hidden.shape[0]
    if (r0, r1) == (0, n):
        return hidden, args, kwargs
    return hidden[r0:r1], _rows_of(args, r0, r1, n), _rows_of(kwargs, r0, r1, n)


def block_forward_rows(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict,
                       max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`block_forward` a few batch rows at a time (:func:`row_spans`), so the block's
    intermediates (a decoder MLP's four ``(rows·T, I)`` tensors) are those of ``max_tokens``
    tokens: ``(B, T, H)`` → ``(B, T, H)`` in ``dtype``."""
    spans = row_spans(hidden, max_tokens)
    if len(spans) == 1:
        return block_forward(block, hidden, args, kwargs).to(dtype)
    out = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
    for r0, r1 in spans:
        out[r0:r1] = block_forward(block, *sub_batch(hidden, args, kwargs, r0, r1))
    return out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, storage_dtype: torch.dtype = torch.float16,
              max_tokens: int | None = None) -> BlockInputs:
    """The next block's inputs: this block applied to every batch (``max_tokens`` padded tokens at
    a time: :func:`block_forward_rows`; ``None``: whole batches)."""
    outs = [block_forward_rows(block, h, a, kw, max_tokens, storage_dtype)
            for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs)]
    return inputs.with_hidden(outs)
