"""Fold PEFT adapters into a compressed checkpoint exactly, or refuse (DESIGN §5).

One module per PEFT kind, each registering its reader (``peft_type`` → function) with
:func:`.base.register`; :mod:`.fields` holds the config allow-list, :mod:`.fold` the folding and
the export, :mod:`.factored` the factored low-rank arithmetic.

=========  ===========================================  ====================================
kind       delta (W: (N, K), PEFT's forward)             folds as
=========  ===========================================  ====================================
LORA       s·B·A (rsLoRA, patterns, embeddings)         low-rank branch (concatenation)
 +lora_bias s·b_B added to the bias                     Add (the stored bias)
 +DoRA     m ⊙ (W+sBA) / ‖W+sBA‖_row                    branch + per-output Mul after MatMul
ADALORA    P·Λ·Q · σ / (ranknum + 1e-5)                 rank-r branch
VERA       Λ_b·B·Λ_d·A, shared random A, B              rank-r branch
IA3        l ⊙ x (feed-forward) or l ⊙ y                input divisor or output Mul
LOHA       s·(W1a W1b) ⊙ (W2a W2b)                      rank-r² branch (face-splitting)
LOKR       s·W1 ⊗ W2                                    K1 ⊗ K2 (Reshape + 2 MatMuls), or a
                                                        rank-r1·r2 branch (mixed product)
MISS       Dᵀ · S (chunk sums)                          rank-r branch
XLORA      Σ_k s_k(h) · B_k A_k, s from a classifier    routed decoder graph (two passes),
           on the base pass's hidden state              :mod:`..decoder_xlora`
=========  ===========================================  ====================================

:mod:`.switchable`: several adapters as branches chosen at run time (``export --switchable``);
:mod:`.xlora`: the X-LoRA folder contract (the classifier saved beside peft's folder).
"""

from . import adalora, ia3, loha, lokr, lora, miss, vera  # noqa: F401  (register the kinds)
from .base import READERS, Adapter, LowRankDelta, MatrixDelta, register
from .factored import balanced, product_distance, truncate_factored
from .fold import export_with_adapters, fold_adapters, resolve_target
from .read import read_adapter

__all__ = ["READERS", "Adapter", "LowRankDelta", "MatrixDelta", "register", "balanced", "product_distance",
           "truncate_factored", "export_with_adapters", "fold_adapters", "resolve_target", "read_adapter"]
