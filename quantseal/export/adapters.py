"""Fold PEFT LoRA adapters into a compressed checkpoint's low-rank branch, exactly (DESIGN §5).

A LoRA adapter adds ``ΔW = s · B · A`` to a Linear ``W: (N, K)`` (out × in), with
``B: (N, r)``, ``A: (r, K)`` and ``s = α / r`` (``α / √r`` with rsLoRA; Hu et al. 2021, eq. 3;
Kalajdzievski 2023).  A compressed matrix already computes ``W ≈ dequant(Q) + L1 · L2``, so the
adapter joins the low-rank branch by concatenation,

    L1' = [L1 | s·B]  (N, r0 + r),        L2' = [L2 ; A]  (r0 + r, K),

and ``L1' L2' = L1 L2 + s B A``: the quantised codes are untouched, nothing is requantised (PEFT's
own ``merge`` into a quantised base requantises, which is lossy).  Several adapters fold in
sequence.  A LoRA on an ``nn.Embedding`` (PEFT's ``lora_embedding_A: (r, V)``,
``lora_embedding_B: (H, r)``, ``ΔE = s · (B A)ᵀ``) folds the same way into ``E ≈ dequant(Q) + L1 L2``
with ``L1' = [L1 | s·Aᵀ]``, ``L2' = [L2 ; Bᵀ]``.

**Precision.** The checkpoint stores low-rank factors as float16 (the byte budget counts them so),
and so does the fold by default: the result is exact up to float16 rounding of the new factors
(relative error ≈ 2⁻¹¹ per entry).  Before rounding, each new rank-1 component is rescaled so that
its column of ``s·B`` and its row of ``A`` have equal norms (the product is unchanged), which keeps
both away from float16's subnormal range.  The report states the achieved relative error
``‖L1'L2' − (L1 L2 + sBA)‖_F / ‖sBA‖_F`` per adapter.  ``dtype=torch.float32`` stores the factors
of the folded matrices in float32 instead (exact to float32; the exporter and the torch loader take
either dtype, and the manifest's ``bytes`` count what is stored).

**Re-compression.** ``rank=R`` replaces each folded branch by its best rank-R approximation
(Eckart–Young), computed in factored form: thin QR ``L1' = Q1 R1``, ``L2'ᵀ = Q2 R2``, SVD of the
small core ``R1 R2ᵀ = U Σ Vᵀ``, then ``L1'' = Q1 U_R Σ_R^½``, ``L2'' = Σ_R^½ V_Rᵀ Q2ᵀ``; the
Frobenius error it costs is ``√(Σ_{j>R} σ_j²)`` exactly.

Adapter kinds plug into :data:`READERS` (PEFT ``peft_type`` → reader).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import Manifest, MatrixEntry, budget_after_edit, entry_bytes
from ..compress.smoothing import BUFFER as SMOOTH
from ..errors import BadInput, Unsupported

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


@dataclass
class LowRankDelta:
    """One matrix's adapter delta ``ΔW = b · a`` in the checkpoint's orientation, float64.

    module: the module path inside the adapted model (PEFT prefix removed)
    b:      (N, r) already multiplied by the scale s (N: out features, or vocabulary size)
    a:      (r, K) (K: in features, or hidden size)
    kind:   "linear" | "embedding"
    """

    module: str
    b: np.ndarray
    a: np.ndarray
    kind: str
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Adapter:
    """A read adapter folder: its config summary and one delta per adapted module."""

    path: Path
    peft_type: str
    r: int
    alpha: float
    use_rslora: bool
    deltas: dict[str, LowRankDelta]
    sha256: str


# ----------------------------------------------------------------------------- reading
def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise BadInput(f"{folder}: no such adapter folder")
    path = folder / CONFIG
    if not path.is_file():
        raise BadInput(f"{folder}: not a PEFT adapter folder (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return cfg


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise Unsupported(f"{folder}: adapter_model.bin (pickle) is not read; save the adapter with "
                              "safe_serialization=True (adapter_model.safetensors)")
        raise BadInput(f"{folder}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{path}: corrupt safetensors file ({exc})") from exc
    return tensors, hashlib.sha256(path.read_bytes()).hexdigest()


def read_lora(folder: Path, cfg: dict) -> Adapter:
    """A PEFT LoRA folder → :class:`Adapter` (deltas scaled, float64)."""
    for flag, what in (("use_dora", "DoRA (a magnitude vector rescales W, not a low-rank delta)"),
                       ("lora_bias", "a LoRA bias (lora_bias=True)"),
                       ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style transposed weights)"),
                       ("layer_replication", "layer_replication"),
                       ("trainable_token_indices", "trainable token indices"),
                       ("target_parameters", "target_parameters (LoRA on raw parameters)")):
        if cfg.get(flag):
            raise Unsupported(f"{folder}: {what} cannot be folded into the low-rank branch")
    try:
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{folder / CONFIG}: needs an integer 'r' and a numeric 'lora_alpha' ({exc})") from exc
    rslora = bool(cfg.get("use_rslora", False))
    tensors, digest = _read_weights(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise Unsupported(f"{folder / WEIGHTS}: tensor {key!r} is not a LoRA factor (modules_to_save and "
                              "other full-module weights cannot be folded into a low-rank branch)")
        module = m["module"][len(PEFT_PREFIX):] if m["module"].startswith(PEFT_PREFIX) else m["module"]
        if m["which"] in parts.setdefault(module, {}):
            raise BadInput(f"{folder / WEIGHTS}: two lora_{m['which']} tensors for {module} (several adapter names?)")
        parts[module][m["which"]] = t
    if not parts:
        raise BadInput(f"{folder / WEIGHTS}: holds no LoRA tensors")
    deltas = {}
    for module, p in sorted(parts.items()):
        emb = "embedding_A" in p or "embedding_B" in p
        ka, kb = ("embedding_A", "embedding_B") if emb else ("A", "B")
        if set(p) != {ka, kb}:
            raise BadInput(f"{folder / WEIGHTS}: {module} needs both lora_{ka} and lora_{kb}, found {sorted(p)}")
        a, b = p[ka].double().numpy(), p[kb].double().numpy()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BadInput(f"{folder / WEIGHTS}: {module}: lora_{ka} {list(a.shape)} and lora_{kb} {list(b.shape)} "
                           "are not a LoRA pair (A: (r, in), B: (out, r))")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise BadInput(f"{folder / WEIGHTS}: {module}: non-finite values in the LoRA factors")
        rk = int(_pattern_value(cfg.get("rank_pattern"), module, r))
        if a.shape[0] != rk:
            raise BadInput(f"{folder / WEIGHTS}: {module} has rank {a.shape[0]}, the config says r = {rk}")
        al = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
        s = al / (np.sqrt(rk) if rslora else rk)
        if emb:  # ΔE (V, H) = s · (B A)ᵀ = (s Aᵀ) (Bᵀ),  A: (r, V), B: (H, r)
            deltas[module] = LowRankDelta(module, s * a.T, b.T.copy(), "embedding", s)
        else:  # ΔW (N, K) = (s B) A
            deltas[module] = LowRankDelta(module, s * b, a, "linear", s)
    return Adapter(folder, "LORA", r, alpha, rslora, deltas, digest)


READERS: dict[str, Callable[[Path, dict], Adapter]] = {"LORA": read_lora}


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder = Path(folder)
    cfg = _read_config(folder)
    kind = str(cfg.get("peft_type", "")).upper()
    reader = READERS.get(kind)
    if reader is None:
        raise Unsupported(f"{folder}: peft_type {cfg.get('peft_type')!r} cannot be folded; supported: {sorted(READERS)}")
    return reader(folder, cfg)


# ----------------------------------------------------------------------------- math
def balanced(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each rank-1 component of ``b (N, r) · a (r, K)`` so that column j of b and row j
    of a have equal norms; the product is unchanged (float16-friendly magnitudes)."""
    nb = np.linalg.norm(b, axis=0)
    na = np.linalg.norm(a, axis=1)
    d = np.ones_like(nb)
    ok = (nb > 0) & (na > 0)
    d[ok] = np.sqrt(nb[ok] / na[ok])
    return b / d, a * d[:, None]


def truncate_factored(l1: np.ndarray, l2: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Best rank-``rank`` approximation of ``l1 (N, r) · l2 (r, K)`` without forming the product.

    Returns ``(l1'' (N, R), l2'' (R, K), error, norm)``: ``error = ‖l1 l2 − l1'' l2''‖_F``
    (the discarded singular values) and ``norm = ‖l1 l2‖_F``, both exact in float64."""
    q1, r1 = np.linalg.qr(l1)  # (N, p), (p, r)
    q2, r2 = np.linalg.qr(l2.T)  # (K, q), (q, r)
    u, sv, vt = np.linalg.svd(r1 @ r2.T)  # core (p, q)
    keep = min(rank, int(sv.size))
    root = np.sqrt(sv[:keep])
    new1 = (q1 @ u[:, :keep]) * root
    new2 = (root[:, None] * vt[:keep]) @ q2.T
    return new1, new2, float(np.sqrt(np.sum(sv[keep:] ** 2))), float(np.sqrt(np.sum(sv ** 2)))


def product_distance(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> float:
    """``‖p1 p2 − q1 q2‖_F`` from the factors, never forming an (N, K) matrix: with
    F = [p1 | −q1] = Q_F R_F and Gᵀ = [p2 ; q2]ᵀ = Q_G R_G (thin QR), ‖F G‖_F = ‖R_F R_Gᵀ‖_F."""
    f = np.concatenate([p1, -q1], 1)
    g = np.concatenate([p2, q2], 0)
    if f.shape[1] == 0:
        return 0.0
    return float(np.linalg.norm(np.linalg.qr(f, mode="r") @ np.linalg.qr(g.T, mode="r").T))


# ----------------------------------------------------------------------------- folding
def resolve_target(module: str, candidates: dict[str, str]) -> str | None:
    """The checkpoint matrix a PEFT module path names: an exact match, or the unique candidate that
    is a dotted suffix of it (``bert.encoder.layer.0...`` when the adapter was trained on a
    wrapper model).  ``candidates``: name → kind."""
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


def _as_matrix(name: str, delta: LowRankDelta, tensors: dict[str, torch.Tensor]) -> MatrixEntry:
    """A plain stored weight becomes an fp matrix that can carry a low-rank branch."""
    w = tensors[f"{name}.weight"]
    fmt = {torch.float16: "fp16", torch.float32: "fp32"}.get(w.dtype)
    if fmt is None:
        raise Unsupported(f"{name}.weight: dtype {w.dtype} cannot carry a low-rank branch")
    return MatrixEntry(format=fmt, rank=0, shape=list(w.shape), error=0.0, bytes=0, kind=delta.kind)


def fold_adapters(manifest: Manifest, tensors: dict[str, torch.Tensor], adapters: list[Adapter],
                  rank: int | None = None, dtype: torch.dtype = torch.float16
                  ) -> tuple[Manifest, dict[str, torch.Tensor], dict]:
    """Fold ``adapters`` (in order) into the low-rank branches; optionally truncate every folded
    branch to ``rank``.  Returns the new ``(manifest, tensors, report)``; the inputs are not modified.

    Every target is checked (exists, same kind, same shape) before anything is folded."""
    if rank is not None and rank < 1:
        raise BadInput(f"--adapter-rank must be at least 1, not {rank}")
    if dtype not in (torch.float16, torch.float32):
        raise BadInput(f"low-rank factors are stored as float16 or float32, not {dtype}")
    man = copy.deepcopy(manifest)
    out = dict(tensors)
    targets = _targets(manifest, tensors)
    plan: list[tuple[Adapter, dict[str, LowRankDelta]]] = []
    for ad in adapters:
        mapped: dict[str, LowRankDelta] = {}
        for module, d in ad.deltas.items():
            name = resolve_target(module, targets)
            if name is None:
                some = ", ".join(sorted(n for n, k in targets.items() if k != "plain")[:4])
                raise BadInput(f"{ad.path}: target {module!r} is not a matrix of the checkpoint (e.g. {some}, ...)")
            kind = targets[name] if targets[name] != "plain" else d.kind
            if kind != d.kind:
                raise BadInput(f"{ad.path}: {module} is a LoRA on an {d.kind}, but {name} is a {kind} in the checkpoint")
            shape = tuple(man.matrices[name].shape) if name in man.matrices else tuple(tensors[f"{name}.weight"].shape)
            if d.shape != shape:
                raise BadInput(f"{ad.path}: {module}: the adapter's delta is {list(d.shape)}, the checkpoint's "
                               f"{name} is {list(shape)} (an adapter for another model?)")
            if name in mapped:
                raise BadInput(f"{ad.path}: two adapter modules map to {name}")
            smooth = tensors.get(f"{name}.{SMOOTH}")
            if smooth is not None:  # the layer computes on x / s: ΔW·diag(s) acts on it (smoothing.py)
                d = replace(d, a=d.a * smooth.double().numpy()[None, :])
            mapped[name] = d
        plan.append((ad, mapped))

    exact: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # float64 running branch of each folded matrix
    reports = []
    for ad, mapped in plan:
        num = den = 0.0
        for name, d in mapped.items():
            if name not in man.matrices:
                man.matrices[name] = _as_matrix(name, d, tensors)
            if name not in exact:
                l1, l2 = out.get(f"{name}.L1"), out.get(f"{name}.L2")
                exact[name] = ((l1.double().numpy(), l2.double().numpy()) if l1 is not None
                               else (np.zeros((d.shape[0], 0)), np.zeros((0, d.shape[1]))))
            b, a = balanced(d.b, d.a)
            b_st = torch.from_numpy(b).to(dtype)
            a_st = torch.from_numpy(a).to(dtype)
            if not (torch.isfinite(b_st).all() and torch.isfinite(a_st).all()):
                raise BadInput(f"{ad.path}: {d.module}: the scaled LoRA factors overflow {dtype}")
            old1, old2 = out.get(f"{name}.L1"), out.get(f"{name}.L2")
            new1 = b_st if old1 is None else torch.cat([old1.to(dtype), b_st], 1)
            new2 = a_st if old2 is None else torch.cat([old2.to(dtype), a_st], 0)
            out[f"{name}.L1"], out[f"{name}.L2"] = new1.contiguous(), new2.contiguous()
            e1, e2 = exact[name]
            exact[name] = (np.concatenate([e1, d.b], 1), np.concatenate([e2, d.a], 0))
            num += product_distance(b_st.double().numpy(), a_st.double().numpy(), d.b, d.a) ** 2
            den += product_distance(d.b, d.a, np.zeros((d.shape[0], 0)), np.zeros((0, d.shape[1]))) ** 2
        reports.append({"path": str(ad.path), "peft_type": ad.peft_type, "r": ad.r, "alpha": ad.alpha,
                        "use_rslora": ad.use_rslora, "matrices": len(mapped), "sha256": ad.sha256,
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

    for name in exact:
        e = man.matrices[name]
        e.rank = int(out[f"{name}.L1"].shape[1])
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
    report = {"adapters": reports, "matrices": sorted(exact), "dtype": str(dtype).replace("torch.", ""),
              "ranks": {n: man.matrices[n].rank for n in sorted(exact)},
              "branch_rel_error": float(total_err / total_norm) if total_norm > 0 else 0.0}
    if truncation is not None:
        report["adapter_rank"] = truncation
    return man, out, report


def export_with_adapters(checkpoint, output, adapter_dirs, rank: int | None = None, accuracy_level: int = 0,
                         dtype: torch.dtype = torch.float16) -> dict:
    """``quantseal export --adapter DIR ... [--adapter-rank R]``: fold the adapters into a
    temporary checkpoint beside ``output``, export it with :func:`quantseal.export.onnx.export_onnx`,
    remove it.  The export report gains ``adapters`` (the fold report)."""
    import shutil
    import tempfile
    import time

    from ..checkpoint import read_checkpoint, write_checkpoint
    from .onnx import _check_output, _make_parent, export_onnx

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    adapters = [read_adapter(d) for d in adapter_dirs]
    if not adapters:
        raise BadInput("no adapter given")
    manifest, tensors = read_checkpoint(checkpoint)
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
        res = export_onnx(work / "ck", output, accuracy_level=accuracy_level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["adapters"] = report
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res
