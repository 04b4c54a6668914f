"""Several adapters in one ONNX file, chosen at run time by an ``adapter_id`` input (issue #13 §5).

``quantseal export CK --adapter A --adapter B --switchable`` keeps each adapter a separate
low-rank branch instead of folding it (folding stays the default).  For a compressed Linear
``y = OP(x, Q) + (x L2ᵀ) L1ᵀ`` (:mod:`..lowbit`) and adapters j = 1..J with branch factors
``b_j (N, r_j)``, ``a_j (r_j, K)`` (exactly the columns / rows the fold would append:
``b/o`` and ``a ⊙ s`` under a stored output scale o and input divisor s, balanced, stored as
float16 or float32; :func:`..fold.fold_adapters`):

    y(id) = OP(x, Q) + (x L2ᵀ) L1ᵀ + [id > 0] · (x · Aᵀ[id−1]) · Bᵀ[id−1]

``Aᵀ``: (J, K, R), ``Bᵀ``: (J, R, N), R = max_j r_j, zero-padded (an adapter that does not touch
the matrix has zeros there).  In ONNX: ``Gather(Aᵀ, max(id−1, 0))`` → (b', K, R), MatMul with
x (B, T, K) (batch dims broadcast: b' = 1 or B), Gather of Bᵀ, MatMul, Mul by the mask
``id > 0``, Add.  So each row pays one branch of rank R per matrix, whatever J is.

``adapter_id`` is int64, a scalar (one adapter for the whole batch) or shaped [batch] (one per
row); **0 is the base model** (no adapter), ``j`` the j-th ``--adapter`` given (a negative id is
the base too; an id above J makes onnxruntime's Gather fail: callers map names).  Its names, in id
order, are the metadata ``quantseal.adapters`` (JSON: ``[{"id", "name", "peft_type", "r",
"sha256", "matrices"}]``); :mod:`quantseal.runtime.pipelines` maps a name to its id.  A name is
``NAME=DIR`` on the command line, else the folder's name.

Only edits that are a low-rank ``b · a`` on a compressed Linear switch (LoRA, rsLoRA, patterns,
AdaLoRA, VeRA, LoHa, LoKr in its rank form, MiSS); a DoRA magnitude, an IA³ scale, a ``lora_bias``
or replaced biases, a token-embedding LoRA, or a target outside the plan are refused by name:
those change other tensors of the layer, which one shared graph cannot hold per adapter here.
Encoders and LLaMA-family decoders (built graph: a packed q/k/v MatMulNBits gets one branch whose
``Bᵀ`` is block-diagonal over q, k and v; ``--dtype fp16``, the CUDA graph, computes the branch in
float16, float16 factors read as stored).

**With a watermark** (``--board --key --registry --user``): the customer's mark is folded into
the token table (:func:`..watermark.mark_checkpoint`) and the base graph is exported from the
marked checkpoint; the branches are computed from the unmarked one (the same factors: marking
touches only the table and re-mixes ``L1``/``L2``, never an adapter's ``b``, ``a``).  Every
``adapter_id`` reads the same marked table, so the mark is in every branch.  An adapter that
edits the token table (a token-embedding LoRA) would be a second, per-adapter table; it is refused
above, by name, so no branch can bypass or overwrite the marked rows.  An adapter still changes
the function the mark is read through; before publishing, :func:`.mark_check.check_branches`
verifies the written file at every ``adapter_id`` and refuses the export, naming the adapter, if a
branch would not be traced to the customer.  A decoder's ``adapter_id`` is outside
onnxruntime-genai's input list, but its ``Generator.set_model_input("adapter_id", np.array(j))``
feeds it on every step (measured, onnxruntime-genai 0.18: the greedy tokens equal quantseal's
``CausalLM`` with that adapter), so a switchable decoder folder keeps its ``genai_config.json``; an
app that does not set it gets onnxruntime's "Missing Input: adapter_id", never a silent base model
(an ``adapter_id`` with a default initialiser is ignored by ``set_model_input``: tried).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ...errors import BadInput, Unsupported
from .base import Adapter

INPUT = "adapter_id"
METADATA = "quantseal.adapters"
NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")


def parse_adapter_args(args) -> list[tuple[str, Path]]:
    """``--adapter`` values → (name, folder): ``NAME=DIR`` when DIR is not itself a path that
    exists, else the folder's own name.  Names must be distinct and match ``[A-Za-z0-9._@+-]{1,64}``."""
    out = []
    for arg in args:
        s = str(arg)
        if "=" in s and not Path(s).exists():
            name, folder = s.split("=", 1)
        else:
            name, folder = Path(s).name, s
        if not NAME.match(name):
            raise BadInput(f"--adapter {s}: adapter name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ @ + -")
        if name in {n for n, _ in out}:
            raise BadInput(f"--adapter {s}: two adapters are named {name!r}; name them with NAME=DIR")
        out.append((name, Path(folder)))
    return out


# ----------------------------------------------------------------------------- factors
def branch_factors(manifest, tensors: dict[str, torch.Tensor], adapter: Adapter, dtype: torch.dtype
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The branch one adapter adds to each compressed Linear: matrix name → (b (N, r), a (r, K))
    in the storage dtype, taken from :func:`..fold.fold_adapters` on the base checkpoint alone, so
    each equals the factors a folded export of that adapter stores, bit for bit.  Refuses, by
    name, any edit other than a low-rank branch on a planned Linear (module docstring)."""
    from .fold import fold_adapters

    for d in adapter.deltas.values():
        d.kron = None  # LoKr: its rank form (a Kronecker branch is not switched)
        if d.kind != "linear":
            raise Unsupported(f"{adapter.path}: {d.module}: a token-embedding LoRA is not switchable (fold it instead)")
    man, out, report = fold_adapters(manifest, tensors, [adapter], dtype=dtype)
    edits = report["adapters"][0]["edits"]
    other = {k: v for k, v in edits.items() if k != "low_rank" and v}
    if other:
        raise Unsupported(f"{adapter.path}: a {adapter.peft_type} adapter with {', '.join(sorted(other))} edits is not "
                          "switchable (only low-rank branches are); fold it instead (export without --switchable)")
    plain = [n for n in report["matrices"] if n not in manifest.matrices]
    if plain:
        raise Unsupported(f"{adapter.path}: target {plain[0]} is not a compressed matrix of the checkpoint; "
                          "switchable branches attach to planned Linears only")
    branch = {f"{n}.{x}" for n in report["matrices"] for x in ("L1", "L2")}
    changed = [k for k in out if k not in branch and (k not in tensors or out[k] is not tensors[k])]
    if changed:
        raise Unsupported(f"{adapter.path}: the adapter changes {changed[0]}, which is not switchable")
    factors = {}
    for name in report["matrices"]:
        r0 = manifest.matrices[name].rank
        l1, l2 = out[f"{name}.L1"], out[f"{name}.L2"]
        factors[name] = (l1[:, r0:].numpy().copy(), l2[r0:].numpy().copy())
    return factors


def stack(per_adapter: list[tuple[np.ndarray, np.ndarray] | None], n: int, k: int, dtype
          ) -> tuple[np.ndarray, np.ndarray]:
    """``Aᵀ`` (J, K, R) and ``Bᵀ`` (J, R, N), zero-padded to the largest rank R; ``None`` slots
    (an adapter that leaves the matrix alone) are zeros."""
    rank = max(b.shape[1] for f in per_adapter if f is not None for b in f[:1])
    at = np.zeros((len(per_adapter), k, rank), dtype=dtype)
    bt = np.zeros((len(per_adapter), rank, n), dtype=dtype)
    for j, f in enumerate(per_adapter):
        if f is None:
            continue
        b, a = f
        at[j, :, :a.shape[0]] = a.T
        bt[j, :b.shape[1], :] = b.T
    return at, bt


# ----------------------------------------------------------------------------- graph
def _matrix_group(nodes, name: str, inits: set[str]) -> tuple[int, str]:
    """(index of the node that writes the matrix's output y, the input x) of a matrix rewritten by
    :func:`..lowbit.linear_nodes`: its intermediate values are all named ``<name>.…`` and y is
    the traced MatMul's output (module docstring of :mod:`..lowbit`)."""
    prefix = name + "."
    produced = {o for nd in nodes for o in nd.output if o.startswith(prefix)}
    group = [i for i, nd in enumerate(nodes) if any(o.startswith(prefix) for o in nd.output)
             or any(x.startswith(prefix) and (x in produced or x in inits) for x in nd.input)]
    finals = [i for i in group if not any(o.startswith(prefix) for o in nodes[i].output)]
    if len(finals) != 1:
        raise RuntimeError(f"{name}: cannot find its low-bit nodes in the graph ({len(finals)} outputs)")
    outside = {x for i in group for x in nodes[i].input
               if x and not x.startswith(prefix) and x not in inits and x not in produced}
    if len(outside) != 1:
        raise RuntimeError(f"{name}: its low-bit nodes read {sorted(outside)}, expected one input")
    return finals[0], outside.pop()


def pack_qkv(branches: dict[str, tuple[np.ndarray, np.ndarray]], shapes: dict[str, tuple[int, int]],
             initializers: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Branches of q/k/v projections that a decoder graph packed into one ``<attn>.qkv_proj``
    MatMulNBits (:func:`..decoder_graph.pack_rows`) become one branch on it: ``Aᵀ`` concatenated
    along the rank, ``Bᵀ`` block-diagonal, so its output is ``[y_q | y_k | y_v]``'s branch."""
    out, groups = {}, {}
    for name, st in branches.items():
        attn, proj = name.rsplit(".", 1)
        packed = f"{attn}.qkv_proj"
        if proj in ("q_proj", "k_proj", "v_proj") and f"{name}.qweight" not in initializers \
                and f"{packed}.qweight" in initializers:
            groups.setdefault(packed, {})[proj] = st
        else:
            out[name] = st
    for packed, parts in groups.items():
        attn = packed.rsplit(".", 1)[0]
        j, k, dtype = next(iter(parts.values()))[0].shape[0], next(iter(parts.values()))[0].shape[1], \
            next(iter(parts.values()))[0].dtype
        names = [f"{attn}.{p}_proj" for p in "qkv"]
        ranks = [parts[n.rsplit(".", 1)[1]][0].shape[2] if n.rsplit(".", 1)[1] in parts else 0 for n in names]
        rows = [shapes[n][0] for n in names]
        at = np.zeros((j, k, sum(ranks)), dtype=dtype)
        bt = np.zeros((j, sum(ranks), sum(rows)), dtype=dtype)
        r0 = n0 = 0
        for n, r, rw in zip(names, ranks, rows):
            if r:
                a_part, b_part = parts[n.rsplit(".", 1)[1]]
                at[:, :, r0:r0 + r] = a_part
                bt[:, r0:r0 + r, n0:n0 + rw] = b_part
            r0, n0 = r0 + r, n0 + rw
        out[packed] = (at, bt)
    return out


def add_switchable_branches(model: onnx.ModelProto, branches: dict[str, tuple[np.ndarray, np.ndarray]],
                            compute=np.float32) -> int:
    """Add, in place, the ``adapter_id`` input and each matrix's gathered branch (module
    docstring).  ``branches``: matrix name → (Aᵀ (J, K, R), Bᵀ (J, R, N)) float16/float32;
    ``compute``: the graph's activation dtype (float16: a decoder's ``--dtype fp16`` graph), the
    factors cast to it where stored otherwise.  Returns the bytes of the added initialisers."""
    compute = np.dtype(compute).type
    elem, tag = (TensorProto.FLOAT, ".f32") if compute == np.float32 else (TensorProto.FLOAT16, ".f16")
    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        raise BadInput(f"the graph already has an input {INPUT!r}")
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, None))  # scalar or [batch]
    inits = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    added: list[TensorProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        added.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs):
        return helper.make_node(op, inputs, [output], name=output + "/" + op, **attrs)

    pre = "adapter_switch."
    head = [
        node("Reshape", [INPUT, init(pre + "flat", np.array([-1], dtype=np.int64))], pre + "id"),
        node("Sub", [pre + "id", init(pre + "one", np.array(1, dtype=np.int64))], pre + "id_m1"),
        node("Max", [pre + "id_m1", init(pre + "zero", np.array(0, dtype=np.int64))], pre + "index"),
        node("Greater", [pre + "id", pre + "zero"], pre + "on_bool"),
        node("Cast", [pre + "on_bool"], pre + "on", to=elem),
        node("Reshape", [pre + "on", init(pre + "mask_shape", np.array([-1, 1, 1], dtype=np.int64))], pre + "mask"),
    ]
    after: dict[int, list] = {}
    for name, (at, bt) in sorted(branches.items()):
        i, x = _matrix_group(nodes, name, inits)
        y = nodes[i].output[0]
        nodes[i].output[0] = y + "/base"
        p = f"{name}.adapters"
        at_name, bt_name = init(p + ".AT", at), init(p + ".BT", bt)
        seq = [node("Gather", [at_name, pre + "index"], p + ".at", axis=0)]
        a_in = p + ".at"
        if at.dtype != compute:
            seq.append(node("Cast", [a_in], p + ".at" + tag, to=elem))
            a_in = p + ".at" + tag
        seq.append(node("Gather", [bt_name, pre + "index"], p + ".bt", axis=0))
        b_in = p + ".bt"
        if bt.dtype != compute:
            seq.append(node("Cast", [b_in], p + ".bt" + tag, to=elem))
            b_in = p + ".bt" + tag
        seq += [node("MatMul", [x, a_in], p + ".h"),
                node("MatMul", [p + ".h", b_in], p + ".d"),
                node("Mul", [p + ".d", pre + "mask"], p + ".y"),
                node("Add", [y + "/base", p + ".y"], y)]
        after[i] = seq
    new = list(head)
    for i, nd in enumerate(nodes):
        new.append(nd)
        new.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(new)
    graph.initializer.extend(added)
    return sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in added)


# ----------------------------------------------------------------------------- export
def export_switchable(checkpoint, output, adapter_args, accuracy_level: int = 0,
                      dtype: torch.dtype = torch.float16, mark: dict | None = None, compute: str = "fp32") -> dict:
    """``quantseal export CK -o OUT --adapter [NAME=]DIR ... --switchable``: the base export with
    one switchable branch per (matrix, adapter); written atomically like every export.  The
    report gains ``adapters`` (names, ids, ranks) and ``adapter_bytes``.  ``mark``: a customer's
    watermark, ``{"board": folder, "key": bytes, "registry": Registry, "customer": id, "seed":
    int | None}`` (module docstring); the report then has ``marked: True``.  ``compute``: the
    graph's dtype, ``fp32`` or (decoders, the CUDA graph) ``fp16``."""
    from ...checkpoint import read_checkpoint, write_checkpoint
    from ...models import ENCODER, family_of, read_config
    from ..onnx import _check_output, _make_parent, export_onnx, write_model
    from .read import read_adapter

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    named = parse_adapter_args(adapter_args)
    if not named:
        raise BadInput("--switchable needs at least one --adapter")
    if dtype not in (torch.float16, torch.float32):
        raise BadInput(f"switchable factors are stored as float16 or float32, not {dtype}")
    manifest, tensors = read_checkpoint(checkpoint)
    decoder = family_of(read_config(checkpoint)) is not ENCODER
    adapters = [read_adapter(d) for _, d in named]
    per = [branch_factors(manifest, tensors, ad, dtype) for ad in adapters]
    marked = None
    if mark is not None:
        from ...compress.markboard import load_board
        from ..watermark import mark_checkpoint

        board = load_board(mark["board"])
        marked = mark_checkpoint(manifest, tensors, board, mark["key"], mark["registry"], mark["customer"],
                                 seed=mark.get("seed"))
    del tensors
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    names = sorted({n for f in per for n in f})
    branches = {}
    for n in names:
        rows, cols = manifest.matrices[n].shape
        branches[n] = stack([f.get(n) for f in per], rows, cols, np_dtype)
    _make_parent(output)
    try:
        work = Path(tempfile.mkdtemp(prefix=".quantseal-switch.", dir=output.parent))
    except OSError as exc:
        raise BadInput(f"{output}: cannot write there ({exc.strerror})") from exc
    try:
        source = checkpoint
        if marked is not None:  # the base graph from the customer's marked checkpoint
            source = work / "ck"
            write_checkpoint(source, *marked, checkpoint)
            del marked
        base = export_onnx(source, work / "model.onnx", accuracy_level=accuracy_level, dtype=compute)
        proto = onnx.load(str(work / "model.onnx"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if decoder:  # the genai config stays: an app feeds Generator.set_model_input("adapter_id", id)
        branches = pack_qkv(branches, {n: tuple(e.shape) for n, e in manifest.matrices.items()},  # k untouched too
                            {t.name for t in proto.graph.initializer})
    extra = add_switchable_branches(proto, branches, np.float16 if compute == "fp16" else np.float32)
    info = [{"id": j + 1, "name": name, "peft_type": ad.peft_type, "r": ad.r, "sha256": ad.sha256,
             "matrices": len(f)} for j, ((name, _), ad, f) in enumerate(zip(named, adapters, per))]
    proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA, value=json.dumps(info, sort_keys=True)))
    checks = None
    if mark is not None:  # every branch must name the customer before the file is published
        from .mark_check import check_branches

        trial = Path(tempfile.mkdtemp(prefix=".quantseal-switch-check.", dir=output.parent))
        try:
            write_model(proto, trial / "model" / output.name, checkpoint / "tokenizer.json")
            checks = check_branches(trial / "model" / output.name, [n for n, _ in named], board, mark["key"],
                                    mark["registry"], mark["customer"])
        finally:
            shutil.rmtree(trial, ignore_errors=True)
    written = write_model(proto, output, checkpoint / "tokenizer.json")
    base.update({
        "path": str(output),
        "bytes": sum(p.stat().st_size for p in written if p.suffix in (".onnx", ".data")),
        "files": [str(p) for p in written],
        "ops": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "inputs": [i.name for i in proto.graph.input],
        "adapters": {"switchable": True, "input": INPUT, "adapters": info, "dtype": str(dtype).replace("torch.", ""),
                     "ranks": {n: int(st[0].shape[2]) for n, st in sorted(branches.items())},  # per graph branch
                     "matrices": names},
        "adapter_bytes": extra,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    if mark is not None:
        base.update(marked=True, mark_check=checks)
    return base

