"""``quantseal inspect``: what a compressed checkpoint holds, matrix by matrix, in bytes."""

from __future__ import annotations

from pathlib import Path

from .errors import BadInput


def inspect_checkpoint(path: Path) -> dict:
    from . import checkpoint as ckpt  # torch: imported only for a checkpoint, not for an .onnx file

    manifest, tensors = ckpt.read_checkpoint(path)
    rows = []
    acts = manifest.extra.get("activations") or {}
    for name, e in manifest.matrices.items():
        n, k = e.shape
        stored = ckpt.entry_bytes(name, tensors)
        notes = ["3-bit codes stored in 4-bit slots (onnxruntime runs 2/4/8)"] if e.spec.bits == 3 else []
        act = acts.get(name)
        if act is not None:
            notes.append(f"A{act['bits']} static input, scale {act['scale']:.4g}, zero {act['zero_point']}")
        smooth = tensors.get(f"{name}.{ckpt.SMOOTH}")
        if smooth is not None:
            notes.append(f"input divided by CFP factors on {int((smooth != 1).sum())} channels")
        rows.append({"name": name, "kind": e.kind, "format": e.format, "rank": e.rank, "shape": [n, k],
                     "bytes": stored, "bits_per_param": stored * 8 / (n * k), "error": e.error,
                     "op": e.spec.onnx_op, "activation": act, "note": "; ".join(notes)})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    lines = [f"{path}: quantseal checkpoint (schema {manifest.schema_version}), method {manifest.method}, "
             f"source {manifest.source.get('model_type')} ({manifest.source.get('family')})",
             f"budget {manifest.budget.get('asked')} {manifest.budget.get('kind')}: "
             f"{manifest.budget.get('bits_per_param', 0):.4f} bits/param over compressible matrices, "
             f"{total / 1e6:.3f} MB of tensors",
             f"{'matrix':<48} {'format':<10} {'rank':>4} {'shape':>11} {'bytes':>9} {'bits/p':>7} {'error':>10}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<48} {r['format']:<10} {r['rank']:>4} {shape:>11} {r['bytes']:>9} "
                     f"{r['bits_per_param']:>7.3f} {r['error']:>10.3e}" + (f"  ({r['note']})" if r["note"] else ""))
    return {"path": str(path), "type": "checkpoint", "method": manifest.method, "budget": manifest.budget,
            "source": manifest.source, "tensor_bytes": total, "matrices": rows, "text": "\n".join(lines)}


def inspect_path(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        return inspect_checkpoint(path)
    if path.suffix == ".onnx" and path.is_file():
        from .export.inspect_onnx import inspect_onnx

        return inspect_onnx(path)
    raise BadInput(f"{path}: neither a quantseal checkpoint folder nor an .onnx file")
