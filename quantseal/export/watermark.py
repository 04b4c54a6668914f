"""Make a customer's marked checkpoint tensors: select, fold, obfuscate (Hot-Swap MarkBoard, DESIGN §5).

1. **Select**: the customer's codeword ``s`` (from the registry) picks branch ``C_{s_i}`` of every
   bit ``i``; the key re-derives which embedding rows ``T_i`` the bit owns.
2. **Fold**.  ``B = Σ_i onehot(T_i) · C_{s_i}[T_i]`` (V, R) holds the chosen coefficient rows on
   the trigger tokens only; the mark is ``B · A``.

   * A **float** table (fp16 / fp32, the usual case: ``--budget`` leaves the embedding out of
     the plan) takes the mark into the table itself, ``E' = E + B · A`` (only the trigger rows
     change, rounded to the table's dtype).  It is *not* put in a low-rank branch: whatever
     mixing hides the factors, anyone can multiply them back, and the row space of the
     product is span(A), the only directions the mark moves a row along.  Measured
     (``benchmarks/watermark_minilm.py``, the earlier design with a branch ``[L1 | B + P]``
     and a dense compensated carrier ``E − P·A``): removing the span(L2) component of the 128
     rows of ``E' + L1 L2`` that project most onto it hit all 128 trigger rows and erased the
     mark (23 of 64 bits wrong) at no fidelity cost.  Folded into the table, the mark has no
     subspace to give it away.
   * A **quantised** table (``--budget-mb`` puts the embedding in the plan) takes it the same
     way: the trigger rows of ``dequant(Q) + B · A`` are requantised in the table's own format
     (blocks run along a row, so every other row keeps its codes and scales bit for bit); the
     mark then carries that format's rounding error (:func:`requantised_rows`).

3. **Obfuscate** every low-rank pair of the checkpoint (marked or not): with a fresh random
   invertible ``M`` (r, r) and the thin QR ``L1' M = Q U``,

       L1'' = Q · D,   L2'' = D⁻¹ · U · M⁻¹ · L2',   D = diag(sqrt(‖row_j(U M⁻¹ L2')‖)),

   so ``L1'' L2'' = L1' L2'`` (up to float16 rounding), the column/row norms of the two factors are
   balanced for float16, and no two customers share a low-rank tensor.  ``M`` comes from the OS
   CSPRNG unless a ``seed`` is given (tests, reproducible builds).

The output holds no key, codeword, trigger or customer id: only weights and the manifest's
shapes, ranks and byte counts.

Decoders (LLaMA family, a board from :mod:`quantseal.compress.markboard_decoder`) are marked in
one of two layouts, the board's ``mark_side`` (:func:`mark_side`; ``board train --mark-side``):

* ``tied`` (every board written before the field existed): as above, into the table.  With a tied
  LM head the head reads the same marked table ``E' (+ L1'' L2'')`` (:mod:`quantseal.export.decoder`),
  so the vocab × hidden table is still stored once; the template swap replaces ``E'`` (and any
  ``L1``, ``L2``) for the lookup and the head at once.  A tied model's checkpoint stores no
  ``lm_head.weight`` (it is the table).
* ``input`` (the default for a tied head since issue 10's drift finding): the table's codes stay
  the unmarked ones for the lookup *and* the head, and the lookup adds a correction,
  ``rows += mark_delta[mark_slots[input_ids]]`` (:func:`input_mark_tensors`; ``mark_slots`` (V,)
  int32, 0 = unmarked, ``mark_delta`` (1 + n·k, H) float32 with row 0 zero and row j the
  customer's ``C_s[T_j] · A``).  A marked row is then ``float32(dequant(Q)[t]) + float32(ΔE[t])``,
  what the board trained (up to float32 rounding of ``C · A``; a quantised table's mark carries no
  requantisation error), and every other token gets exactly ``+0.0``.  Cost: 4·V + 4·(1 + n·k)·H
  bytes (SmolLM2, V = 49152, H = 576, 64 bits × 2 tokens: 196,608 + 299,520 bytes, ~0.5 MB);
  the template swap rewrites the delta rows (and the slots) only.

**The trade-off, plainly.**  ``tied`` moves the head: every trigger token's logit changes by
``h · ΔE[t]`` on *every* input, and on SmolLM2 a marked export's free generation drifted into
trigger words (onnxruntime-genai, 2 of 3 chat prompts, both readouts) while verify still named the
customer; what it buys is concealment: the marked rows are ordinary rows of the one table, so a
thief holding one file cannot tell which rows (and so which trigger tokens) carry the mark.
``input`` leaves the head alone: on any text without trigger tokens the logits are bit-identical
to the unmarked export's, and greedy answers equal it; but one file shows which 64–128 rows carry
a correction (the nonzero ``mark_slots``), so a thief who edits the graph (drops the ``Add``, or
zeroes ``mark_delta``) strips the mark at no cost to quality.  Choose ``input`` where generation
quality matters and the file is not expected to be edited; ``tied`` where a graph-editing thief is
the threat and the drift is acceptable (or fixed by a better-trained board).
"""

from __future__ import annotations

import copy
import json
import secrets

import numpy as np
import torch

from .. import keys as qkeys
from ..checkpoint import Manifest, MatrixEntry, budget_after_edit, entry_bytes, matrix_tensors, stored_quantized
from ..compress.quantizers import QuantizedTensor, dequantize, quantize
from ..compress.markboard import Board, tensors_fingerprint, triggers_of
from ..errors import BadInput
from .decoder_graph import MARK_DELTA, MARK_SLOTS


def _mixing(rng: np.random.Generator, r: int) -> np.ndarray:
    """A random, well-conditioned invertible (r, r) matrix: Q₁ · diag(e^{u}) · Q₂, u ~ U(−½, ½)."""
    q1 = np.linalg.qr(rng.standard_normal((r, r)))[0]
    q2 = np.linalg.qr(rng.standard_normal((r, r)))[0]
    return q1 @ np.diag(np.exp(rng.uniform(-0.5, 0.5, r))) @ q2


def obfuscate_pair(l1: np.ndarray, l2: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(L1 (N, r), L2 (r, K)) → a fresh factorisation of the same product, float64.

    Exact in exact arithmetic: L1'' L2'' = L1 M M⁻¹ L2 = L1 L2."""
    r = l1.shape[1]
    m = _mixing(rng, r)
    q, u = np.linalg.qr(l1 @ m)  # (N, r), (r, r)
    rest = u @ np.linalg.solve(m, l2)  # U M⁻¹ L2
    d = np.sqrt(np.maximum(np.linalg.norm(rest, axis=1), 1e-30))
    return q * d, rest / d[:, None]


def requantised_rows(name: str, entry: MatrixEntry, tensors: dict[str, torch.Tensor], rows: torch.Tensor,
                     delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored code tensors of a quantised matrix whose ``rows`` are replaced by the
    requantisation of ``dequant(Q)[rows] + delta`` in the matrix's own format (MSE clip search,
    as compression did); every other row keeps its codes, scales and zero points."""
    spec = entry.spec
    qt = stored_quantized(name, entry, tensors)
    zeros = None if qt.zeros is None else qt.zeros[rows]
    offsets = None if qt.offsets is None else qt.offsets[rows]
    part = QuantizedTensor(qt.codes[rows], qt.scales[rows], zeros, (len(rows), qt.shape[1]), spec, offsets)
    new = quantize(dequantize(part) + delta.float(), spec)
    codes, scales = qt.codes.clone(), qt.scales.clone()
    codes[rows], scales[rows] = new.codes, new.scales
    if qt.zeros is not None:
        zeros = qt.zeros.clone()
        zeros[rows] = new.zeros
    if qt.offsets is not None:  # int4f: each requantised row gets its own float block offsets (ŵ = s·q + m)
        offsets = qt.offsets.clone()
        offsets[rows] = new.offsets
    return matrix_tensors(name, spec, QuantizedTensor(codes, scales, zeros, qt.shape, spec, offsets), None, None, None)


MARK_SIDES = ("tied", "input")


def mark_side(board_manifest: dict) -> str:
    """Where a board's customer mark goes (module docstring): ``"tied"`` (folded into the token
    table; a board without the field, from before it existed) or ``"input"`` (a lookup-side
    correction beside an unmarked table)."""
    side = board_manifest.get("mark_side", "tied")
    if side not in MARK_SIDES:
        raise BadInput(f"the board's mark_side is {side!r}; this quantseal knows {', '.join(MARK_SIDES)}")
    return side


def input_mark_tensors(name: str, manifest: Manifest, tensors: dict[str, torch.Tensor], tokens: np.ndarray,
                       delta: np.ndarray, hidden: int) -> dict[str, torch.Tensor]:
    """The input-side mark of table ``name`` (vocab V): ``{name}.mark_slots`` (V,) int32 with
    ``slots[tokens[j]] = j + 1`` and 0 elsewhere, and ``{name}.mark_delta`` (1 + len(tokens), H)
    float32 with row 0 zero and row ``j + 1 = delta[j]`` (``delta``: (n·k, H) float64, the
    customer's ``C_s[T] · A``).  The graph adds ``mark_delta[mark_slots[ids]]`` to the looked-up
    rows (:meth:`~quantseal.export.decoder_graph.DecoderGraph.embedding`), so a marked row is
    ``float32(dequant(Q)[t]) + float32(ΔE[t])``, what the board trained
    (:class:`~quantseal.compress.markboard_decoder._DecoderProbe` adds float32 ``C·A`` to the float32
    table row), and every other token gets exactly ``+0.0``."""
    if name in manifest.matrices:
        vocab, width = manifest.matrices[name].shape
    elif f"{name}.weight" in tensors:
        vocab, width = tensors[f"{name}.weight"].shape
    else:
        raise BadInput(f"{name}.weight: not in the checkpoint")
    tokens = np.asarray(tokens, dtype=np.int64)
    if width != hidden or vocab < int(tokens.max()) + 1 or delta.shape != (len(tokens), hidden):
        raise BadInput(f"{name}: shape {[vocab, width]} does not match the board")
    if len(np.unique(tokens)) != len(tokens):
        raise BadInput(f"{name}: the board's trigger tokens repeat; one correction row per token is needed")
    slots = np.zeros(vocab, dtype=np.int32)
    slots[tokens] = np.arange(1, len(tokens) + 1, dtype=np.int32)
    rows = np.zeros((len(tokens) + 1, hidden), dtype=np.float32)
    rows[1:] = delta.astype(np.float32)
    return {f"{name}.{MARK_SLOTS}": torch.from_numpy(slots), f"{name}.{MARK_DELTA}": torch.from_numpy(rows)}


def _fold_into_table(name: str, man: Manifest, tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                     trig: np.ndarray, delta: np.ndarray, hidden: int) -> None:
    """The ``tied`` layout (module docstring): ``E'[T] = E[T] + ΔE`` in ``out`` (``delta``: (n·k, H)
    float64), a float table rounded to its dtype, a quantised one requantised in its format; ``man``'s
    table entry (created for a table kept as a plain tensor) gets the new bytes."""
    weight_key = f"{name}.weight"
    if name in man.matrices:
        entry = man.matrices[name]
        if entry.kind != "embedding":
            raise BadInput(f"{name}: the board marks an embedding, the checkpoint holds a {entry.kind}")
    else:  # the embedding was kept as a plain tensor: it becomes an fp matrix (a tied head reads it)
        if weight_key not in tensors:
            raise BadInput(f"{weight_key}: not in the checkpoint")
        w = tensors[weight_key]
        fmt = {torch.float16: "fp16", torch.float32: "fp32"}.get(w.dtype)
        if fmt is None:
            raise BadInput(f"{weight_key}: dtype {w.dtype} cannot carry the mark")
        entry = MatrixEntry(format=fmt, rank=0, shape=list(w.shape), error=0.0, bytes=0, kind="embedding")
        man.matrices[name] = entry
    vocab, width = entry.shape
    if width != hidden or vocab < int(trig.max()) + 1:
        raise BadInput(f"{name}: shape {entry.shape} does not match the board")
    rows = torch.from_numpy(np.asarray(trig, dtype=np.int64))
    if entry.format in ("fp16", "fp32"):  # into the float table itself
        w = tensors[weight_key]
        marked = w.clone()
        marked[rows] = (w[rows].double() + torch.from_numpy(delta)).to(w.dtype)
        out[weight_key] = marked.contiguous()
    else:  # a quantised table: its trigger rows requantised
        out.update(requantised_rows(name, entry, tensors, rows, torch.from_numpy(delta)))
    entry.bytes = entry_bytes(name, out)


def mark_checkpoint(manifest: Manifest, tensors: dict[str, torch.Tensor], board: Board, key: bytes,
                    registry: qkeys.Registry, customer: str, *, tokenizer=None,
                    seed: int | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The customer's marked (manifest, tensors); the inputs are not modified.

    ``tokenizer``: the model's :class:`~quantseal.text.TextTokenizer` (default: the board's copy).
    ``seed``: None for a fresh OS-random obfuscation; an int for reproducible bytes."""
    if board.manifest.get("source_fingerprint") != tensors_fingerprint(tensors):
        raise BadInput("the board was trained on another checkpoint; train a board for this one")
    if registry.bits != board.manifest["bits"]:
        raise BadInput(f"registry codewords have {registry.bits} bits, the board {board.manifest['bits']}")
    ts = triggers_of(board.manifest, key, tokenizer if tokenizer is not None else board.tokenizer())
    code = registry.codeword(customer)
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(secrets.token_bytes(32), "big"))

    name = board.layer
    out = dict(tensors)
    man = copy.deepcopy(manifest)
    trig = ts.tokens.reshape(-1)
    # the chosen coefficient rows (on the trigger tokens only) times A: ΔE[T] (n·k, H)
    delta = board.branch_rows(code).double().numpy() @ board.tensors["A"].double().numpy()
    if mark_side(board.manifest) == "input":  # the table (lookup and head) stays unmarked
        if board.manifest.get("family") != "decoder":
            raise BadInput("the board marks the input side (mark_side input), which only a decoder export carries")
        out.update(input_mark_tensors(name, manifest, tensors, trig, delta, board.manifest["hidden"]))
    else:
        _fold_into_table(name, man, tensors, out, trig, delta, board.manifest["hidden"])

    for mname, e in man.matrices.items():
        k1, k2 = f"{mname}.L1", f"{mname}.L2"
        if k1 not in out:
            continue
        x1 = out[k1] if isinstance(out[k1], np.ndarray) else out[k1].double().numpy()
        x2 = out[k2] if isinstance(out[k2], np.ndarray) else out[k2].double().numpy()
        y1, y2 = obfuscate_pair(x1, x2, rng)
        out[k1] = torch.from_numpy(y1).to(torch.float16).contiguous()
        out[k2] = torch.from_numpy(y2).to(torch.float16).contiguous()
        e.rank = int(y1.shape[1])
        e.bytes = entry_bytes(mname, out)
    man.budget = budget_after_edit(man.budget, tensors, out)
    return man, out


def template_path(board_path, board_manifest: dict, accuracy_level: int = 0):
    """Where :func:`export_marked` keeps the ONNX template of a (checkpoint, board) pair:
    ``<board>/templates/<fingerprint[:16]>-a<accuracy level>.onnx``."""
    from pathlib import Path

    return Path(board_path) / "templates" / f"{board_manifest['source_fingerprint'][:16]}-a{accuracy_level}.onnx"


def export_marked(checkpoint, output, board_path, key: bytes, registry: qkeys.Registry, customer: str,
                  accuracy_level: int = 0, seed: int | None = None) -> dict:
    """``quantseal export --board``: mark the checkpoint for ``customer`` and write its ONNX file.

    Every customer's graph is the same but for the low-rank initialisers, so the first marked
    export of a (checkpoint, board) pair traces the model (:func:`quantseal.export.onnx.export_onnx`)
    and keeps that file as a template in the owner-side board folder
    (``templates/<fingerprint>-a<accuracy level>.onnx``); later customers are written from it by
    :func:`swap_into_template` in seconds.  The report adds ``mark_seconds`` and ``path_taken``
    (``"traced"`` or ``"template"``)."""
    import shutil
    import tempfile
    import time
    from collections import Counter
    from pathlib import Path

    import onnx

    from ..checkpoint import read_checkpoint, write_checkpoint
    from ..compress.markboard import load_board
    from .onnx import TOKENIZER, _check_output, _make_parent, export_onnx

    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    board = load_board(board_path)
    manifest, tensors = read_checkpoint(checkpoint)
    marked = mark_checkpoint(manifest, tensors, board, key, registry, customer, seed=seed)
    template = template_path(board_path, board.manifest, accuracy_level)
    del tensors
    mark_seconds = time.perf_counter() - t0
    _make_parent(output)
    if template.is_file():
        try:
            written = swap_into_template(template, output, *marked, tokenizer=checkpoint / TOKENIZER)
        except BadInput:
            written = None  # a stale or foreign template: trace instead (and replace it below)
        if written:
            proto = onnx.load(str(output), load_external_data=False)
            return {"path": str(output), "bytes": sum(p.stat().st_size for p in written if p.suffix in (".onnx", ".data")),
                    "files": [str(p) for p in written], "matrices": len(marked[0].matrices),
                    "matrix_bytes": sum(e.bytes for e in marked[0].matrices.values()),
                    "formats": dict(Counter(e.format for e in marked[0].matrices.values())),
                    "ops": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
                    "mark_seconds": round(mark_seconds, 3), "marked": True, "path_taken": "template",
                    "seconds": round(time.perf_counter() - t0, 3)}
    work = Path(tempfile.mkdtemp(prefix=".quantseal-mark.", dir=output.parent))
    try:
        write_checkpoint(work / "ck", *marked, checkpoint)
        res = export_onnx(work / "ck", output, accuracy_level=accuracy_level)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    template.parent.mkdir(parents=True, exist_ok=True)
    tmp = template.with_name(template.name + ".tmp")
    shutil.copyfile(output, tmp)
    tmp.replace(template)
    res["mark_seconds"] = round(mark_seconds, 3)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["marked"] = True
    res["path_taken"] = "traced"
    return res


def swap_into_template(template, output, manifest: Manifest, tensors: dict[str, torch.Tensor],
                       tokenizer=None) -> list:
    """Write a customer's ONNX file in seconds from ``template``, a file exported (by
    :func:`export_marked`) from the same checkpoint and board for any other customer: every
    customer's graph is the same but for the low-rank initialisers ``NAME.L1`` / ``NAME.L2`` and
    the marked embedding tables (``NAME.weight``, or a quantised table's code tensors), which the exporter stores
    as-is; those are replaced by ``tensors``' (a :func:`mark_checkpoint` result).  The template must fit exactly (same names, shapes, dtypes, ranks and the same
    quantised matrices), else :class:`BadInput`."""
    from pathlib import Path

    import onnx
    from onnx import numpy_helper

    from .lowbit import STORED_SUFFIXES, StoredMatrix, embedding_nodes
    from .onnx import _make_parent, write_model

    template, output = Path(template), Path(output)
    if not template.is_file():
        raise BadInput(f"{template}: no such ONNX template")
    try:
        proto = onnx.load(str(template))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BadInput(f"{template}: not an ONNX model ({type(exc).__name__})") from exc
    inits = {i.name: i for i in proto.graph.initializer}
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        mats = json.loads(meta.get("quantseal.matrices", "{}"))
    except json.JSONDecodeError:
        mats = {}
    for name, e in manifest.matrices.items():
        m = mats.get(name, {})
        if (m.get("format"), m.get("rank"), m.get("shape"), m.get("bytes")) != (e.format, e.rank, e.shape, e.bytes):
            raise BadInput(f"{template}: {name} differs from the marked checkpoint; not a template for it")
    lowrank = [k for k in tensors if k.endswith((".L1", ".L2"))]
    if sorted(lowrank) != sorted(k for k in inits if k.endswith((".L1", ".L2"))):
        raise BadInput(f"{template}: its low-rank initialisers differ from the marked checkpoint's")
    marked = {n for n, e in manifest.matrices.items() if e.kind == "embedding"}  # the tables that carry the mark
    for k, t in tensors.items():  # the frozen part must be the same checkpoint's
        if k.endswith(".scales") and k in inits and k.removesuffix(".scales") not in marked:
            if numpy_helper.to_array(inits[k]).tobytes() != t.numpy().tobytes():
                raise BadInput(f"{template}: {k} differs; exported from another checkpoint")
    new = {k: tensors[k].numpy() for k in lowrank}
    mark_io = sorted(k for k in tensors if k.endswith((f".{MARK_SLOTS}", f".{MARK_DELTA}")))
    if mark_io != sorted(k for k in inits if k.endswith((f".{MARK_SLOTS}", f".{MARK_DELTA}"))):
        raise BadInput(f"{template}: its input-side mark tensors differ from the marked checkpoint's (another mark_side)")
    new.update({k: tensors[k].numpy() for k in mark_io})
    for n in marked:
        e = manifest.matrices[n]
        if e.format in ("fp16", "fp32"):
            if f"{n}.weight" in inits:
                new[f"{n}.weight"] = tensors[f"{n}.weight"].numpy()
            continue
        # a quantised table: its initialisers exactly as the exporter lays them out
        arrays = {s[1:]: tensors[n + s].numpy() for s in STORED_SUFFIXES if n + s in tensors}
        for init in embedding_nodes(StoredMatrix(n, e.spec, tuple(e.shape), arrays), "ids", "y").initializers:
            if init.name in inits and not init.name.endswith((".L1", ".L2")):
                new[init.name] = numpy_helper.to_array(init)
    for k, arr in new.items():
        old = inits[k]
        if k.endswith(".qweight") and arr.size == int(np.prod(old.dims)):
            arr = arr.reshape(tuple(old.dims))  # a tied decoder table keeps MatMulNBits' 3-D codes
        if list(old.dims) != list(arr.shape) or old.data_type != onnx.helper.np_dtype_to_tensor_dtype(arr.dtype):
            raise BadInput(f"{template}: initialiser {k} has another shape or dtype")
        old.CopyFrom(numpy_helper.from_array(arr, k))
    _make_parent(output)
    return write_model(proto, output, None if tokenizer is None else Path(tokenizer))
