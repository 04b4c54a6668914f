"""Adapter rank under the memory budget: ``quantseal compress --adapter DIR [--adapter-rank auto]``.

The DyLoRA / SoRA idea (Valipour et al. 2023; Ding et al. 2023: an adapter works at several
ranks, keep the ones that pay) made a budget decision.  A PEFT adapter's delta on a compressed
Linear, ``ΔW = b · a`` (``b: (N, r)`` already scaled, ``a: (r, K)``; several adapters add up,
``b = [b1 | b2]``), may be stored at any rank t ∈ {r, r/2, r/4, …, 1, 0}: its best rank-t
approximation is the SVD truncation (Eckart–Young–Mirsky), computed from the factors
(:func:`quantseal.export.adapters.truncate_factored`), whose squared error is the energy of the
discarded singular values ``Σ_{j>t} σ_j²``.  Data-aware plans truncate ``D_r ΔW D_c`` instead
(LQ-LoRA's rank-1 Fisher scaling, as :mod:`.lowrank` does for the base branch) and undo the
scaling, so the truncation is optimal in the same weighted norm.

Each rank t is a candidate of its own ILP group ``<matrix>#adapter``: bytes ``2·t·(N + K)`` (the
float16 columns of L1 and rows of L2 the fold appends), error ``Σ F ⊙ (ΔW − b̂_t â_t)²`` (or the
plain ``Σ (·)²``) with the float16 factors exactly as the file stores them — the unit of the base
candidates' errors (:func:`.lowrank.weighted_error`).  :func:`.budget.solve_allocation` then picks
one base candidate and one adapter rank per matrix, jointly, under one byte budget: the objective
is the sum of the two errors (their cross term ``2⟨W − Ŵ, ΔW − ΔW_t⟩`` is left out, as the base
plan already treats matrices as independent).

Only pure low-rank deltas on planned Linears take part (LoRA, rsLoRA, patterns, AdaLoRA, VeRA,
LoHa, LoKr's rank form, MiSS); a DoRA magnitude, IA³ scales, biases, an embedding LoRA or a target
outside the plan are refused by name (fold those at export).  Why at compress and not at export:
the budget and the base candidates' table live here; an export reads a finished plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput, Unsupported
from .budget import MatrixOptions
from .fisher import scale_vectors

SUFFIX = "#adapter"


@dataclass
class RankOptions:
    """The adapter-rank candidates of one matrix: ranks, exact stored bytes, errors, and the
    truncated float64 factors ``(b_t (N, t), a_t (t, K))`` (None for t = 0) the fold stores."""

    name: str
    full_rank: int
    ranks: list[int]
    bytes: list[int]
    errors: list[float]
    factors: list[tuple[np.ndarray, np.ndarray] | None]

    def matrix_options(self) -> MatrixOptions:
        return MatrixOptions(self.name + SUFFIX, [f"r{t}" for t in self.ranks], self.bytes, self.errors)


def halving_ranks(r: int) -> list[int]:
    """r, r/2, r/4, …, 1, 0 (integer halving, each once)."""
    out = []
    while r > 0:
        out.append(r)
        r //= 2
    return out + [0]


def stored_product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``b a`` as the file holds it: each component balanced, then float16 (what
    :func:`quantseal.export.adapters.fold_adapters` stores for these factors)."""
    from ..export.adapters import balanced

    bb, aa = balanced(b, a)
    return bb.astype(np.float16).astype(np.float64) @ aa.astype(np.float16).astype(np.float64)


def rank_options(name: str, b: np.ndarray, a: np.ndarray, fisher: torch.Tensor | None,
                 ranks: list[int]) -> RankOptions:
    """Candidates of ``ΔW = b a`` (b: (N, r), a: (r, K), float64) at each rank in ``ranks``
    (module docstring): SVD truncation (of ``D_r ΔW D_c`` when ``fisher`` (N, K) is given)."""
    from ..export.adapters import truncate_factored

    n, k = b.shape[0], a.shape[1]
    delta = b @ a
    if fisher is None:
        dr, dc, f = np.ones(n), np.ones(k), None
    else:
        r_, c_ = scale_vectors(fisher.double())
        dr, dc, f = r_.numpy(), c_.numpy(), fisher.double().numpy()
    wb, wa = dr[:, None] * b, a * dc[None, :]

    def error(resid: np.ndarray) -> float:
        return float(np.sum(resid ** 2 * f) if f is not None else np.sum(resid ** 2))

    out = RankOptions(name, int(b.shape[1]), [], [], [], [])
    for t in ranks:
        if t == 0:
            factors, resid = None, delta
        else:
            t1, t2, _, _ = truncate_factored(wb, wa, t)
            factors = (t1 / dr[:, None], t2 / dc[None, :])
            resid = delta - stored_product(*factors)
        out.ranks.append(int(t))
        out.bytes.append(2 * int(t) * (n + k))
        out.errors.append(error(resid))
        out.factors.append(factors)
    return out


def adapter_deltas(adapter_dirs, targets: dict[str, tuple[int, int]]) -> tuple[list, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read the adapters and sum their low-rank deltas per planned Linear: ``(adapters, {matrix:
    (b (N, Σr), a (Σr, K))})``.  ``targets``: the plan's Linears, name → (N, K)."""
    from ..export.adapters import read_adapter, resolve_target

    adapters = [read_adapter(d) for d in adapter_dirs]
    out: dict[str, tuple[list, list]] = {}
    for ad in adapters:
        if ad.biases:
            raise Unsupported(f"{ad.path}: replaces base biases (bias={'lora_only'!r}/'all'); only low-rank deltas "
                              "join the budget (fold it at export instead)")
        names, shapes = {}, {}
        for module, d in ad.deltas.items():
            name = resolve_target(module, targets)
            if name is None:
                raise Unsupported(f"{ad.path}: target {module!r} is not a Linear the plan compresses; only those "
                                  "carry a budgeted adapter rank (fold it at export instead)")
            names[module], shapes[module] = name, targets[name]
        if ad.resolve is not None:
            ad.resolve(shapes)
        for module, d in ad.deltas.items():
            edits = [e for e in ("input_scale", "magnitude", "bias_add", "output_scale") if getattr(d, e) is not None]
            if d.kind != "linear" or d.b is None or edits:
                what = ", ".join(edits) or (d.kind if d.kind != "linear" else "no low-rank term")
                raise Unsupported(f"{ad.path}: {module}: a {ad.peft_type} edit with {what} is not a low-rank delta; "
                                  "only those join the budget (fold it at export instead)")
            if tuple(d.b.shape[:1]) + tuple(d.a.shape[1:]) != shapes[module]:
                raise BadInput(f"{ad.path}: {module}: the delta is {[d.b.shape[0], d.a.shape[1]]}, the matrix "
                               f"{list(shapes[module])}")
            bs, as_ = out.setdefault(names[module], ([], []))
            bs.append(d.b)
            as_.append(d.a)
    return adapters, {n: (np.concatenate(bs, 1), np.concatenate(as_, 0)) for n, (bs, as_) in sorted(out.items())}


def adapter_rank_options(adapter_dirs, targets: dict[str, tuple[int, int]], fisher: dict[str, torch.Tensor | None],
                         rank: str | int = "auto") -> tuple[list, list[RankOptions]]:
    """Every adapted matrix's :class:`RankOptions`: ranks ``r, r/2, …, 0`` (``rank="auto"``), or
    the single rank ``min(rank, r)`` (its bytes still count toward the budget)."""
    if rank != "auto" and (not isinstance(rank, int) or rank < 0):
        raise BadInput(f"--adapter-rank must be 'auto' or a non-negative integer, not {rank!r}")
    adapters, deltas = adapter_deltas(adapter_dirs, targets)
    options = []
    for name, (b, a) in deltas.items():
        full = min(b.shape[1], *targets[name])
        ranks = halving_ranks(full) if rank == "auto" else [min(int(rank), full)]
        options.append(rank_options(name, b, a, fisher.get(name), ranks))
    return adapters, options


def fold_chosen(manifest, tensors: dict[str, torch.Tensor], adapters: list, options: list[RankOptions],
                choice: list[int]):
    """Fold each matrix's chosen truncation into the checkpoint's low-rank branch (float16,
    :func:`quantseal.export.adapters.fold_adapters`); returns ``(manifest, tensors, summary)``,
    the stored bytes checked against the plan's."""
    from ..export.adapters import Adapter, MatrixDelta, fold_adapters

    deltas = {}
    for o, c in zip(options, choice):
        if o.factors[c] is not None:
            b, a = o.factors[c]
            deltas[o.name] = MatrixDelta(o.name, (b.shape[0], a.shape[1]), "linear", b, a)
    summary = {"ranks": {o.name: o.ranks[c] for o, c in zip(options, choice)},
               "full_ranks": {o.name: o.full_rank for o in options},
               "errors": {o.name: o.errors[c] for o, c in zip(options, choice)},
               "bytes": sum(o.bytes[c] for o, c in zip(options, choice))}
    summary["error"] = sum(summary["errors"].values())
    info = [{"path": str(ad.path), "peft_type": ad.peft_type, "r": ad.r, "alpha": ad.alpha,
             "use_rslora": ad.use_rslora, "matrices": len(ad.deltas), "sha256": ad.sha256} for ad in adapters]
    if not deltas:
        manifest.extra = {**manifest.extra, "adapters": info, "adapter_rank": summary}
        return manifest, tensors, summary
    synthetic = Adapter(Path(str(adapters[0].path)), "LORA", 0, 0.0, False, deltas, "")
    man, out, _ = fold_adapters(manifest, tensors, [synthetic], dtype=torch.float16)
    for o, c in zip(options, choice):
        want = manifest.matrices[o.name].bytes + o.bytes[c]
        if man.matrices[o.name].bytes != want:  # the ILP's byte count must be the file's
            raise RuntimeError(f"{o.name}: {man.matrices[o.name].bytes} bytes after the fold, planned {want}")
    man.extra = {**manifest.extra, "adapters": info, "adapter_rank": summary}
    return man, out, summary
