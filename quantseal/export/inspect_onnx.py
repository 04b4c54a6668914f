"""``quantseal inspect MODEL.onnx``: what an ONNX file holds — ops by type, bytes, and each
low-bit matrix's format, rank and bytes.

Matrices are discovered from the graph itself (``MatMulNBits`` / ``MatMulBnb4`` /
``GatherBlockQuantized`` nodes and their ``<matrix>.qweight``-style initialisers), so files from
other exporters are described too; quantseal's own ``quantseal.matrices`` metadata adds the
floating-point matrices and the manifest's view.  Tensor data is never loaded (external data
included): sizes come from the initialisers' shapes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

from ..errors import BadInput
from .lowbit import STORED_SUFFIXES, initializer_bytes

LOWBIT_OPS = ("MatMulNBits", "MatMulBnb4", "GatherBlockQuantized")


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _matrix_name(weight_input: str) -> str:
    return weight_input[: -len(".qweight")] if weight_input.endswith(".qweight") else weight_input


def _node_format(node, n_inputs: int, offsets: bool = False) -> str:
    """The quantseal format name a low-bit node runs (``int4_b32``, ``int8s_b64``, ``nf4_b64``;
    ``int4f_b32`` when the matrix has stored float ``offsets``)."""
    a = _attrs(node)
    if node.op_type == "MatMulBnb4":
        return f"{'nf4' if a.get('quant_type', 1) == 1 else 'fp4'}_b{a['block_size']}"
    if offsets:
        return f"int{a.get('bits', 4)}f_b{a['block_size']}"
    sym = "" if n_inputs > 3 and node.input[3] else "s"
    return f"int{a.get('bits', 4)}{sym}_b{a['block_size']}"


def inspect_onnx(path: str | Path) -> dict:
    """``{"path", "type": "onnx", "bytes", "initializer_bytes", "ops", "matrices", "metadata", "text"}``."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadInput(f"{path}: not a readable ONNX file ({type(exc).__name__})") from exc
    graph = model.graph
    if not graph.node or not model.opset_import:  # an empty file parses as an empty ModelProto
        raise BadInput(f"{path}: not an ONNX model (no graph{'; 0 bytes' if path.stat().st_size == 0 else ''})")
    inits = {t.name: t for t in graph.initializer}
    ops = Counter(n.op_type for n in graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    planned = {}
    if "quantseal.matrices" in meta:
        try:
            planned = json.loads(meta["quantseal.matrices"])
        except json.JSONDecodeError:
            planned = {}

    def own_bytes(name: str) -> int:
        return initializer_bytes([inits[name + s] for s in STORED_SUFFIXES if name + s in inits])

    def rank_of(name: str) -> int:
        l1 = inits.get(name + ".L1")
        return int(l1.dims[1]) if l1 is not None and len(l1.dims) == 2 else 0

    producer = {o: n for n in graph.node for o in n.output}
    rows: dict[str, dict] = {}
    for node in graph.node:
        if node.op_type not in LOWBIT_OPS:
            continue
        a = _attrs(node)
        if node.op_type == "GatherBlockQuantized":
            data = node.input[0]
            if data in producer and producer[data].op_type == "Reshape":  # a tied table's codes, shared with its head
                data = producer[data].input[0]
            name = _matrix_name(data)
            if name in rows:  # the head's MatMulNBits came first: one matrix, two readers
                rows[name]["op"] = "MatMulNBits+GatherBlockQuantized"
                rows[name]["shape"] = list(planned.get(name, {}).get("shape", [])) or rows[name]["shape"]
                continue
            scales = inits.get(name + ".scales")
            guess = [int(scales.dims[0]), int(scales.dims[1]) * a["block_size"]] if scales is not None else []
            shape = list(planned.get(name, {}).get("shape", [])) or guess  # (V, H); H rounded up to blocks
            fmt = _node_format(node, len(node.input), name + ".offsets" in inits)
        else:
            name = _matrix_name(node.input[1])
            shape = [a.get("N"), a.get("K")]
            fmt = _node_format(node, len(node.input), name + ".offsets" in inits)
            if name in rows:  # a tied head over the lookup's codes, or a second pass over the same codes (X-LoRA)
                if rows[name]["op"] == "GatherBlockQuantized":
                    rows[name]["op"] = "MatMulNBits+GatherBlockQuantized"
                continue
        rows[name] = {"name": name, "op": node.op_type, "format": fmt, "rank": rank_of(name), "shape": shape,
                      "bytes": own_bytes(name)}
    for name, p in planned.items():  # q/k/v packed into one MatMulNBits (rows concatenated)
        packed = rows.get(name.rsplit(".", 1)[0] + ".qkv_proj") if name.endswith(("q_proj", "k_proj", "v_proj")) else None
        if packed is not None and name not in rows:
            rows[name] = {"name": name, "op": "MatMulNBits (packed qkv)", "format": p.get("format"), "rank": 0,
                          "shape": p.get("shape"), "bytes": p.get("bytes")}
    for name in [n for n in rows if n.endswith(".qkv_proj") and n not in planned]:
        del rows[name]  # listed as its three matrices
    for name, p in planned.items():  # floating-point matrices are plain MatMul / Gather in the graph
        if name not in rows:
            rows[name] = {"name": name, "op": "Gather" if p.get("kind") == "embedding" else "MatMul",
                          "format": p.get("format"), "rank": rank_of(name), "shape": p.get("shape"),
                          "bytes": own_bytes(name)}
    for r in rows.values():
        n, k = (r["shape"] + [0, 0])[:2] if r["shape"] else (0, 0)
        r["bits_per_param"] = r["bytes"] * 8 / (n * k) if n and k else None
        if name_planned := planned.get(r["name"]):
            r["manifest_bytes"] = name_planned.get("bytes")
    file_bytes = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in _external_files(model, path))
    total_init = initializer_bytes(list(graph.initializer))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    lines = [f"{path}: ONNX (opset {opsets}), "
             f"producer {model.producer_name or '?'} {model.producer_version}",
             f"{file_bytes / 1e6:.3f} MB on disk, {total_init / 1e6:.3f} MB of initialisers, {len(graph.node)} nodes"
             + (f", family {meta['quantseal.family']}" if "quantseal.family" in meta else ""),
             "ops: " + ", ".join(f"{op} {c}" for op, c in sorted(ops.items(), key=lambda x: (-x[1], x[0])))]
    if rows:
        lines.append(f"{'matrix':<48} {'op':<32} {'format':<10} {'rank':>4} {'shape':>11} {'bytes':>9} {'bits/p':>7}")
        for r in rows.values():
            shape = "x".join(map(str, r["shape"])) if r["shape"] else "?"
            bpp = f"{r['bits_per_param']:.3f}" if r["bits_per_param"] else "?"
            lines.append(f"{r['name']:<48} {r['op']:<32} {r['format']:<10} {r['rank']:>4} {shape:>11} {r['bytes']:>9} {bpp:>7}")
    return {"path": str(path), "type": "onnx", "bytes": file_bytes, "initializer_bytes": total_init,
            "nodes": len(graph.node), "ops": dict(sorted(ops.items())), "matrices": list(rows.values()),
            "metadata": meta, "text": "\n".join(lines)}


def _external_files(model: onnx.ModelProto, path: Path) -> set[str]:
    """Relative locations of external-data files the model names (that exist)."""
    locs = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and (path.parent / e.value).is_file():
                    locs.add(e.value)
    return locs
