"""The tied token table calibrated as the LM head: GPTQ on the table, the head last in GPTQ's order.

A decoder with tied embeddings stores one table ``E: (V, H)`` read twice: by the lookup (row
``e_t`` of token ``t`` enters block 0) and by the head (``logits = x · Eᵀ``, ``x: (H,)`` the final
normed hidden state).  Round-to-nearest minimises the table's own error ‖E − Ê‖²_F; the head's
output error on calibration data ``X: (n, H)`` is GPTQ's layer objective (Frantar et al. 2023,
eq. 1–2) with the table as the Linear (N = V rows, K = H input columns):

    argmin_Ê ‖(E − Ê) Xᵀ‖²_F,        H_head = 2 XᵀX / n   (H × H)

solved by :class:`.gptq.GPTQ` (eq. 3, Cholesky form, lazy batches) in the table's blockwise INT-k
format, so the codes are stored once and still read by both ``GatherBlockQuantized`` (lookup) and
``MatMulNBits`` (head).  ``X`` comes from the model whose block Linears are already quantised
(the sequential order: the head is the last layer), on real (non-padding) calibration tokens, with
the float table for the lookup; each group's scale and zero point use the same MSE-optimal clip
search as round-to-nearest (:func:`.quantizers.quantize_int`), on the error-updated weights.

The lookup reads rows, whose own error GPTQ lets grow (it moves each row's rounding error into
directions the head's inputs rarely take); the dampening ``percdamp`` (λ = percdamp ·
mean diag H_head added to the diagonal, GPTQ §4) is the knob between the two readers: λ → ∞ is
round-to-nearest.  Measured on SmolLM2-135M with GPTQ W4 linears (torch perplexity on the
benchmark's 40 evaluation sentences; float table 61.82): RTN int4_b32 table 70.40, GPTQ table
(percdamp 0.01) 62.30, its head error ‖(E − Ê)Xᵀ‖² 11× below RTN's while its row error ‖E − Ê‖²
is 2.1× RTN's (``benchmarks/README.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import FormatSpec
from .gptq import GPTQ
from .quantizers import QuantizedTensor

DEFAULT_PERCDAMP = 0.01


@torch.no_grad()
def head_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The LM head's inputs (the final normed hidden states) on the real tokens of ``batches``:
    ``(n_tokens, H)`` float32, captured by a pre-hook on ``model.get_output_embeddings()``."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (LM head)")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float()))
    rows = []
    try:
        for b in batches:
            seen.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            rows.append(seen[-1][b["attention_mask"].bool()])
    finally:
        handle.remove()
    return torch.cat(rows)


def calibrate_table(table: torch.Tensor, x: torch.Tensor, spec: FormatSpec,
                    percdamp: float = DEFAULT_PERCDAMP, chunk_rows: int = 4096) -> QuantizedTensor:
    """GPTQ codes of the tied table ``table: (V, H)`` as the head's weight, for head inputs
    ``x: (n, H)``; returns the table in ``spec`` (an integer format).

    The head's H × H Hessian is factorised once and the rows are solved ``chunk_rows`` at a time
    (:meth:`.gptq.GPTQ.solve`: every step is row-wise given the factor), so besides the table only
    one chunk's float32 copy and the uint8 codes live at once (never a second float table)."""
    V, K = table.shape
    solver = GPTQ(nn.Linear(K, 1, bias=False, device=table.device))  # the Hessian's shape and device
    solver.add_batch(x)
    Hinv, dead = solver.factor(percdamp, consume=True)
    parts = [GPTQ.solve(table[r0:r0 + chunk_rows].detach().to(torch.float32, copy=True), Hinv, dead, spec)
             for r0 in range(0, V, chunk_rows)]
    cat = lambda f: None if f(parts[0]) is None else torch.cat([f(p) for p in parts])  # noqa: E731
    return QuantizedTensor(codes=cat(lambda p: p.codes), scales=cat(lambda p: p.scales), zeros=cat(lambda p: p.zeros),
                           shape=(V, K), spec=spec, offsets=cat(lambda p: p.offsets))


def head_error(table: torch.Tensor, table_hat: torch.Tensor, x: torch.Tensor, chunk_rows: int = 4096) -> float:
    """‖(E − Ê) Xᵀ‖²_F in float64: the head's summed squared logit error over the inputs ``x``,
    computed as Σ (D G) ⊙ D with D = E − Ê and G = XᵀX (H × H), never forming the (n, V) logits;
    ``chunk_rows`` rows of D at a time (float64 copies of a chunk, not of the table)."""
    x = x.double()
    g = x.T @ x
    total = 0.0
    for r0 in range(0, table.shape[0], chunk_rows):
        d = table[r0:r0 + chunk_rows].double() - table_hat[r0:r0 + chunk_rows].double()
        total += float(((d @ g) * d).sum())
    return total
