"""The compressed checkpoint folder: ``quantseal.json`` + ``weights.safetensors`` (or its shards
``weights-00001-of-000NN.safetensors`` past 2 GB, :mod:`quantseal.checkpoint_files`) + the
source's config and tokenizer files (and its sentence-transformers json files,
:mod:`quantseal.sbert`).  Written into a temporary folder — tensor by tensor as they are computed,
through :class:`CheckpointWriter` — fsynced, then published atomically as one unit
(quantseal/publish.py: the path always holds the old or the new complete folder).
:func:`open_checkpoint` reads it lazily, one tensor at a time; :func:`read_checkpoint` loads all.

Tensors of a compressed matrix ``NAME`` (e.g. ``encoder.layer.0.attention.self.query``):

=====================  =========  ==============================================  =============
key                    dtype      shape                                           when
=====================  =========  ==============================================  =============
``NAME.qweight``       uint8      [N, nb, block·bits/8] (MatMulNBits ``B``)       int / nf
``NAME.scales``        float16    [N, nb]                                         int / nf
``NAME.qzeros``        uint8      [N, ceil(nb·bits/8)]  packed zero points        affine int
``NAME.offsets``       float16    [N, nb]  block offsets m: ŵ = s·q + m             int4f
``NAME.weight``        fp16/fp32  [N, K]                                          fp formats
``NAME.L1``            float16    [N, r]                                          rank r > 0
``NAME.L2``            float16    [r, K]                                          rank r > 0
``NAME.input_smooth``  float32    [K]  CFP divisor s: the layer computes on x / s  CBQ A8/A4, IA³
``NAME.output_scale``  float32    [N]  o: y = o ⊙ (x Wᵀ) + b (a Mul after the MatMul)  DoRA, IA³
``NAME.K1``, ``.K2``   fp16/fp32  [o1, i1], [o2, i2]: a Kronecker branch K1 ⊗ K2       LoKr
=====================  =========  ==============================================  =============

With ``input_smooth`` the stored matrix is the quantised W · diag(s) (compress/smoothing.py).
A manifest's ``extra["activations"]`` (CBQ with A8/A4) holds each Linear's static activation
quantiser; :func:`load_compressed` attaches them, so the torch model computes what the export does.

The quantised token embedding (``kind: "embedding"`` in the manifest) uses the same keys with
N = vocabulary size and K = hidden size; its optional low-rank branch ``L1: [V, r]``,
``L2: [r, H]`` adds ``L1[ids] · L2`` to the looked-up rows (exported as Gather + MatMul).  Every other tensor (biases, norms, position
embeddings) is stored under its original name and dtype.  NF4 codes use the same LSB-first
layout as the integer formats; the exporter re-lays them for ``MatMulBnb4``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint_files import SHARD_BYTES, WEIGHTS, CheckpointTensors, ShardedWriter, weight_files
from .compress.formats import FormatSpec
from .compress.packing import pack_weight, pack_zero_points, unpack_weight, unpack_zero_points
from .compress.quantizers import QuantizedTensor, dequantize
from .compress.qlinear import OUTPUT_SCALE
from .compress.smoothing import BUFFER as SMOOTH
from .errors import BadInput
from .integrity import check_files, check_finite, check_matrix, file_records, file_sha256  # noqa: F401
from .publish import check_output_folder, publish_folder, temp_folder  # noqa: F401  (publish_folder: re-exported)
from .sbert import convention_files
from .tensorfile import TensorInfo, info_of

SCHEMA_VERSION = 1
MANIFEST = "quantseal.json"
SOURCE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class MatrixEntry:
    """One compressed matrix in the manifest."""

    format: str
    rank: int
    shape: list[int]
    error: float
    bytes: int
    kind: str = "linear"  # "linear" | "embedding"

    @property
    def spec(self) -> FormatSpec:
        return FormatSpec.parse(self.format)


@dataclass
class Manifest:
    source: dict
    method: str
    budget: dict
    matrices: dict[str, MatrixEntry]
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    files: dict = field(default_factory=dict)  # name -> {"sha256", "bytes"}, set by write_checkpoint

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("schema_version") != SCHEMA_VERSION:
                raise BadInput(f"{where}: schema version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            mats = {k: MatrixEntry(**v) for k, v in d["matrices"].items()}
            for name, e in mats.items():
                try:
                    e.spec  # validates the format name
                except BadInput as exc:
                    raise BadInput(f"{where}: matrix {name}: format {e.format!r}: {exc}") from None
            for key in ("source", "budget", "extra", "files"):
                if not isinstance(d.get(key, {}), dict):
                    raise BadInput(f"{where}: manifest field {key!r} is not a mapping")
            return cls(d["source"], d["method"], d["budget"], mats, d.get("extra", {}), d["schema_version"],
                       d.get("files", {}))
        except BadInput:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{where}: not a valid quantseal manifest ({type(exc).__name__}: {exc})") from exc


def matrix_tensors(name: str, spec: FormatSpec, qt: QuantizedTensor | None, weight: torch.Tensor | None,
                   l1: torch.Tensor | None, l2: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The stored tensors of one matrix (see the module table)."""
    out: dict[str, torch.Tensor] = {}
    if spec.kind == "fp":
        out[f"{name}.weight"] = weight.to(torch.float16 if spec.bits == 16 else torch.float32).contiguous()
    else:
        out[f"{name}.qweight"] = pack_weight(qt.codes, spec.stored_bits, spec.block).contiguous()
        out[f"{name}.scales"] = qt.scales.to(torch.float16).contiguous()
        if qt.zeros is not None:
            out[f"{name}.qzeros"] = pack_zero_points(qt.zeros, spec.stored_bits).contiguous()
        if qt.offsets is not None:
            out[f"{name}.offsets"] = qt.offsets.to(torch.float16).contiguous()
    if l1 is not None and l1.shape[1] > 0:
        out[f"{name}.L1"] = l1.to(torch.float16).contiguous()
        out[f"{name}.L2"] = l2.to(torch.float16).contiguous()
    return out


def matrix_specs(name: str, cand, n: int, k: int) -> dict[str, TensorInfo]:
    """Dtype and shape of each tensor :func:`matrix_tensors` stores for candidate ``cand``
    (a :class:`~quantseal.compress.formats.Candidate`: format + rank) of an ``(n, k)`` matrix,
    before it is computed (the module table; quantseal/integrity.py checks the same)."""
    spec, r = cand.fmt, cand.rank
    out: dict[str, TensorInfo] = {}
    if spec.kind == "fp":
        out[f"{name}.weight"] = TensorInfo(torch.float16 if spec.bits == 16 else torch.float32, torch.Size((n, k)))
    else:
        nb = -(-k // spec.block)
        s = spec.stored_bits
        out[f"{name}.qweight"] = TensorInfo(torch.uint8, torch.Size((n, nb, spec.block * s // 8)))
        out[f"{name}.scales"] = TensorInfo(torch.float16, torch.Size((n, nb)))
        if spec.kind == "int" and not spec.symmetric:
            out[f"{name}.qzeros"] = TensorInfo(torch.uint8, torch.Size((n, -(-nb * s // 8))))
        if spec.kind == "intf":
            out[f"{name}.offsets"] = TensorInfo(torch.float16, torch.Size((n, nb)))
    if r > 0:
        out[f"{name}.L1"] = TensorInfo(torch.float16, torch.Size((n, r)))
        out[f"{name}.L2"] = TensorInfo(torch.float16, torch.Size((r, k)))
    return out


def stored_quantized(name: str, entry: MatrixEntry, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Rebuild the unpacked :class:`QuantizedTensor` of a stored int/nf matrix."""
    spec = entry.spec
    n, k = entry.shape
    codes = unpack_weight(tensors[f"{name}.qweight"], spec.stored_bits)
    scales = tensors[f"{name}.scales"].float()
    zeros = None
    if f"{name}.qzeros" in tensors:
        zeros = unpack_zero_points(tensors[f"{name}.qzeros"], spec.stored_bits, scales.shape[1])
    offsets = tensors[f"{name}.offsets"].float() if f"{name}.offsets" in tensors else None
    return QuantizedTensor(codes, scales, zeros, (n, k), spec, offsets)


def dequantized_matrix(name: str, entry: MatrixEntry, tensors: dict[str, torch.Tensor]):
    """(W_hat float32 (N, K), L1 float32 or None, L2 float32 or None) of a stored matrix."""
    spec = entry.spec
    if spec.kind == "fp":
        w_hat = tensors[f"{name}.weight"].float()
    else:
        w_hat = dequantize(stored_quantized(name, entry, tensors))
    l1 = tensors.get(f"{name}.L1")
    l2 = tensors.get(f"{name}.L2")
    return w_hat, None if l1 is None else l1.float(), None if l2 is None else l2.float()


def entry_bytes(name: str, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes actually stored for a matrix: the sum over its keys."""
    suffixes = (".qweight", ".scales", ".qzeros", ".offsets", ".weight", ".L1", ".L2", ".K1", ".K2")
    return sum(t.numel() * t.element_size() for k, t in tensors.items()
               if k.startswith(name + ".") and k[len(name):] in suffixes)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CheckpointWriter:
    """Write a checkpoint folder as its tensors are computed, then publish it atomically.

    ``specs`` announces every tensor (name → :class:`~quantseal.tensorfile.TensorInfo`) so the
    shard files are laid out up front; ``put(name, tensor)`` writes one (any order, moved to the
    CPU); ``finish(manifest)`` copies the source's config/tokenizer files (and ``extra_files``,
    name → bytes), records every shard's size and sha256 in the manifest and publishes the folder.
    Used as a context manager, an exception removes the temporary folder: nothing half-written.
    ``out`` must not exist, or be a quantseal checkpoint (which is then replaced)."""

    def __init__(self, out: str | Path, specs: dict[str, TensorInfo], source_dir: str | Path,
                 extra_files: dict[str, bytes] | None = None, shard_bytes: int = SHARD_BYTES):
        self.out = check_output_folder(out, MANIFEST, "checkpoint")
        self.source_dir = Path(source_dir)
        self.extra_files = dict(extra_files or {})
        for name in self.extra_files:
            if Path(name).name != name or name == MANIFEST or name.startswith("weights"):
                raise ValueError(f"extra checkpoint file {name!r}: a plain file name other than {MANIFEST}/weights*")
        self.tmp = temp_folder(self.out)
        try:
            self.shards = ShardedWriter(self.tmp, specs, shard_bytes)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def put(self, name: str, t: torch.Tensor) -> None:
        self.shards.put(name, t)

    def put_rows(self, name: str, start: int, t: torch.Tensor) -> None:
        """Rows ``start:start + len(t)`` of ``name``: a large tensor written a chunk at a time."""
        self.shards.put_rows(name, start, t)

    def finish(self, manifest: Manifest) -> Path:
        tmp = self.tmp
        names = self.shards.close()
        for name in SOURCE_FILES + tuple(convention_files(self.source_dir)):  # + sentence-transformers' json files
            src = self.source_dir / name
            if src.is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
        for name, data in self.extra_files.items():
            (tmp / name).write_bytes(data)
        files = file_records(tmp, names)  # the tensor files; config/tokenizer stay hand-editable
        (tmp / MANIFEST).write_text(replace(manifest, files=files).to_json())
        os.chmod(tmp, 0o755)
        publish_folder(tmp, self.out)
        self.tmp = None
        return self.out

    def abort(self) -> None:
        if self.tmp is not None:
            self.shards.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # after finish() there is nothing left to remove


def write_checkpoint(out: str | Path, manifest: Manifest, tensors: dict[str, torch.Tensor],
                     source_dir: str | Path, extra_files: dict[str, bytes] | None = None,
                     shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the folder atomically from tensors in memory (:class:`CheckpointWriter`).  ``out``
    must not exist, or be a quantseal checkpoint (which is then replaced).  ``extra_files``
    (name → bytes) are written after the :data:`SOURCE_FILES` copied from ``source_dir`` (e.g. the
    config and tokenizer of a GGUF source, see :func:`quantseal.models.source_files`)."""
    specs = {k: info_of(v) for k, v in tensors.items()}
    with CheckpointWriter(out, specs, source_dir, extra_files, shard_bytes) as w:
        for k in sorted(tensors):
            w.put(k, tensors[k])
        return w.finish(manifest)


def tensor_files_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint's tensor files (all shards)."""
    manifest = Manifest.from_json((Path(path) / MANIFEST).read_text(), str(Path(path) / MANIFEST))
    return sum((Path(path) / f).stat().st_size for f in weight_files(path, manifest.files))


def budget_after_edit(budget: dict, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    """The manifest's budget block with ``tensor_bytes`` moved by what an edit of the tensors
    (adapter fold, watermark) added or removed."""
    budget = dict(budget)
    if "tensor_bytes" in budget:
        size = lambda ts: sum(v.numel() * v.element_size() for v in ts.values())  # noqa: E731
        budget["tensor_bytes"] = int(budget["tensor_bytes"]) + int(size(after) - size(before))
    return budget


def open_checkpoint(path: str | Path) -> tuple[Manifest, CheckpointTensors]:
    """The manifest and a lazy per-tensor accessor (:class:`~quantseal.checkpoint_files.CheckpointTensors`:
    ``tensors[name]`` reads one tensor, ``tensors.info(name)`` its dtype and shape) of a
    single-file or sharded checkpoint.  Checked before returning: every tensor file's size and
    sha256 against the manifest, every manifest entry's format, shape, rank and bytes against the
    stored headers; NaN/Inf is refused when a tensor is read, naming it (quantseal/integrity.py)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such checkpoint folder")
    if not is_checkpoint(path):
        raise BadInput(f"{path}: not a quantseal checkpoint (no {MANIFEST})")
    manifest = Manifest.from_json((path / MANIFEST).read_text(errors="replace"), str(path / MANIFEST))
    files = weight_files(path, manifest.files)
    for f in files:
        if not (path / f).is_file():
            raise BadInput(f"{path}: {f} is missing")
    if manifest.files:  # checkpoints written before the hashes existed carry none
        missing = [f for f in files if f not in manifest.files]
        if missing:
            raise BadInput(f"{path / MANIFEST}: records no sha256 for {missing[0]}")
        check_files(path, manifest.files)
    tensors = CheckpointTensors(path, files)
    where = str(path / files[0]) if len(files) == 1 else str(path)
    infos = tensors.infos()
    for name, e in manifest.matrices.items():
        check_matrix(where, name, e, infos)
    return manifest, tensors


def read_checkpoint(path: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Manifest and every stored tensor in memory; any damage is a :class:`BadInput` naming the
    file or the tensor: a file whose size or sha256 differs from the manifest's record, a manifest
    entry whose format, shape, rank or bytes disagree with the stored tensors, a NaN or Inf
    anywhere (quantseal/integrity.py).  For a model too large to hold, use :func:`open_checkpoint`."""
    manifest, tensors = open_checkpoint(path)
    return manifest, tensors.load_all()


def _tied_keys(model) -> set[str]:
    """State-dict keys that alias another parameter (tied LM head)."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        return {"lm_head.weight"}
    return set()


def stored_state(model) -> dict:
    """The state-dict entries a checkpoint stores: no ``position_ids`` buffers and no alias of
    another tensor (a tied LM head is the token table; storing it again doubled a 135M decoder's
    checkpoint and counted twice against ``--budget-mb``)."""
    tied = _tied_keys(model)
    return {k: v for k, v in model.state_dict().items() if "position_ids" not in k and k not in tied}


def load_compressed(path: str | Path, activations: bool = True):
    """A torch model whose compressed Linears compute x·dequant(Q)ᵀ + (x·L2ᵀ)·L1ᵀ, with the
    calibrated activation quantisers of an A8/A4 checkpoint attached unless ``activations`` is
    False.  Returns ``(model, family, manifest)``."""
    from .compress.qlinear import CompressedEmbedding, CompressedLinear, set_submodule
    from .models import build_model, family_of, read_config

    path = Path(path)
    manifest, tensors = read_checkpoint(path)
    config = read_config(path)
    fam = family_of(config)
    model = build_model(config)
    plain = {}
    covered = set()
    for name, e in manifest.matrices.items():
        w_hat, l1, l2 = dequantized_matrix(name, e, tensors)
        covered |= {k for k in tensors if k.startswith(name + ".")}
        if e.kind == "embedding":
            set_submodule(model, name, CompressedEmbedding(w_hat, l1, l2, model.get_submodule(name).padding_idx))
            continue
        bias = tensors.get(f"{name}.bias")
        kron = (tensors[f"{name}.K1"], tensors[f"{name}.K2"]) if f"{name}.K1" in tensors else None
        set_submodule(model, name, CompressedLinear(w_hat, l1, l2, bias, tensors.get(f"{name}.{SMOOTH}"),
                                                    tensors.get(f"{name}.{OUTPUT_SCALE}"), kron))
    plain.update({k: v.float() for k, v in tensors.items() if k not in covered or k.endswith(".bias")})
    result = model.load_state_dict(plain, strict=False)
    missing = [k for k in result.missing_keys
               if not k.endswith(("w_hat", ".l1", ".l2", ".k1", ".k2", f".{SMOOTH}", f".{OUTPUT_SCALE}")) and "position_ids" not in k and k not in _tied_keys(model)]
    if missing:
        raise BadInput(f"{path}: {WEIGHTS} lacks tensors the model needs, e.g. {missing[0]}")
    emb = manifest.matrices.get(fam.embedding_attr)
    if _tied_keys(model) and emb is not None:
        # a planned table (quantised, or float with a low-rank branch as in a watermarked decoder):
        # the tied head reads the same effective table as the lookup, which is what the exported
        # graph does (MatMulNBits over the lookup's codes, or Gemm over the stored float table)
        from .compress.qlinear import TiedHead

        model.set_output_embeddings(TiedHead(model.get_submodule(fam.embedding_attr)))
    quantisers = manifest.extra.get("activations")
    if activations and quantisers:  # calibrated static activation quantisers: what the export computes
        from .compress.cbq import attach_activation_quant

        attach_activation_quant(model, quantisers)
    return model.eval(), fam, manifest
