"""The token table's rows for the calibration ids only (issue #12, streamed GPTQ).

Block 0's inputs are the embeddings of the calibration tokens, so capturing them needs only the
table rows those ids use: :func:`rows_embedding` reads them from the lazily opened source
(:meth:`~quantseal.lazy_source.LazySource.gather_rows`, never the whole ``(V, H)`` float32
table: 403 MB at vocabulary 49152 × width 2048) and :class:`RowsEmbedding` stands in for the
model's ``nn.Embedding`` during the capture.  The lookup is a gather of the same float32 rows,
so block 0's inputs are bit-identical to the full table's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BadInput


class RowsEmbedding(nn.Module):
    """``nn.Embedding`` forward over a subset of the rows.

    ``ids: (n,)`` sorted unique token ids, ``rows: (n, H)`` their table rows, ``vocab`` V: the
    lookup maps a token id through ``index: (V,)`` (its position in ``ids``, −1 if absent) and
    gathers from ``rows``; an id outside ``ids`` is an error, never a silent wrong row."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor, vocab: int):
        super().__init__()
        if ids.dim() != 1 or rows.shape[0] != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids, {rows.shape[0]} rows")
        index = torch.full((vocab,), -1, dtype=torch.int64, device=rows.device)
        index[ids.to(rows.device)] = torch.arange(len(ids), device=rows.device)
        self.register_buffer("index", index, persistent=False)
        self.weight = nn.Parameter(rows, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids: (B, T)`` → ``(B, T, H)``."""
        idx = self.index[input_ids]
        if bool((idx < 0).any()):
            raise ValueError("a token id outside the rows this embedding holds")
        return F.embedding(idx, self.weight)


def calibration_ids(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sorted unique ``input_ids`` of every batch: ``(n,)`` int64 on the CPU."""
    return torch.unique(torch.cat([b["input_ids"].reshape(-1).cpu() for b in batches])).to(torch.int64)


def rows_embedding(source, key: str, batches: list[dict[str, torch.Tensor]],
                   device: torch.device | str = "cpu") -> RowsEmbedding:
    """A :class:`RowsEmbedding` of the stored table ``key`` (``(V, H)``) for the ids of ``batches``."""
    vocab = source.stored[key].shape[0]
    ids = calibration_ids(batches)
    if len(ids) and (int(ids[0]) < 0 or int(ids[-1]) >= vocab):
        raise BadInput(f"calibration token id {int(ids[-1]) if int(ids[-1]) >= vocab else int(ids[0])} "
                       f"outside the table's {vocab} rows")
    return RowsEmbedding(ids, source.gather_rows(key, ids).to(device), vocab)
