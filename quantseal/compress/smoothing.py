"""Input smoothing: CFP's activation scaling where no producing layer can absorb it.

CFP scales an activation's outlier channels down, x_c / s_c, and moves the factor into the
consumer's input columns, W_{:,c} · s_c (Outlier Suppression / SmoothQuant's migration):

    y = x · Wᵀ = (x / s) · (W · diag(s))ᵀ                                   (exact in float)

Where the producer is a LayerNorm that feeds only the consumers (a pre-norm decoder) the division
folds into its weight (:func:`.cfp.fold_activation_scale`).  In a post-LN BERT block the
LayerNorm output is also the residual stream, and a GELU sits in front of ``output.dense``, so
there the division stays an explicit per-channel ``x / s`` in front of the Linear: a buffer
``input_smooth`` (K,) float32 on the module and a forward pre-hook, which the ONNX exporter
traces as one ``Div`` in front of the (quantised) ``MatMul``.  The static per-tensor activation
quantiser then sees x / s, whose range is no longer set by a few channels.

The checkpoint stores the divisor as ``<linear>.input_smooth``; the stored integer matrix is the
quantised W · diag(s).
"""

from __future__ import annotations

import torch
from torch import nn

BUFFER = "input_smooth"


def _divide_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x / getattr(module, BUFFER).to(x.dtype),) + tuple(args[1:])


def attach_input_smoothing(module: nn.Module, s: torch.Tensor) -> None:
    """Make ``module`` compute on x / s: registers the ``input_smooth`` buffer and the hook.
    The module's weight must already be W · diag(s).  Attach before any other pre-hook
    (an activation quantiser must see the smoothed input)."""
    if has_input_smoothing(module):
        raise ValueError("input smoothing is already attached")
    s = s.detach().to(torch.float32).flatten().clone()
    if s.numel() != module.in_features or not bool((s > 0).all()):
        raise ValueError(f"input smoothing needs {module.in_features} positive factors, got {s.numel()}")
    module.register_buffer(BUFFER, s)
    module.register_forward_pre_hook(_divide_input)


def has_input_smoothing(module: nn.Module) -> bool:
    return getattr(module, BUFFER, None) is not None


def input_smoothing(module: nn.Module) -> torch.Tensor | None:
    """The divisor s (K,) of a smoothed module, or None."""
    return getattr(module, BUFFER, None)


@torch.no_grad()
def smooth_linear_input(linear: nn.Linear, s: torch.Tensor) -> None:
    """W ↦ W · diag(s) and x ↦ x / s in front of ``linear``: its output is unchanged."""
    linear.weight.mul_(s.to(torch.float32)[None, :].to(linear.weight.dtype))
    attach_input_smoothing(linear, s)
