"""Fold read adapters into a compressed checkpoint, exactly (DESIGN §5), and export the result.

The compressed Linear computes ``y = o ⊙ ((x / s) · (dequant(Q) + L1 L2)ᵀ) + β`` with the
optional stored per-output scale ``o`` (``<name>.output_scale``, a Mul after the MatMul) and input
divisor ``s`` (``<name>.input_smooth``).  Its effective weight is ``W = diag(o) M diag(1/s)``,
``M = dequant(Q) + L1 L2``.  The edits of :mod:`.base` fold as follows, the quantised codes never
touched (PEFT's own ``merge`` into a quantised base requantises, which is lossy):

1. input scale l:   ``s ← s / l``                              (l > 0)
2. ``W ← W + b a``:  ``L1' = [L1 | b / o]``, ``L2' = [L2 ; a ⊙ s]``  (o ≠ 0), so ``L1'L2' = L1 L2 + diag(1/o) b a diag(s)``
3. DoRA magnitude m: ``o ← o ⊙ m / ‖W‖_row`` with W from the stored tensors after step 2
4. bias δ:          ``β ← β + δ``
5. output scale l:  ``o ← o ⊙ l``, ``β ← β ⊙ l``

and ``bias="lora_only"/"all"`` adapters replace the stored biases they carry before their edits.
A LoKr delta ``W1 ⊗ W2`` is stored as its factors ``K1 ⊗ K2`` (``<name>.K1``/``.K2``, inside M, so
under o and s) when that is smaller than its rank form and the layer has neither o nor s; a later
input divisor first moves it into the low-rank branch (exactly: :func:`.lokr.kron_lowrank`).
Adapters fold in order, each on top of the previous ones (PEFT's sequential merge).  A LoRA on an
``nn.Embedding`` (``E ≈ dequant(Q) + L1 L2``) takes step 2 with ``o = s = 1``.

**Precision.** The checkpoint stores low-rank factors as float16 (the byte budget counts them so),
and so does the fold by default: exact up to float16 rounding of the new factors (relative error
≈ 2⁻¹¹ per entry), each new rank-1 component balanced first (:func:`.factored.balanced`).  The
report states ``‖L1'L2' − (L1 L2 + b'a')‖_F / ‖b'a'‖_F`` per adapter.  ``dtype=torch.float32``
stores the folded factors in float32 (exact to float32).  Scales and biases are float32.

**Bytes.** A matrix's ``bytes`` count its codes, scales, zero points, low-rank and Kronecker
factors; ``output_scale`` / ``input_smooth`` / biases are plain tensors (4 bytes per feature), counted
with every other tensor in ``budget["tensor_bytes"]``.

**Re-compression.** ``rank=R`` replaces each folded branch by its best rank-R approximation
(:func:`.factored.truncate_factored`) and reports the Frobenius error it costs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ...checkpoint import Manifest, MatrixEntry, budget_after_edit, dequantized_matrix, entry_bytes
from ...compress.qlinear import OUTPUT_SCALE
from ...compress.smoothing import BUFFER as SMOOTH
from ...errors import BadInput, Unsupported
from .base import Adapter, MatrixDelta
from .factored import balanced, product_distance, truncate_factored


def resolve_target(module: str, candidates) -> str | None:
    """The checkpoint name a PEFT module path names: an exact match, or the unique candidate that
    is a dotted suffix of it (``bert.encoder.layer.0...`` when the adapter was trained on a
    wrapper model)."""
    if module in candidates:
        return module
    hits = [n for n in candidates if module.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _targets(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Matrices an adapter may target: the planned ones and every plain 2-D ``<name>.weight``."""
    out = {n: e.kind for n, e in manifest.matrices.items()}
    for key, t in tensors.items():
        if key.endswith(".weight") and t.ndim == 2 and key[:-7] not in out:
            out[key[:-7]] = "plain"
    return out


def _as_matrix(name: str, delta: MatrixDelta, tensors: dict[str, torch.Tensor]) -> MatrixEntry:
    """A plain stored weight becomes an fp matrix that can carry a low-rank branch."""
    w = tensors[f"{name}.weight"]
    fmt = {torch.float16: "fp16", torch.float32: "fp32"}.get(w.dtype)
    if fmt is None:
        raise Unsupported(f"{name}.weight: dtype {w.dtype} cannot carry a low-rank branch")
    return MatrixEntry(format=fmt, rank=0, shape=list(w.shape), error=0.0, bytes=0, kind=delta.kind)


def _map(ad: Adapter, man: Manifest, tensors: dict[str, torch.Tensor], targets: dict[str, str]):
    """Checkpoint name → delta, and checkpoint bias key → replacement, all checked (exists, kind,
    shape) before anything is folded."""
    mapped: dict[str, MatrixDelta] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module, d in ad.deltas.items():
        name = resolve_target(module, targets)
        if name is None:
            some = ", ".join(sorted(n for n, k in targets.items() if k != "plain")[:4])
            raise BadInput(f"{ad.path}: target {module!r} is not a matrix of the checkpoint (e.g. {some}, ...)")
        kind = targets[name] if targets[name] != "plain" else d.kind
        if kind != d.kind:
            raise BadInput(f"{ad.path}: {module} is a {ad.peft_type} on an {d.kind}, but {name} is a {kind} in the checkpoint")
        shape = tuple(man.matrices[name].shape) if name in man.matrices else tuple(tensors[f"{name}.weight"].shape)
        if any(want not in (-1, got) for want, got in zip(d.shape, shape)):
            shown = [x if x != -1 else "*" for x in d.shape]
            raise BadInput(f"{ad.path}: {module}: the adapter's delta is {shown}, the checkpoint's "
                           f"{name} is {list(shape)} (an adapter for another model?)")
        if name in mapped:
            raise BadInput(f"{ad.path}: two adapter modules map to {name}")
        mapped[name] = d
        shapes[module] = shape
    if ad.resolve is not None:
        ad.resolve(shapes)
    for name, d in mapped.items():
        d.shape = shapes[d.module]
    biases = {}
    plain = {k[:-5] for k, t in tensors.items() if k.endswith(".bias") and t.ndim == 1}
    for key, arr in ad.biases.items():
        name = resolve_target(key[:-5], plain)
        if name is None:
            raise BadInput(f"{ad.path}: bias {key!r} has no counterpart in the checkpoint")
        if tuple(tensors[f"{name}.bias"].shape) != arr.shape:
            raise BadInput(f"{ad.path}: bias {key!r} is {list(arr.shape)}, the checkpoint's is "
                           f"{list(tensors[name + '.bias'].shape)}")
        biases[f"{name}.bias"] = arr
    return mapped, biases


def _vector(out: dict, key: str, n: int) -> np.ndarray | None:
    t = out.get(key)
    if t is None:
        return None
    if tuple(t.shape) != (n,):
        raise BadInput(f"{key}: stored with shape {list(t.shape)}, expected [{n}]")
    return t.double().numpy()


def effective_weight(name: str, entry: MatrixEntry, out: dict[str, torch.Tensor]) -> np.ndarray:
    """``W = diag(o) (dequant(Q) + L1 L2 + K1 ⊗ K2) diag(1/s)`` (N, K) float64 from the stored tensors."""
    w_hat, _, _ = dequantized_matrix(name, entry, out)
    w = w_hat.double().numpy()
    if f"{name}.L1" in out:
        w = w + out[f"{name}.L1"].double().numpy() @ out[f"{name}.L2"].double().numpy()
    if f"{name}.K1" in out:
        w = w + np.kron(out[f"{name}.K1"].double().numpy(), out[f"{name}.K2"].double().numpy())
    n, k = w.shape
    o, s = _vector(out, f"{name}.{OUTPUT_SCALE}", n), _vector(out, f"{name}.{SMOOTH}", k)
    if o is not None:
        w = o[:, None] * w
    if s is not None:
        w = w / s[None, :]
    return w


def _set(out: dict, key: str, value: np.ndarray, like: torch.Tensor | None = None) -> None:
    t = torch.from_numpy(np.ascontiguousarray(value)).to(torch.float32 if like is None else like.dtype)
    if not torch.isfinite(t).all():
        raise BadInput(f"{key}: the folded values overflow {t.dtype}")
    out[key] = t.contiguous()


def _apply(name: str, d: MatrixDelta, man: Manifest, out: dict, exact: dict, dtype: torch.dtype,
           where: Path) -> tuple[float, float]:
    """Steps 1–5 on one matrix; returns (squared rounding error, squared norm) of the new branch."""
    n, k = d.shape
    if d.kind == "embedding" and any(v is not None for v in (d.input_scale, d.magnitude, d.bias_add, d.output_scale)):
        raise Unsupported(f"{where}: {d.module}: only a low-rank delta folds into a token embedding")
    num = den = 0.0
    d.stored_as = ""
    if d.input_scale is not None and f"{name}.K1" in out:  # x / s would reach the Kronecker branch too
        _kron_to_branch(name, out, exact, dtype)
    if d.kron is not None and _use_kron(name, d, out):
        d.stored_as = "kronecker"
        return _store_kron(name, d, out, dtype)
    if d.input_scale is not None:
        if not (d.input_scale > 0).all():
            raise Unsupported(f"{where}: {d.module}: a non-positive input scale cannot become the layer's divisor")
        s = _vector(out, f"{name}.{SMOOTH}", k)
        _set(out, f"{name}.{SMOOTH}", (np.ones(k) if s is None else s) / d.input_scale)
    if d.b is not None:
        b, a = d.b, d.a
        if b.shape[1] > min(n, k):  # LoHa's r², LoKr's r1·r2: the rank cannot exceed min(N, K)
            b, a, _, _ = truncate_factored(b, a, min(n, k))  # lossless (no singular value dropped)
        o, s = _vector(out, f"{name}.{OUTPUT_SCALE}", n), _vector(out, f"{name}.{SMOOTH}", k)
        if o is not None:
            if (o == 0).any():
                raise Unsupported(f"{where}: {d.module}: a low-rank delta on rows an earlier adapter scaled to zero")
            b = b / o[:, None]
        if s is not None:
            a = a * s[None, :]
        if name not in exact:
            l1, l2 = out.get(f"{name}.L1"), out.get(f"{name}.L2")
            exact[name] = ((l1.double().numpy(), l2.double().numpy()) if l1 is not None
                           else (np.zeros((n, 0)), np.zeros((0, k))))
        bb, aa = balanced(b, a)
        b_st, a_st = torch.from_numpy(bb).to(dtype), torch.from_numpy(aa).to(dtype)
        if not (torch.isfinite(b_st).all() and torch.isfinite(a_st).all()):
            raise BadInput(f"{where}: {d.module}: the scaled factors overflow {dtype}")
        old1, old2 = out.get(f"{name}.L1"), out.get(f"{name}.L2")
        out[f"{name}.L1"] = (b_st if old1 is None else torch.cat([old1.to(dtype), b_st], 1)).contiguous()
        out[f"{name}.L2"] = (a_st if old2 is None else torch.cat([old2.to(dtype), a_st], 0)).contiguous()
        e1, e2 = exact[name]
        exact[name] = (np.concatenate([e1, b], 1), np.concatenate([e2, a], 0))
        num = product_distance(b_st.double().numpy(), a_st.double().numpy(), b, a) ** 2
        den = product_distance(b, a, b[:, :0], a[:0]) ** 2
    if d.magnitude is not None:
        norm = np.linalg.norm(effective_weight(name, man.matrices[name], out), axis=1)
        if not (norm > 0).all():
            raise BadInput(f"{where}: {d.module}: a zero row, DoRA's norm is undefined")
        o = _vector(out, f"{name}.{OUTPUT_SCALE}", n)
        _set(out, f"{name}.{OUTPUT_SCALE}", (np.ones(n) if o is None else o) * d.magnitude / norm)
    bias = out.get(f"{name}.bias")
    if d.bias_add is not None:
        base = np.zeros(n) if bias is None else _vector(out, f"{name}.bias", n)
        _set(out, f"{name}.bias", base + d.bias_add, bias)
    if d.output_scale is not None:
        o = _vector(out, f"{name}.{OUTPUT_SCALE}", n)
        _set(out, f"{name}.{OUTPUT_SCALE}", (np.ones(n) if o is None else o) * d.output_scale)
        bias = out.get(f"{name}.bias")
        if bias is not None:
            _set(out, f"{name}.bias", _vector(out, f"{name}.bias", n) * d.output_scale, bias)
    return num, den


def _use_kron(name: str, d: MatrixDelta, out: dict) -> bool:
    """Store LoKr's ``K1 ⊗ K2`` as is: smaller than its rank form, the layer has no output scale or
    input divisor (they do not factor through a Kronecker product) and no Kronecker branch yet."""
    (k1, k2), n, k = d.kron, *d.shape
    if any(f"{name}.{x}" in out for x in (OUTPUT_SCALE, SMOOTH, "K1")):
        return False
    return k1.size + k2.size < min(d.rank, min(n, k)) * (n + k)


def _store_kron(name: str, d: MatrixDelta, out: dict, dtype: torch.dtype) -> tuple[float, float]:
    """K1, K2 balanced (‖K1‖ = ‖K2‖, product unchanged) and stored; returns (squared rounding
    error, squared norm) of ``K1 ⊗ K2``, from ‖A⊗B − C⊗D‖² = ‖A‖²‖B‖² + ‖C‖²‖D‖² − 2⟨A,C⟩⟨B,D⟩."""
    k1, k2 = d.kron
    n1, n2 = np.linalg.norm(k1), np.linalg.norm(k2)
    f = np.sqrt(n2 / n1) if n1 > 0 and n2 > 0 else 1.0
    k1, k2 = k1 * f, k2 / f
    s1, s2 = torch.from_numpy(k1).to(dtype), torch.from_numpy(k2).to(dtype)
    if not (torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        raise BadInput(f"{d.module}: the Kronecker factors overflow {dtype}")
    out[f"{name}.K1"], out[f"{name}.K2"] = s1.contiguous(), s2.contiguous()
    c1, c2 = s1.double().numpy(), s2.double().numpy()
    den = float(np.sum(k1 * k1) * np.sum(k2 * k2))
    num = den + float(np.sum(c1 * c1) * np.sum(c2 * c2)) - 2 * float(np.sum(k1 * c1) * np.sum(k2 * c2))
    return max(num, 0.0), den


def _kron_to_branch(name: str, out: dict, exact: dict, dtype: torch.dtype) -> None:
    """Move a stored ``K1 ⊗ K2`` into the low-rank branch (exact: the mixed product of thin
    factorisations), so a later input divisor acts on it like on the rest of the matrix."""
    from .lokr import kron_lowrank

    b, a = kron_lowrank(out.pop(f"{name}.K1").double().numpy(), out.pop(f"{name}.K2").double().numpy())
    n, k = b.shape[0], a.shape[1]
    if b.shape[1] > min(n, k):
        b, a, _, _ = truncate_factored(b, a, min(n, k))
    l1, l2 = out.get(f"{name}.L1"), out.get(f"{name}.L2")
    if name not in exact:
        exact[name] = ((l1.double().numpy(), l2.double().numpy()) if l1 is not None
                       else (np.zeros((n, 0)), np.zeros((0, k))))
    bb, aa = balanced(b, a)
    b_st, a_st = torch.from_numpy(bb).to(dtype), torch.from_numpy(aa).to(dtype)
    out[f"{name}.L1"] = (b_st if l1 is None else torch.cat([l1.to(dtype), b_st], 1)).contiguous()
    out[f"{name}.L2"] = (a_st if l2 is None else torch.cat([l2.to(dtype), a_st], 0)).contiguous()
    exact[name] = (np.concatenate([exact[name][0], b], 1), np.concatenate([exact[name][1], a], 0))


def _edits(mapped: dict[str, MatrixDelta]) -> dict[str, int]:
    keys = ("b", "input_scale", "magnitude", "bias_add", "output_scale")
    names = ("low_rank", "input_scale", "magnitude", "bias_add", "output_scale")
    out = {nm: sum(getattr(d, k) is not None for d in mapped.values()) for k, nm in zip(keys, names)}
    out["kronecker"] = sum(d.stored_as == "kronecker" for d in mapped.values())
    out["low_rank"] -= out["kronecker"]
    return out


def fold_adapters(manifest: Manifest, tensors: dict[str, torch.Tensor], adapters: list[Adapter],
                  rank: int | None = None, dtype: torch.dtype = torch.float16
                  ) -> tuple[Manifest, dict[str, torch.Tensor], dict]:
    """Fold ``adapters`` (in order) into the checkpoint; optionally truncate every folded low-rank
    branch to ``rank``.  Returns the new ``(manifest, tensors, report)``; the inputs are not modified.

    Every target of every adapter is checked (exists, same kind, same shape) before anything is folded."""
    if rank is not None and rank < 1:
        raise BadInput(f"--adapter-rank must be at least 1, not {rank}")
    if dtype not in (torch.float16, torch.float32):
        raise BadInput(f"low-rank factors are stored as float16 or float32, not {dtype}")
    man = copy.deepcopy(manifest)
    out = dict(tensors)
    targets = _targets(manifest, tensors)
    plan = [(ad, *_map(ad, man, tensors, targets)) for ad in adapters]

    exact: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # float64 running branch of each folded matrix
    touched: set[str] = set()
    reports = []
    for ad, mapped, biases in plan:
        for key, arr in biases.items():
            _set(out, key, arr, out[key])
        num = den = 0.0
        for name, d in mapped.items():
            if name not in man.matrices:
                man.matrices[name] = _as_matrix(name, d, tensors)
            e_num, e_den = _apply(name, d, man, out, exact, dtype, ad.path)
            num, den = num + e_num, den + e_den
            touched.add(name)
        reports.append({"path": str(ad.path), "peft_type": ad.peft_type, "r": ad.r, "alpha": ad.alpha,
                        "use_rslora": ad.use_rslora, "matrices": len(mapped), "sha256": ad.sha256,
                        "edits": {**_edits(mapped), "replaced_biases": len(biases)},
                        "delta_norm": float(np.sqrt(den)),
                        "fold_rel_error": float(np.sqrt(num / den)) if den > 0 else 0.0})

    truncation = None
    if rank is not None:
        err2 = norm2 = 0.0
        per = {}
        for name, (e1, e2) in exact.items():
            s1, s2 = out[f"{name}.L1"].double().numpy(), out[f"{name}.L2"].double().numpy()
            if s1.shape[1] <= rank:
                norm2 += product_distance(s1, s2, s1[:, :0], s2[:0]) ** 2
                per[name] = 0.0
                continue
            t1, t2, err, nrm = truncate_factored(s1, s2, rank)
            t1, t2 = balanced(t1, t2)
            out[f"{name}.L1"] = torch.from_numpy(t1).to(dtype).contiguous()
            out[f"{name}.L2"] = torch.from_numpy(t2).to(dtype).contiguous()
            err2 += err ** 2
            norm2 += nrm ** 2
            per[name] = err
        truncation = {"rank": rank, "error": float(np.sqrt(err2)),
                      "rel_error": float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0,
                      "max_matrix_error": max(per.values(), default=0.0),
                      "matrix_errors": {n: per[n] for n in sorted(per)}}

    for name in touched:
        e = man.matrices[name]
        e.rank = int(out[f"{name}.L1"].shape[1]) if f"{name}.L1" in out else 0
        e.bytes = entry_bytes(name, out)
    man.budget = budget_after_edit(man.budget, tensors, out)
    extra = dict(man.extra)
    extra["adapters"] = list(extra.get("adapters", [])) + [
        {k: r[k] for k in ("path", "peft_type", "r", "alpha", "use_rslora", "matrices", "sha256")} for r in reports]
    if truncation is not None:
        extra["adapter_rank"] = truncation
    man.extra = extra
    stored = {n: (out[f"{n}.L1"].double().numpy(), out[f"{n}.L2"].double().numpy()) for n in exact}
    total_err = np.sqrt(sum(product_distance(*stored[n], *exact[n]) ** 2 for n in exact))
    total_norm = np.sqrt(sum(product_distance(*exact[n], exact[n][0][:, :0], exact[n][1][:0]) ** 2 for n in exact))
    report = {"adapters": reports, "matrices": sorted(touched), "dtype": str(dtype).replace("torch.", ""),
              "ranks": {n: man.matrices[n].rank for n in sorted(touched)},
              "kronecker": {n: [list(out[f"{n}.K1"].shape), list(out[f"{n}.K2"].shape)]
                            for n in sorted(touched) if f"{n}.K1" in out},
              "branch_rel_error": float(total_err / total_norm) if total_norm > 0 else 0.0}
    if truncation is not None:
        report["adapter_rank"] = truncation
    return man, out, report



def export_with_adapters(checkpoint, output, adapter_dirs, rank: int | None = None, accuracy_level: int = 0,
                         dtype: torch.dtype = torch.float16, compute: str = "fp32", mark: dict | None = None) -> dict:
    """``quantseal export --adapter DIR ... [--adapter-rank R]``: fold the adapters into a
    temporary checkpoint beside ``output``, export it with :func:`quantseal.export.onnx.export_onnx`,
    remove it.  The export report gains ``adapters`` (the fold report).

    ``mark``: a customer's watermark (``{"board", "key", "registry", "customer", "seed"}``, as
    :func:`.switchable.export_switchable` takes it).  The mark is folded into the token table first
    (:func:`..watermark.mark_checkpoint`, on the checkpoint the board was trained on), the adapters
    on top: every edit is additive (a token-embedding LoRA becomes a low-rank branch beside the
    marked table, which it does not rewrite), so the order does not change the function.  The
    adapted model is then verified (:func:`.mark_check.check_branches`) before it is published:
    an adapter that moves the board's statistics past its margin is refused, by name."""
    import shutil
    import tempfile
    import time

    from ...checkpoint import read_checkpoint, write_checkpoint
    from ..onnx import _check_output, _make_parent, export_onnx
    from .read import read_adapter

    from .xlora import is_xlora

    if len(adapter_dirs) == 1 and is_xlora(adapter_dirs[0]):  # routed, not folded
        from ..decoder_xlora import export_xlora

        if rank is not None:
            raise BadInput("--adapter-rank truncates folded branches; an X-LoRA export routes its experts unfolded")
        if mark is not None:
            raise BadInput("an X-LoRA export with a watermark (--board) is not supported yet")
        return export_xlora(checkpoint, output, adapter_dirs[0], accuracy_level, dtype=compute)
    if compute != "fp32":
        raise BadInput(f"--dtype {compute} with folded adapters is not supported yet; export in fp32 "
                       "(an X-LoRA folder exports in fp16)")
    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    adapters = [read_adapter(d) for d in adapter_dirs]
    if not adapters:
        raise BadInput("no adapter given")
    manifest, tensors = read_checkpoint(checkpoint)
    board = None
    if mark is not None:  # the customer's mark in the table first, on the board's own checkpoint
        from ...compress.markboard import load_board
        from ..watermark import mark_checkpoint

        board = load_board(mark["board"])
        manifest, tensors = mark_checkpoint(manifest, tensors, board, mark["key"], mark["registry"],
                                            mark["customer"], seed=mark.get("seed"))
    man, folded, report = fold_adapters(manifest, tensors, adapters, rank=rank, dtype=dtype)
    report["fold_seconds"] = round(time.perf_counter() - t0, 3)
    del tensors
    _make_parent(output)
    try:
        work = Path(tempfile.mkdtemp(prefix=".quantseal-adapt.", dir=output.parent))
    except OSError as exc:
        raise BadInput(f"{output}: cannot write there ({exc.strerror})") from exc
    try:
        write_checkpoint(work / "ck", man, folded, checkpoint)
        del folded
        checks = None
        if mark is not None:  # verified before it is published (the same bytes are exported twice)
            from .mark_check import check_branches

            staged = work / "staged" / output.name
            export_onnx(work / "ck", staged, accuracy_level=accuracy_level)
            checks = check_branches(staged, [], board, mark["key"], mark["registry"], mark["customer"])
        res = export_onnx(work / "ck", output, accuracy_level=accuracy_level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["adapters"] = report
    if mark is not None:
        res.update(marked=True, mark_check=checks)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res
