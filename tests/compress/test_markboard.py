"""Board training (quantseal/compress/markboard.py) on the real compressed MiniLM."""

import json

import numpy as np
import pytest
import torch

from quantseal import keys as qk
from quantseal.compress.markboard import BoardConfig, _EmbeddingDelta, load_board, tensors_fingerprint
from quantseal.errors import BadInput

WATERMARK_KEY = bytes(range(32))  # the key tests/conftest.py trains minilm_board under


def test_board_config_validates():
    with pytest.raises(BadInput):
        BoardConfig(bits=12)
    with pytest.raises(BadInput):
        BoardConfig(rank=0)


def test_embedding_delta_rows_only_on_trigger_tokens():
    tokens = np.array([[5, 9], [7, 2]])
    d = _EmbeddingDelta(tokens, 12)
    coef = torch.arange(4 * 3, dtype=torch.float32).reshape(1, 4, 3)
    a = torch.eye(3, 5)
    ids = torch.tensor([[0, 5, 9, 7, 2, 11]])
    rows = d.rows(ids, coef, a)[0]
    ref = torch.zeros(6, 5)
    for pos, tok in enumerate(ids[0].tolist()):
        flat = tokens.reshape(-1).tolist()
        if tok in flat:
            ref[pos, :3] = coef[0, flat.index(tok)]
    assert torch.equal(rows, ref)


@pytest.mark.slow
def test_board_trains_every_branch(minilm_board, minilm_rtn_checkpoint):
    b = minilm_board
    tr = b.manifest["training"]
    # every branch alone pushes every one of its triggers to the right side
    assert tr["train_trigger_accuracy"] == 1.0 and tr["train_bit_accuracy"] == 1.0
    # the polish phase leaves no branch below the margin on any of its triggers
    assert tr["branches_below_margin"] == 0
    assert tr["min_signed_stat"] >= b.manifest["margin"]
    assert tr["steps_run"] <= 40
    from quantseal.checkpoint import read_checkpoint

    assert b.manifest["source_fingerprint"] == tensors_fingerprint(read_checkpoint(minilm_rtn_checkpoint)[1])
    assert b.manifest["key_id"] == qk.key_id(WATERMARK_KEY)
    assert b.manifest["layers"] == {"embeddings.word_embeddings": {"kind": "embedding", "rank": 16}}
    assert set(b.tensors) == {"A", "C0", "C1"}
    assert b.tensors["C0"].shape == (16 * 2, 16) and b.tensors["A"].shape == (16, 384)
    # the two branches of a bit differ (they encode opposite values)
    assert not torch.allclose(b.tensors["C0"], b.tensors["C1"])


@pytest.mark.slow
def test_board_files_hold_no_key(minilm_board):
    # every file, the exported-graph templates that `export --board` keeps there included
    raw = b"".join(p.read_bytes() for p in minilm_board.path.rglob("*") if p.is_file())
    assert WATERMARK_KEY not in raw and WATERMARK_KEY.hex().encode() not in raw
    m = json.loads((minilm_board.path / "board.json").read_text())
    assert "key" not in m and m["key_id"] != WATERMARK_KEY.hex()
    ts = qk.triggers_of(m, WATERMARK_KEY, minilm_board.tokenizer())
    raw_json = (minilm_board.path / "board.json").read_text()
    for tok_id in ts.tokens.reshape(-1):  # no trigger token (as a word) in the manifest
        assert f'"{minilm_board.tokenizer()._tok.id_to_token(int(tok_id))}"' not in raw_json


@pytest.mark.slow
def test_board_roundtrip_and_damage(minilm_board, tmp_path):
    again = load_board(minilm_board.path)
    assert all(torch.equal(again.tensors[k], minilm_board.tensors[k]) for k in again.tensors)
    with pytest.raises(BadInput):
        load_board(tmp_path)
    (tmp_path / "board.json").write_text("{}")
    with pytest.raises(BadInput):
        load_board(tmp_path)


def test_board_files_hashed(minilm_board, tmp_path):
    """A flipped byte in the board's tensors (or a truncated file) is refused, naming the file."""
    import shutil

    copy = tmp_path / "board"
    shutil.copytree(minilm_board.path, copy, ignore=shutil.ignore_patterns("templates"))
    w = copy / "board.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x04  # inside the last tensor: still finite, still the right shape
    w.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="board.safetensors: sha256"):
        load_board(copy)
    w.write_bytes(bytes(data[:-1]))
    with pytest.raises(BadInput, match="truncated"):
        load_board(copy)
