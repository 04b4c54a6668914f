"""Matrices the decoder export packs into one kernel share one format: one plan choice per group.

:mod:`quantseal.export.decoder_graph` concatenates the rows of an attention's query, key and value
projections into one ``MatMulNBits`` (``y = x·[W_q | W_k | W_v]ᵀ``, as onnxruntime-genai's builder
does) only when the three are stored in the same format.  A per-matrix plan that gives them
different formats therefore costs three kernel calls (and three int8 quantisations of ``x``) per
layer instead of one.  So the budgeted calibrated plans choose per *pack group*:

    minimise   Σ_g Σ_c (Σ_{i∈g} err_ic) x_gc
    subject to Σ_c x_gc = 1,   Σ_g Σ_c (Σ_{i∈g} bytes_ic) x_gc ≤ B   (and the decode-cost bound)

the LQ-LoRA §3.1 ILP (:mod:`.budget`, eq. 4) with each group's members' bytes, errors and costs
summed per shared candidate; a matrix outside every group is a group of one.  The errors are
additive over matrices (Σ F ⊙ (W − Ŵ)² per matrix), so the group sum is the exact objective.
:func:`grouped_plan` applies it to a decoder's ``--budget-mb`` plans whose candidates are all
packable (rank 0): gptq / cbq's (:mod:`.calibrated_plan`) and rtn / lq ``--ranks 0`` without
adapters (:func:`.pipeline.compress`).

Gate and up (SwiGLU's two input projections) are *not* grouped: packing them plus the ``Split``
the export would need measured no faster on onnxruntime 1.32's CPU kernels (30 LLaMA MLPs of
SmolLM2's shape, one thread: 4.93 vs 4.84 ms per token, 393 vs 382 ms for 256 tokens), so the
export keeps them apart and the plan may too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from .budget import MatrixOptions

# the Linear leaf names one decoder_graph.DecoderGraph.qkv packs, in row order
QKV = ("q_proj", "k_proj", "v_proj")


def pack_groups(names: Iterable[str]) -> list[list[str]]:
    """The groups of Linear ``names`` the decoder export packs: each attention's
    ``….q_proj, ….k_proj, ….v_proj`` (in that order) when all three are present, in order of
    first appearance.  A model that stores ``qkv_proj`` already (Phi-3) has no groups."""
    parents: dict[str, dict[str, str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        if leaf in QKV:
            parents.setdefault(parent, {})[leaf] = n
    return [[d[leaf] for leaf in QKV] for d in parents.values() if len(d) == len(QKV)]


def merge_options(options: list[MatrixOptions], groups: list[list[str]]
                  ) -> tuple[list[MatrixOptions], Callable[[list[int]], list[int]]]:
    """One :class:`MatrixOptions` per group (named ``a+b+c``) whose candidates are the labels every
    member has (in the first member's order), with the members' bytes, errors and costs summed;
    ungrouped options pass through.  A group takes the place of its first member in the list.

    Returns ``(merged, expand)``: ``expand(choice)`` maps one index per merged option back to one
    candidate index per original option (in ``options``' order)."""
    index = {o.name: i for i, o in enumerate(options)}
    group_of: dict[str, int] = {}
    for g, members in enumerate(groups):
        for n in members:
            if n not in index:
                raise ValueError(f"pack group member {n!r} is not a planned matrix")
            if n in group_of:
                raise ValueError(f"{n!r} is in two pack groups")
            group_of[n] = g
    merged: list[MatrixOptions] = []
    # per merged option: (original option indices, per merged candidate the candidate index in each)
    back: list[tuple[list[int], list[list[int]]]] = []
    done: set[int] = set()
    for i, o in enumerate(options):
        g = group_of.get(o.name)
        if g is None:
            merged.append(o)
            back.append(([i], [[c] for c in range(len(o.labels))]))
            continue
        if g in done:
            continue
        done.add(g)
        members = [options[index[n]] for n in groups[g]]
        lookup = [{label: c for c, label in reversed(list(enumerate(m.labels)))} for m in members]
        labels = [label for label in members[0].labels if all(label in lk for lk in lookup)]
        labels = list(dict.fromkeys(labels))
        if not labels:
            raise ValueError(f"the pack group {groups[g]} has no candidate format in common")
        picks = [[lk[label] for lk in lookup] for label in labels]
        costs = None
        if all(m.costs is not None for m in members):
            costs = [sum(m.costs[c] for m, c in zip(members, p)) for p in picks]
        merged.append(MatrixOptions("+".join(groups[g]), labels,
                                    [sum(m.bytes[c] for m, c in zip(members, p)) for p in picks],
                                    [sum(m.errors[c] for m, c in zip(members, p)) for p in picks], costs))
        back.append(([index[n] for n in groups[g]], picks))

    def expand(choice: list[int]) -> list[int]:
        if len(choice) != len(merged):
            raise ValueError(f"{len(choice)} choices for {len(merged)} merged options")
        out = [-1] * len(options)
        for (members, picks), c in zip(back, choice):
            for i, ci in zip(members, picks[c]):
                out[i] = ci
        return out

    return merged, expand


def grouped_plan(table, budget_bits: float | None = None, budget_mb: float | None = None, formats_label: str = "",
                 max_decode_ms: float | None = None) -> tuple[list[int], list[list[str]]]:
    """The ILP (:func:`.pipeline.plan`) over pack groups of a candidate table
    (:class:`.pipeline.CandidateTable`): a decoder's q/k/v share one choice.  Returns one
    candidate index per ``table.options`` entry and the groups (none for other families)."""
    from .pipeline import plan

    linears = [n for n, (_, kind) in table.targets.items() if kind == "linear"]
    groups = pack_groups(linears) if getattr(table.fam, "name", None) == "decoder" else []
    merged, expand = merge_options(table.options, groups)
    choice = plan(replace(table, options=merged), budget_bits, budget_mb, formats_label, max_decode_ms)
    return expand(choice), groups
