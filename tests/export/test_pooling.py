"""Pooling baked into encoder graphs (quantseal/export/pooling.py) against a float64 numpy
reference and against sentence-transformers' own Pooling and Normalize modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantseal.export.pooling import pool

MODES = [("mean",), ("cls",), ("max",), ("mean_sqrt_len_tokens",), ("cls", "max", "mean")]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 7, 16, generator=g) * 3
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6, [0, 0, 1, 1, 1, 1, 0]])  # last: left-padded
    return hidden, mask


def _reference(h: np.ndarray, m: np.ndarray, modes, normalize) -> np.ndarray:
    """Loop-by-loop float64 definition of each mode."""
    rows = []
    for b in range(h.shape[0]):
        idx = np.flatnonzero(m[b])
        parts = []
        for mode in modes:
            if mode == "cls":
                parts.append(h[b, idx[0]])
            elif mode == "max":
                parts.append(h[b, idx].max(0))
            elif mode == "mean":
                parts.append(h[b, idx].sum(0) / len(idx))
            else:
                parts.append(h[b, idx].sum(0) / np.sqrt(len(idx)))
        v = np.concatenate(parts)
        rows.append(v / np.linalg.norm(v) if normalize else v)
    return np.stack(rows)


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_pool_matches_float64_reference(modes, normalize):
    hidden, mask = _batch()
    got = pool(hidden, mask, modes, normalize).numpy()
    ref = _reference(hidden.double().numpy(), mask.numpy(), modes, normalize)
    assert got.shape == (4, 16 * len(modes))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modes", MODES)
def test_pool_matches_sentence_transformers_modules(modes):
    st_modules = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    hidden, mask = _batch(1)
    pooling = st_modules.Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0])
    feats = pooling({"token_embeddings": hidden.clone(), "attention_mask": mask})
    ref = st_modules.Normalize()(feats)["sentence_embedding"]
    torch.testing.assert_close(pool(hidden, mask, modes, True), ref, rtol=0, atol=1e-6)
