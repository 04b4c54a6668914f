"""token_rows: the token table's calibration rows stand in for the whole table, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantseal.compress.token_rows import RowsEmbedding, calibration_ids, rows_embedding
from quantseal.errors import BadInput


def test_rows_embedding_equals_the_full_table_on_its_ids():
    gen = torch.Generator().manual_seed(0)
    table = nn.Embedding(500, 24, padding_idx=0)
    with torch.no_grad():
        table.weight.copy_(torch.randn(500, 24, generator=gen))
    batches = [{"input_ids": torch.randint(0, 500, (3, 9), generator=gen)} for _ in range(4)]
    batches[0]["input_ids"][0, -2:] = 0  # padding ids are rows too
    ids = calibration_ids(batches)
    assert torch.equal(ids, torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches])))
    emb = RowsEmbedding(ids, table.weight.detach()[ids].clone(), 500)
    assert emb.weight.shape == (len(ids), 24) and len(ids) < 500
    for b in batches:
        assert torch.equal(emb(b["input_ids"]), table(b["input_ids"]))
    missing = int(torch.tensor([i for i in range(500) if i not in set(ids.tolist())][0]))
    with pytest.raises(ValueError, match="outside"):
        emb(torch.tensor([[int(ids[0]), missing]]))


class _Source:
    """The two things rows_embedding reads of a LazySource, over an in-memory table."""

    def __init__(self, table: torch.Tensor):
        from quantseal.tensorfile import TensorInfo

        self.table = table
        self.stored = {"emb.weight": TensorInfo(table.dtype, table.shape)}

    def gather_rows(self, key, rows):
        return self.table[rows].clone()


def test_rows_embedding_from_a_source_and_out_of_range_ids():
    table = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 7, 7, 49], [0, 3, 12, 12]])
    emb = rows_embedding(_Source(table), "emb.weight", [{"input_ids": ids}])
    assert torch.equal(emb(ids), table[ids])
    with pytest.raises(BadInput, match="outside the table's 50 rows"):
        rows_embedding(_Source(table), "emb.weight", [{"input_ids": torch.tensor([[1, 50]])}])
