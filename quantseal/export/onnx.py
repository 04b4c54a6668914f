"""Compressed checkpoint → one ONNX file that plain onnxruntime runs with the weights kept low-bit.

Encoders (BERT family): inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
dynamic batch × sequence), output ``sentence_embedding`` (B, D): pooling over the mask and
normalisation inside the graph as the source's sentence-transformers files say (mean + L2 by
default; :mod:`quantseal.sbert`), recorded with ``max_seq_length`` in the metadata (DESIGN §5).
Decoders (LLaMA family) go through :mod:`.decoder` (logits + KV cache), which reuses steps 2–3 below.

How:

1. :func:`~quantseal.checkpoint.load_compressed` gives the torch model; each
   ``CompressedLinear`` is swapped for a plain ``nn.Linear`` holding its effective weight
   ``W_hat + L1 L2`` (and a planned embedding for an ``nn.Embedding``), then the legacy
   TorchScript exporter (``dynamo=False``) writes a float graph with the pooling baked in;
2. every ``MatMul`` whose constant right operand is, byte for byte, the transposed effective
   weight of a planned matrix (and the ``Gather`` over the planned embedding) is rewritten into the
   low-bit nodes of :mod:`.lowbit`, which read the checkpoint's stored tensors unchanged, so each
   matrix's initialisers total exactly its manifest ``bytes``;
3. metadata (``quantseal.*``) is added and the file is written atomically next to a copy of the
   checkpoint's ``tokenizer.json``; files over 2 GB keep their tensors in ``<name>.data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import __version__
from .. import checkpoint as ckpt
from ..errors import BadInput, Unsupported
from ..sbert import Conventions, convention_files, read_conventions
from .lowbit import MS_DOMAIN, OPSET, STORED_SUFFIXES, StoredMatrix, embedding_nodes, initializer_bytes, linear_nodes

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
QDQ_OPSET = 21  # QuantizeLinear / DequantizeLinear with uint4
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph
TOKENIZER = "tokenizer.json"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def stored_matrices(manifest: ckpt.Manifest, tensors: dict) -> dict[str, StoredMatrix]:
    """The checkpoint's planned matrices with their stored tensors as numpy arrays."""
    out = {}
    for name, e in manifest.matrices.items():
        arrays = {s[1:]: tensors[name + s].numpy() for s in STORED_SUFFIXES if name + s in tensors}
        out[name] = StoredMatrix(name, e.spec, tuple(e.shape), arrays)
    return out


# ----------------------------------------------------------------------------- torch side
def float_effective(model) -> dict[str, str]:
    """Swap, in place, compressed modules for plain ones holding their effective weights.

    Returns ``{sha256 of the constant the exporter will write: matrix name}``: a Linear's MatMul
    constant is ``Wᵀ`` (K, N), an Embedding's Gather table is ``E`` (V, H)."""
    import torch
    from torch import nn

    from ..compress.qlinear import CompressedEmbedding, CompressedLinear, OutputScaledLinear, set_submodule
    from ..compress.smoothing import attach_input_smoothing, has_input_smoothing, input_smoothing

    digests: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear):
            w = mod.effective_weight()
            if mod.output_scale is not None:  # traced as Mul(MatMul(x, Wᵀ), o) (+ bias)
                lin = OutputScaledLinear(mod.in_features, mod.out_features, mod.bias is not None, mod.output_scale)
            else:
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            if has_input_smoothing(mod):  # traced as Div(x, s) in front of the MatMul
                attach_input_smoothing(lin, input_smoothing(mod))
            set_submodule(model, name, lin)
            key = _digest(w.T.contiguous().numpy())
        elif isinstance(mod, CompressedEmbedding):
            w = mod.effective_weight()
            set_submodule(model, name, nn.Embedding.from_pretrained(w, freeze=True, padding_idx=mod.padding_idx))
            key = _digest(w.numpy())
        else:
            continue
        if key in digests:
            raise Unsupported(f"{name} and {digests[key]} have identical weights; cannot tell them apart in the graph")
        digests[key] = name
    return digests


def _float_encoder(model, conventions: Conventions | None = None):
    """The encoder with effective float weights (:func:`float_effective`) wrapped to output the
    sentence embedding pooled as ``conventions`` say (default: mean + L2, see
    :mod:`quantseal.sbert`); returns ``(wrapper, digests)``."""
    from .pooling import SentenceEncoder

    digests = float_effective(model)
    return SentenceEncoder(model, conventions).eval(), digests


def checkpoint_conventions(checkpoint: Path, manifest: ckpt.Manifest, config: dict) -> Conventions:
    """The sentence-transformers conventions of a checkpoint: its own copies of the source's
    ``modules.json`` / ``sentence_bert_config.json`` / pooling config, else (a checkpoint written
    before they were copied) the source folder's when it is still there, else the defaults."""
    source = Path(str(manifest.source.get("path") or ""))
    folder = checkpoint
    if not convention_files(checkpoint) and manifest.source.get("path") and convention_files(source):
        folder = source
    return read_conventions(folder, config)


def _trace_to_onnx(wrapper, path: Path, vocab: int) -> None:
    """Legacy TorchScript export with dynamic batch and sequence.  The example batch has a padded
    row, so the attention-mask path is traced (an all-ones mask may be skipped by transformers)."""
    import warnings

    import torch

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102],
                        [101, 2460, 1012, 102, 0, 0, 0, 0]], dtype=torch.long) % vocab
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [4]])).long()
    types = torch.zeros_like(ids)
    dyn = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    dyn[OUTPUT] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask, types), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUTS), output_names=[OUTPUT], dynamic_axes=dyn,
                          do_constant_folding=True)


# ----------------------------------------------------------------------------- graph rewrite
def rewrite_lowbit(model: onnx.ModelProto, digests: dict[str, str], matrices: dict[str, StoredMatrix],
                   accuracy_level: int = 0, activations: dict[str, dict] | None = None) -> None:
    """Replace, in place, the float MatMul / Gather of every planned matrix by its low-bit nodes.

    ``digests`` maps the sha256 of a float32 constant to the matrix it stands for.
    ``activations``: calibrated static activation quantisers per Linear (a CBQ manifest's
    ``extra["activations"]``), exported as QuantizeLinear / DequantizeLinear pairs (opset 21)."""
    activations = activations or {}
    unknown = sorted(set(activations) - set(matrices))
    if unknown:
        raise Unsupported(f"activation quantiser for {unknown[0]!r}, which is not a compressed Linear")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    owner: dict[str, str] = {}  # initialiser name → matrix name
    shapes = {tuple(m.shape) for m in matrices.values()} | {tuple(m.shape[::-1]) for m in matrices.values()}
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in shapes:
            name = digests.get(_digest(numpy_helper.to_array(t)))
            if name is not None:
                owner[t.name] = name
    new_nodes, new_inits, done = [], [], Counter()
    block_sums: dict = {}  # int4f: one S(x) per input, shared by q/k/v (lowbit.block_sums)
    for node in graph.node:
        target = None
        if node.op_type == "MatMul" and node.input[1] in owner:
            target = owner[node.input[1]]
            m = matrices[target]
            if m.shape != tuple(inits[node.input[1]].dims[::-1]):
                raise RuntimeError(f"{target}: graph constant has shape {list(inits[node.input[1]].dims)}")
            g = linear_nodes(m, node.input[0], node.output[0], accuracy_level, activations.get(target),
                             memo=block_sums)
        elif node.op_type == "Gather" and node.input[0] in owner:
            target = owner[node.input[0]]
            g = embedding_nodes(matrices[target], node.input[1], node.output[0])
        if target is None:
            new_nodes.append(node)
            continue
        done[target] += 1
        new_nodes.extend(g.nodes)
        new_inits.extend(g.initializers)
    missing = [n for n in matrices if done[n] != 1]
    if missing:
        raise RuntimeError(f"export: {missing[0]} was found {done[missing[0]]} times in the traced graph (expected once)")
    used = {i for n in new_nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used and t.name not in owner]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if activations:  # uint4 QuantizeLinear needs opset 21; no op of the traced graph changed meaning
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, QDQ_OPSET)


def matrix_initializer_bytes(model: onnx.ModelProto, names) -> dict[str, int]:
    """Bytes of each matrix's stored initialisers (``<name>.qweight`` / ``.scales`` / ...)."""
    by_name = {t.name: t for t in model.graph.initializer}
    return {n: initializer_bytes([by_name[n + s] for s in STORED_SUFFIXES if n + s in by_name]) for n in names}


# ----------------------------------------------------------------------------- writing
def _check_output(output: Path) -> None:
    if output.is_dir():
        raise BadInput(f"{output}: is a directory; give a file path such as {output / 'model.onnx'}")
    if output.suffix != ".onnx":
        raise BadInput(f"{output}: the output file name must end in .onnx")
    parent = output.parent
    if parent.exists() and not parent.is_dir():
        raise BadInput(f"{parent}: not a directory")


def _make_parent(output: Path) -> None:
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"{output}: cannot create its folder ({exc.strerror})") from exc
    if not os.access(parent, os.W_OK):
        raise BadInput(f"{output}: folder {parent} is not writable")


EXTERNAL_MODES = ("auto", "always", "never")


def use_external(mode: str, size: int, output: Path) -> bool:
    """Whether a model of ``size`` initialiser bytes keeps them in ``<name>.data``: ``always``,
    ``never``, or ``auto`` (over :data:`EXTERNAL_DATA_BYTES`).  ``never`` over protobuf's 2 GiB
    limit is refused (no runtime could parse the file)."""
    from .external_data import PROTOBUF_LIMIT

    if mode not in EXTERNAL_MODES:
        raise BadInput(f"--external-data must be one of {', '.join(EXTERNAL_MODES)}, not {mode!r}")
    if mode == "never" and size > PROTOBUF_LIMIT:
        raise BadInput(f"{output}: {size} bytes of weights do not fit one ONNX file (protobuf's 2 GiB limit); "
                       "use --external-data auto")
    return mode == "always" or (mode == "auto" and size > EXTERNAL_DATA_BYTES)


def write_model(model: onnx.ModelProto, output: Path, tokenizer: Path | None, external: str = "auto",
                stage=None) -> list[Path]:
    """Write ``model`` (and ``<name>.data`` when :func:`use_external` says so, ``tokenizer.json``,
    for an encoder the tokenizer files that make ``AutoTokenizer.from_pretrained(folder)`` give the
    graph's inputs: :func:`~.tokenizer_files.companion_files`, and for a decoder the
    onnxruntime-genai files its metadata carries: :func:`~.genai_config.companion_files`) as one
    unit (:mod:`.publish_export`): everything goes to a staging folder first.  ``stage``: the
    :class:`~.publish_export.ExportStage` a streaming build already wrote ``<name>.data`` into
    (:class:`~.external_data.TensorSink`)."""
    from .external_data import save
    from .genai_config import companion_files
    from .publish_export import ExportStage
    from .tokenizer_files import companion_files as tokenizer_companions

    stage = stage or ExportStage(output)
    try:
        large = use_external(external, initializer_bytes(list(model.graph.initializer)), output)
        stage.check_external(large)
        for name in save(model, stage.dir, output.name, large):
            stage.add(name)
        if tokenizer is not None and tokenizer.is_file():
            shutil.copyfile(tokenizer, stage.add(TOKENIZER))
            for name, data in tokenizer_companions(tokenizer, model).items():
                stage.add(name).write_bytes(data)
        for name, data in companion_files({p.key: p.value for p in model.metadata_props}, output.name).items():
            stage.add(name).write_bytes(data)
        return stage.publish()
    except OSError as exc:
        raise BadInput(f"{output}: cannot write ({exc.strerror or exc})") from exc
    finally:
        stage.discard()


def _metadata(manifest: ckpt.Manifest, family: str, matrix_bytes: dict[str, int]) -> dict[str, str]:
    mats = {n: {"format": e.format, "rank": e.rank, "kind": e.kind, "shape": e.shape, "bytes": matrix_bytes[n]}
            for n, e in manifest.matrices.items()}
    return {
        "quantseal.version": __version__,
        "quantseal.family": family,
        "quantseal.model_type": str(manifest.source.get("model_type", "")),
        "quantseal.source_sha256": str(manifest.source.get("sha256", "")),
        "quantseal.method": manifest.method,
        "quantseal.budget": json.dumps(manifest.budget, sort_keys=True),
        "quantseal.output": OUTPUT,
        "quantseal.pooling": "mean+l2",
        "quantseal.matrices": json.dumps(mats, sort_keys=True),
    }


def default_accuracy_level(checkpoint: str | Path) -> int:
    """MatMulNBits' ``accuracy_level`` for a checkpoint's target: 4 (int8 activations) for a
    decoder, which runs one token at a time on CPU — there an 8-bit MatMulNBits is ~80x and a
    4-bit one ~2.7x slower at level 0 (benchmarks/decoder_smollm2.py measures the quality cost) —
    and 0 (float32 compute) for an encoder; 0 when the folder cannot be read (export says why)."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    from ..models import FAMILY_BY_MODEL_TYPE

    fam = FAMILY_BY_MODEL_TYPE.get(config.get("model_type") if isinstance(config, dict) else None)
    return 4 if fam is not None and fam.name == "decoder" else 0


def export_onnx(checkpoint: str | Path, output: str | Path, accuracy_level: int = 0, dtype: str = "fp32",
                external_data: str = "auto") -> dict:
    """Export a compressed checkpoint folder to ``output`` (.onnx).  Returns the report that
    ``quantseal export --json`` prints: path, bytes, matrices, ops, seconds, ...  ``dtype``:
    the compute type, ``"fp32"`` or (decoders, for the CUDA execution provider) ``"fp16"``.
    ``external_data``: ``auto`` | ``always`` | ``never`` (:func:`use_external`).  A decoder is
    built streaming (:mod:`.decoder`: one stored tensor at a time, its bytes written as it goes)."""
    if dtype not in ("fp32", "fp16"):
        raise BadInput(f"--dtype must be fp32 or fp16, not {dtype!r}")
    if external_data not in EXTERNAL_MODES:
        raise BadInput(f"--external-data must be one of {', '.join(EXTERNAL_MODES)}, not {external_data!r}")
    t0 = time.perf_counter()
    checkpoint, output = Path(checkpoint), Path(output)
    _check_output(output)
    manifest, lazy = ckpt.open_checkpoint(checkpoint)  # checked; each tensor is read when asked for
    from ..models import ENCODER, family_of, read_config

    config = read_config(checkpoint)
    fam = family_of(config)
    if fam is not ENCODER:
        from .decoder import export_decoder

        return export_decoder(checkpoint, output, manifest, lazy, config, accuracy_level, t0, dtype, external_data)
    if dtype != "fp32":
        raise Unsupported(f"{checkpoint}: --dtype {dtype} is for decoder graphs; encoders export in float32")
    tensors = lazy.load_all()  # an encoder is small: all at once
    matrices = stored_matrices(manifest, tensors)
    del tensors
    _make_parent(output)
    conventions = checkpoint_conventions(checkpoint, manifest, config)
    model, _, _ = ckpt.load_compressed(checkpoint)
    wrapper, digests = _float_encoder(model, conventions)
    with tempfile.TemporaryDirectory(prefix=".quantseal-trace.", dir=output.parent) as work:
        traced = Path(work) / "float.onnx"
        _trace_to_onnx(wrapper, traced, int(config.get("vocab_size", 30522)))
        del wrapper, model
        proto = onnx.load(str(traced))
    rewrite_lowbit(proto, digests, matrices, accuracy_level, manifest.extra.get("activations"))
    matrix_bytes = matrix_initializer_bytes(proto, matrices)
    meta = _metadata(manifest, fam.name, matrix_bytes)
    meta.update(conventions.metadata())  # quantseal.pooling, .max_seq_length, ...: what the runtime reads
    return finish_export(proto, output, checkpoint, manifest, fam.name, matrix_bytes, meta, t0, external_data)


def finish_export(proto: onnx.ModelProto, output: Path, checkpoint: Path, manifest: ckpt.Manifest, family: str,
                  matrix_bytes: dict[str, int], metadata: dict[str, str], t0: float, external: str = "auto",
                  stage=None) -> dict:
    """Stamp producer and metadata, write the file (and tokenizer) atomically, and return the
    ``quantseal export --json`` report; shared by the encoder and decoder exporters.  Each
    matrix's initialisers must total its manifest bytes: the budget is a promise about the file."""
    for name, e in manifest.matrices.items():
        if matrix_bytes[name] != e.bytes:
            raise RuntimeError(f"{name}: {matrix_bytes[name]} bytes in the graph, the manifest says {e.bytes}")
    proto.producer_name = "quantseal"
    proto.producer_version = __version__
    for key, value in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    written = write_model(proto, output, checkpoint / TOKENIZER, external, stage)
    ops = Counter(n.op_type for n in proto.graph.node)
    return {
        "path": str(output),
        "bytes": sum(p.stat().st_size for p in written if p.suffix in (".onnx", ".data")),
        "files": [str(p) for p in written],
        "matrices": len(matrix_bytes),
        "matrix_bytes": sum(matrix_bytes.values()),
        "initializer_bytes": initializer_bytes(list(proto.graph.initializer)),
        "formats": dict(Counter(e.format for e in manifest.matrices.values())),
        "ops": dict(sorted(ops.items())),
        "family": family,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "seconds": round(time.perf_counter() - t0, 3),
    }
