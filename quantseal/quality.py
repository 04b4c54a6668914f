"""Quality measures used by tests, the demo and benchmarks (torch side).

Embedding error (DESIGN §7): 1 − mean cosine between a model's sentence embeddings and the
float32 model's, over held-out sentences.  Nearest-neighbour agreement@1: the fraction of
sentences whose nearest other sentence is the same under both models.
"""

from __future__ import annotations

import numpy as np
import torch

from .models import encode
from .text import TextTokenizer


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tok: TextTokenizer, texts: list[str], batch: int = 32) -> np.ndarray:
    """float32 (len(texts), H) L2-normalised sentence embeddings of an encoder."""
    out = []
    for i in range(0, len(texts), batch):
        enc = {k: torch.from_numpy(v) for k, v in tok(texts[i:i + batch]).items()}
        out.append(encode(model, enc).float().numpy())
    return np.concatenate(out)


def embedding_error(ref: np.ndarray, test: np.ndarray) -> float:
    """1 − mean cosine of row pairs (rows need not be normalised)."""
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    return float(1.0 - np.mean(np.sum(ref * test, axis=1)))


def nn_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of rows whose nearest neighbour (cosine, self excluded) agrees."""
    def nearest(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return float(np.mean(nearest(ref) == nearest(test)))
