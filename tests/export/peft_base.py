"""The base model PEFT sees in the adapter tests: the compressed model with plain Linears."""

from __future__ import annotations

import torch
from torch import nn

from quantseal.compress.qlinear import CompressedLinear, set_submodule


def plain_linears(model: nn.Module) -> nn.Module:
    """Each CompressedLinear as an nn.Linear holding ``dequant(Q) + L1 L2`` (its bias kept), so
    that PEFT can wrap it; in place, returns ``model``."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.effective_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_submodule(model, name, lin)
    return model
