"""Compressed decoder checkpoint → the folder onnxruntime-genai runs: ``model.onnx`` (logits and
a KV cache), ``genai_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``.

The graph is *built* from the checkpoint's stored tensors (:mod:`.decoder_graph`: onnxruntime's
fused GroupQueryAttention / SkipSimplifiedLayerNormalization / MatMulNBits graph, the same ops as
onnxruntime-genai's model builder), not traced from torch, so an export costs seconds and the
memory of the stored tensors.  One graph serves prefill and decoding: a prompt's first call feeds
empty past tensors (sequence length 0).  quantseal's own runtime
(:class:`~quantseal.runtime.pipelines.CausalLM`, ``run``, ``serve``) and onnxruntime-genai
(``og.Model(folder)``) read the same files.

Every planned matrix's initialisers total exactly its manifest ``bytes`` (packed q/k/v included:
the packed tensors are the three matrices' rows concatenated).  A tied LM head reads the token
table's own initialisers: ``Gemm(h, E, transB=1)`` over a float table, ``MatMulNBits`` over the
codes a quantised table's ``GatherBlockQuantized`` also reads, so the table is stored once.  A
watermarked export (:mod:`quantseal.export.watermark`) replaces only the table's initialisers
(``mark_side`` tied), or keeps them and adds the lookup's ``mark_slots`` / ``mark_delta``
correction (``mark_side`` input: the head reads the unmarked table).

Architectures: :mod:`.decoder_arch` (LLaMA incl. Llama-3 rope scaling, Mistral, Qwen2, Qwen3, Phi-3);
others are refused with one line naming them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from .. import checkpoint as ckpt
from ..errors import BadInput
from .decoder_arch import arch_of
from .decoder_graph import DecoderGraph
from .external_data import TensorSink
from .genai_config import META_GENAI, META_TOKENIZER_CONFIG, TOKENIZER_CONFIG, genai_config, tokenizer_config
from .onnx import _metadata, finish_export
from .publish_export import ExportStage
from .stored import Filtered, LazyMatrices, NumpyView, owned_names

LOGITS = "logits"
COMPUTE = {"fp32": np.float32, "fp16": np.float16}  # export --dtype: CPU graphs compute in float32


def build_decoder(manifest: ckpt.Manifest, tensors: Mapping, config: dict, accuracy_level: int = 0,
                  max_positions: int | None = None, dtype: str = "fp32",
                  sink: TensorSink | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The decoder graph of a checkpoint's stored tensors (numpy arrays or torch tensors by name,
    e.g. :func:`~quantseal.checkpoint.open_checkpoint`'s lazy mapping: each is read when the graph needs it):
    ``(ModelProto, bytes of each planned matrix's initialisers)``.  With a ``sink`` every large
    initialiser's bytes go to its data file as they are made (the proto holds references)."""
    from ..models import family_of

    arch = arch_of(config)
    fam = family_of(config)
    foreign = [n for n in manifest.matrices if not n.startswith(fam.blocks_attr + ".") and n != fam.embedding_attr]
    if foreign:
        raise BadInput(f"matrix {foreign[0]!r} is not part of a {config.get('model_type')} model "
                       "(config.json and the checkpoint's tensors disagree)")
    arrays = NumpyView(tensors)
    plain = Filtered(arrays, owned_names(manifest))
    builder = DecoderGraph(arch, LazyMatrices(manifest, arrays), plain, accuracy_level,
                           manifest.extra.get("activations"), max_positions, COMPUTE[dtype], sink=sink)
    out = builder.build(fam.embedding_attr, prefix=fam.blocks_attr.split(".")[0])
    arrays.read_rest()  # a NaN in a tensor the graph never read is still refused
    return out


def export_decoder(checkpoint: Path, output: Path, manifest: ckpt.Manifest, tensors: Mapping, config: dict,
                   accuracy_level: int = 0, t0: float | None = None, dtype: str = "fp32",
                   external: str = "auto") -> dict:
    """Export a compressed decoder checkpoint (opened by :func:`~quantseal.checkpoint.open_checkpoint`) to
    ``output`` and its onnxruntime-genai companions, streaming: each stored tensor is read when the
    graph needs it and its bytes go straight to the staging folder's ``<name>.data``, which becomes
    the model's external data or is folded into one file (:mod:`.external_data`); the files are
    published as a unit (:mod:`.publish_export`).  Returns the same report as
    :func:`~quantseal.export.onnx.export_onnx`."""
    t0 = time.perf_counter() if t0 is None else t0
    stage = ExportStage(output)
    try:
        data = output.name + ".data"
        sink = TensorSink(stage.dir / data, data)
        try:
            proto, matrix_bytes = build_decoder(manifest, tensors, config, accuracy_level, dtype=dtype, sink=sink)
        except BadInput as exc:
            raise BadInput(f"{checkpoint}: {exc}") from None
        finally:
            sink.close()
        del tensors
        arch = arch_of(config)
        meta = _metadata(manifest, "decoder", matrix_bytes)
        eos = config.get("eos_token_id")
        generation = {}
        gen_file = checkpoint / "generation_config.json"
        if gen_file.is_file():
            try:
                generation = json.loads(gen_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                generation = {}
        tok_cfg = checkpoint / TOKENIZER_CONFIG
        meta.update({
            "quantseal.output": LOGITS, "quantseal.pooling": "none",
            "quantseal.num_layers": str(arch.layers), "quantseal.num_kv_heads": str(arch.kv_heads),
            "quantseal.head_dim": str(arch.head_dim), "quantseal.architecture": arch.model_type,
            "quantseal.eos_token_id": ",".join(str(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None),
            META_GENAI: json.dumps(genai_config(arch, config, output.name, generation=generation,
                                                provider="cuda" if dtype == "fp16" else None), sort_keys=True),
            "quantseal.dtype": dtype,
            META_TOKENIZER_CONFIG: tokenizer_config(tok_cfg.read_text() if tok_cfg.is_file() else None, config,
                                                    _chat_template_file(checkpoint)),
        })
        return finish_export(proto, output, checkpoint, manifest, "decoder", matrix_bytes, meta, t0, external, stage)
    finally:
        stage.discard()


def _chat_template_file(checkpoint: Path) -> str | None:
    """The checkpoint's ``chat_template.jinja`` (copied from the source by compress), if any."""
    path = Path(checkpoint) / "chat_template.jinja"
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not a readable text file ({exc})") from exc


def float_reference_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Torch logits of ``model`` for a batch, with the same position ids as the exported graph."""
    import torch

    ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
