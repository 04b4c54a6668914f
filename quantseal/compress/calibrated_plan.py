"""Per-matrix formats for GPTQ / CBQ under a whole-file budget: the ILP picks, the solver rounds.

``quantseal compress --method gptq|cbq --budget-mb MB --formats int4_b32,int8_b32`` spends the
file's bytes where the output is most sensitive instead of one ``int{wbits}`` everywhere:

1. the budgeted planner's candidate table (:func:`.pipeline.build_candidate_table`, data-aware,
   ranks 0): every compressible Linear in every ``--formats`` format, and the token table in
   int4 / int8 / float, each with its exact stored bytes and its output-sensitivity-weighted
   round-to-nearest error Σ F ⊙ (W − Ŵ)² (LQ-LoRA §3.1, eq. 4 with the Fisher of :mod:`.fisher`);
2. the ILP (:mod:`.budget`) picks one format per matrix with Σ bytes ≤ the budget (and the
   estimated per-token decode time ≤ ``--max-decode-ms``, :mod:`.decode_cost`); a decoder's
   q/k/v, which the export packs into one ``MatMulNBits`` only when their formats agree, get one
   shared choice with their bytes and errors summed (:mod:`.pack_groups`);
3. GPTQ / CBQ then compute the codes in the chosen formats (:mod:`.calibrated`), the tied table
   last as the LM head (:mod:`.head_table`).  The bytes are the planned ones exactly, so the file
   meets the budget; only the errors differ from the plan's (calibrated rounding is better than
   the round-to-nearest the plan priced, and more so where the plan put 4 bits).

Deterministic: the Fisher's seed, the one-thread candidate table and HiGHS's exact ILP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats import FormatSpec


@dataclass
class FormatPlan:
    """The chosen format of every planned matrix (Linears and the token table) and the plan's
    totals: ``decode_ms`` is :mod:`.decode_cost`'s estimate."""

    formats: dict[str, FormatSpec]
    table: str | None  # the token table's entry name in ``formats``, or None when it is not planned
    planned_bytes: int
    decode_ms: float
    groups: list[list[str]] | None = None  # the pack groups that were given one format each


def candidate_table(model: Path, budget_mb: float, formats: tuple[str, ...], max_decode_ms: float | None = None,
                    calib: Path | None = None, calib_samples: int = 256, seed: int = 0, workers: int = 1):
    """Step 1: the data-aware, rank-0 candidate table of every compressible Linear and the table."""
    from .pipeline import CompressConfig, build_candidate_table

    cfg = CompressConfig(output=Path("unused"), model=model, budget_mb=budget_mb, method="rtn", data_aware=True,
                         calib=calib, calib_samples=calib_samples, ranks=(0,), formats=formats, workers=workers,
                         seed=seed, max_decode_ms=max_decode_ms)
    return build_candidate_table(cfg)


def plan_formats(model: Path, budget_mb: float, formats: tuple[str, ...], max_decode_ms: float | None = None,
                 calib: Path | None = None, calib_samples: int = 256, seed: int = 0, workers: int = 1) -> FormatPlan:
    """Steps 1–2: one format per compressible Linear (per pack group) and for the token table,
    under ``budget_mb`` (the whole file, as ``--budget-mb`` of lq/rtn).  Raises BudgetInfeasible
    with the smallest feasible budget."""
    table = candidate_table(model, budget_mb, formats, max_decode_ms, calib, calib_samples, seed, workers)
    from .pack_groups import grouped_plan

    choice, groups = grouped_plan(table, budget_mb=budget_mb, formats_label=",".join(formats),
                                  max_decode_ms=max_decode_ms)
    chosen = {n: table.cands[n][c].fmt for n, c in zip(table.targets, choice)}
    emb = next((n for n, (_, kind) in table.targets.items() if kind == "embedding"), None)
    planned = sum(o.bytes[c] for o, c in zip(table.options, choice))
    decode_us = sum(o.costs[c] for o, c in zip(table.options, choice))
    return FormatPlan(chosen, emb, planned, decode_us / 1000, groups)
