"""The torch module of a compressed Linear, for evaluation and adapter training.

    y = x · dequant(Q)ᵀ + (x · L2ᵀ) · L1ᵀ + b          (LQ-LoRA, eq. 1: W ≈ Q + L1 L2)

(with CFP's input smoothing, x is first divided by the stored per-channel s: smoothing.py;
with a per-output scale o, from a folded DoRA / IA³ adapter, y = o ⊙ (x · dequant(Q)ᵀ + ...) + b)

``Q`` is held dequantised in float32 (evaluation speed on CPU matters more here than memory);
the packed codes live in the checkpoint and the ONNX file.
"""

from __future__ import annotations

import torch
from torch import nn

from .smoothing import attach_input_smoothing

OUTPUT_SCALE = "output_scale"  # checkpoint key suffix and buffer name of the per-output scale o (N,)


def kron_matvec(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """``x · (K1 ⊗ K2)ᵀ`` without forming the Kronecker product: x (..., i1·i2) is reshaped to
    X (..., i1, i2) and ``K1 X K2ᵀ`` (..., o1, o2) flattened (row-major, as ``torch.kron`` orders)."""
    (o1, i1), (o2, i2) = k1.shape, k2.shape
    y = k1 @ (x.reshape(*x.shape[:-1], i1, i2) @ k2.T)
    return y.reshape(*x.shape[:-1], o1 * o2)


class CompressedLinear(nn.Module):
    """A Linear whose weight is ``w_hat + l1 @ l2``; all three are frozen buffers."""

    def __init__(self, w_hat: torch.Tensor, l1: torch.Tensor | None, l2: torch.Tensor | None,
                 bias: torch.Tensor | None, input_smooth: torch.Tensor | None = None,
                 output_scale: torch.Tensor | None = None, kron: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.out_features, self.in_features = w_hat.shape
        if input_smooth is not None:  # computes on x / s (CFP's smoothing; W_hat holds W·diag(s))
            attach_input_smoothing(self, input_smooth)
        self.register_buffer("w_hat", w_hat.float().contiguous())
        rank = 0 if l1 is None else l1.shape[1]
        self.rank = rank
        self.register_buffer("l1", (l1 if rank else torch.zeros(self.out_features, 0)).float().contiguous())
        self.register_buffer("l2", (l2 if rank else torch.zeros(0, self.in_features)).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.register_buffer(OUTPUT_SCALE, None if output_scale is None else output_scale.float().flatten().contiguous())
        self.register_buffer("k1", None if kron is None else kron[0].float().contiguous())  # a Kronecker branch
        self.register_buffer("k2", None if kron is None else kron[1].float().contiguous())  # K1 ⊗ K2 (LoKr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None or self.k1 is not None:  # o ⊙ (x W_hatᵀ + x L2ᵀ L1ᵀ + x (K1⊗K2)ᵀ) + b
            y = nn.functional.linear(x, self.w_hat)
            if self.rank:
                y = y + (x @ self.l2.T) @ self.l1.T
            if self.k1 is not None:
                y = y + kron_matvec(x, self.k1, self.k2)
            if self.output_scale is not None:
                y = y * self.output_scale
            return y if self.bias is None else y + self.bias
        y = nn.functional.linear(x, self.w_hat, self.bias)
        if self.rank:
            y = y + (x @ self.l2.T) @ self.l1.T
        return y

    def effective_weight(self) -> torch.Tensor:
        """W_hat + L1 L2 (+ K1 ⊗ K2), (out, in)."""
        w = self.w_hat + self.l1 @ self.l2 if self.rank else self.w_hat.clone()
        return w if self.k1 is None else w + torch.kron(self.k1, self.k2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class OutputScaledLinear(nn.Linear):
    """A float Linear with a per-output scale after the MatMul, ``y = o ⊙ (x Wᵀ) + b``; traced
    as MatMul → Mul → Add, so the exporter's MatMul rewrite keeps working."""

    def __init__(self, in_features: int, out_features: int, bias: bool, output_scale: torch.Tensor):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer(OUTPUT_SCALE, output_scale.float().flatten().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight) * self.output_scale
        return y if self.bias is None else y + self.bias


class CompressedEmbedding(nn.Module):
    """Token embedding ``E_hat + L1 L2`` looked up row-wise: e(ids) = E_hat[ids] + L1[ids] · L2."""

    def __init__(self, e_hat: torch.Tensor, l1: torch.Tensor | None, l2: torch.Tensor | None,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = e_hat.shape
        self.padding_idx = padding_idx
        self.rank = 0 if l1 is None else l1.shape[1]
        self.register_buffer("w_hat", e_hat.float().contiguous())
        self.register_buffer("l1", (l1 if self.rank else torch.zeros(self.num_embeddings, 0)).float().contiguous())
        self.register_buffer("l2", (l2 if self.rank else torch.zeros(0, self.embedding_dim)).float().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        return self.effective_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(ids, self.w_hat)
        if self.rank:
            out = out + nn.functional.embedding(ids, self.l1) @ self.l2
        return out

    def effective_weight(self) -> torch.Tensor:
        return self.w_hat + self.l1 @ self.l2 if self.rank else self.w_hat.clone()


class TiedHead(nn.Module):
    """An LM head tied to a :class:`CompressedEmbedding` ``E_hat + L1 L2``:
    ``logits = h · E_hatᵀ + (h · L2ᵀ) · L1ᵀ`` (h: (..., H) → (..., V)), the same effective table
    as the lookup, never materialised twice.  The embedding is referenced, not registered, so the
    state dict does not list its buffers twice."""

    def __init__(self, embedding: CompressedEmbedding):
        super().__init__()
        self._embedding = [embedding]

    @property
    def embedding(self) -> CompressedEmbedding:
        return self._embedding[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.effective_weight()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        out = nn.functional.linear(h, e.w_hat)
        if e.rank:
            out = out + (h @ e.l2.T) @ e.l1.T
        return out


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
