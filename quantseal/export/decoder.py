"""Compressed LLaMA-family decoder → one ONNX graph with logits and a KV cache.

One graph serves both prefill and decoding: it always takes the past keys and values, and a
prompt's first call feeds them empty (sequence length 0), so there is a single file, a single
copy of the weights, and a single set of low-bit nodes.

=================================  ==========================================  ======================
name                               shape (dtype)                               meaning
=================================  ==========================================  ======================
``input_ids``                      [batch, sequence] int64                     new tokens
``attention_mask``                 [batch, past + sequence] int64              1 = real token, 0 = pad
``past_key_values.{i}.key/value``  [batch, kv_heads, past, head_dim] float32   layer i's cache (past
                                                                               may be 0)
``logits``                         [batch, sequence, vocab] float32            next-token logits
``present.{i}.key/value``          [batch, kv_heads, past + sequence,          the cache to feed back
                                   head_dim] float32
=================================  ==========================================  ======================

Position ids are computed inside the graph from the mask (``cumsum(mask) − 1``, the last
``sequence`` of them), as transformers' ``generate`` does, so left-padded batches are right.

How: :func:`~quantseal.export.onnx.float_effective` swaps each compressed Linear for a float one
holding ``W_hat + L1 L2``; ``torch.onnx.export(dynamo=True)`` writes the float graph (its
optimiser folds every weight transpose into a ``(K, N)`` constant); then
:func:`~quantseal.export.onnx.rewrite_lowbit` replaces those MatMuls by ``MatMulNBits`` + the
low-rank branch read from the checkpoint's stored tensors, so each matrix's bytes equal the
manifest's.  A tied LM head reuses the token-embedding initialiser (``MatMul(h, Transpose(E))``):
the table is stored once.

A float (fp16/fp32) token embedding matrix (a watermarked export, :mod:`quantseal.export.watermark`:
the marked table ``E'``, optionally with a low-rank branch ``E' + L1 L2``) is supported; with a
tied head the head is the same effective table, ``logits = h · E'ᵀ (+ (h · L2ᵀ) · L1ᵀ)``
(:func:`tied_head_nodes`), so the Gather and the head read the same initialisers: ``E'`` stays
stored once, and the template swap of :func:`~quantseal.export.watermark.swap_into_template`
replaces it for both at once.  Quantised
token embeddings are still refused (the head would need their codes as ``MatMulNBits``).
"""

from __future__ import annotations

import inspect
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from .. import checkpoint as ckpt
from ..errors import BadInput, Unsupported
from .lowbit import OPSET, Nodes, StoredMatrix
from .onnx import _metadata, finish_export, float_effective, matrix_initializer_bytes, rewrite_lowbit, stored_matrices

INPUT_IDS, MASK, LOGITS = "input_ids", "attention_mask", "logits"


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def cache_geometry(config: dict) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a LLaMA-family config."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return layers, kv, head_dim


def _with_past(model, n_layers: int):
    """``(input_ids, attention_mask, past_flat) → (logits, *present_flat)`` around a transformers
    causal LM; ``past_flat`` is (key₀, value₀, key₁, value₁, ...)."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class CausalLMWithPast(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, past):
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            t = input_ids.shape[1]
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_kw: cache})
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            present = []
            for layer in cache.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    wrapper = CausalLMWithPast(model).eval()
    with torch.no_grad():
        for p in wrapper.parameters():
            p.requires_grad_(False)
    return wrapper


def _trace(wrapper, path: Path, config: dict) -> None:
    """Dynamo export with dynamic batch, sequence and past length.  The example batch has a
    left-padded row, so the mask path is traced."""
    import torch

    layers, kv, hd = cache_geometry(config)
    vocab = int(config.get("vocab_size", 32000))
    b, p, t = 2, 3, 4
    ids = (torch.arange(b * t).reshape(b, t) * 7919 + 11) % vocab
    mask = torch.ones(b, p + t, dtype=torch.long)
    mask[1, :2] = 0
    gen = torch.Generator().manual_seed(0)
    past = tuple(torch.randn(b, kv, p, hd, generator=gen) for _ in range(2 * layers))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_len, total = torch.export.Dim("past", min=0), torch.export.Dim("total")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask, past), str(path), dynamo=True, opset_version=OPSET,
                          input_names=[INPUT_IDS, MASK, *past_names(layers)],
                          output_names=[LOGITS, *present_names(layers)], dynamic_shapes=shapes,
                          optimize=True, external_data=False, verbose=False)


def _check_tied_once(proto: onnx.ModelProto, config: dict) -> None:
    """A tied LM head must not duplicate the embedding table in the graph."""
    if not config.get("tie_word_embeddings", False):
        return
    v, h = int(config["vocab_size"]), int(config["hidden_size"])
    tables = [t.name for t in proto.graph.initializer if sorted(t.dims) == sorted((v, h))]
    if len(tables) > 1:
        raise RuntimeError(f"export: the tied embedding is stored {len(tables)} times ({tables})")


def tied_head_nodes(m: StoredMatrix, h: str, y: str) -> Nodes:
    """Nodes computing ``y = h · E'ᵀ + (h · L2ᵀ) · L1ᵀ`` for a head tied to the float embedding
    ``m`` (``E'``: (V, H) fp16/fp32 initialiser ``<name>.weight``; ``L1`` (V, r), ``L2`` (r, H)).
    The initialisers are the embedding's own (:func:`~quantseal.export.lowbit.embedding_nodes`
    adds them to the graph); only Cast / Transpose / MatMul / Add nodes are added here."""
    from onnx import TensorProto

    g = Nodes()

    def as_float_t(suffix: str) -> str:
        src = f"{m.name}.{suffix}"
        if m.tensors[suffix].dtype == np.float16:
            src = g.node("Cast", [src], f"{m.name}.head.{suffix}.f32", to=TensorProto.FLOAT)
        return g.node("Transpose", [src], f"{m.name}.head.{suffix}.T", perm=[1, 0])

    main = y if not m.rank else f"{m.name}.head.y_table"
    g.node("MatMul", [h, as_float_t("weight")], main)
    if m.rank:
        lh = g.node("MatMul", [h, as_float_t("L2")], f"{m.name}.head.lowrank_h")
        lr = g.node("MatMul", [lh, as_float_t("L1")], f"{m.name}.head.lowrank_y")
        g.node("Add", [main, lr], y)
    return g


def _rewrite_tied_head(proto: onnx.ModelProto, table: str, m: StoredMatrix) -> None:
    """Replace the traced head ``MatMul(h, Transpose(table))`` by :func:`tied_head_nodes`, in
    place, before :func:`~quantseal.export.onnx.rewrite_lowbit` turns the Gather over ``table``
    into the embedding's nodes."""
    nodes = list(proto.graph.node)
    users = [n for n in nodes if table in n.input and n.op_type != "Gather"]
    tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
    mm = [n for n in nodes if tr is not None and tr.output[0] in n.input]
    if tr is None or len(mm) != 1 or mm[0].op_type != "MatMul" or mm[0].input[1] != tr.output[0]:
        raise RuntimeError(f"export: the tied head over {table} is not MatMul(h, Transpose(E)) in the traced graph")
    g = tied_head_nodes(m, mm[0].input[0], mm[0].output[0])
    out = []
    for n in nodes:
        if n is tr:
            continue
        if n is mm[0]:
            out.extend(g.nodes)
            continue
        out.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(out)


def export_decoder(checkpoint: Path, output: Path, manifest: ckpt.Manifest, tensors: dict, config: dict,
                   accuracy_level: int = 0, t0: float | None = None) -> dict:
    """Export a compressed decoder checkpoint (already read) to ``output``; returns the same report
    as :func:`~quantseal.export.onnx.export_onnx` plus ``inputs`` / ``outputs``."""
    from .onnx import _make_parent

    t0 = time.perf_counter() if t0 is None else t0
    if any(e.kind == "embedding" and e.format not in ("fp16", "fp32") for e in manifest.matrices.values()):
        raise Unsupported(f"{checkpoint}: a decoder with a quantised token embedding (--budget-mb) is not exported "
                          "yet (its tied LM head would need the same codes as MatMulNBits); compress with --budget")
    from ..models import family_of

    fam = family_of(config)
    foreign = [n for n in manifest.matrices if not n.startswith(fam.blocks_attr + ".") and n != fam.embedding_attr]
    if foreign:
        raise BadInput(f"{checkpoint}: matrix {foreign[0]!r} is not part of a {config.get('model_type')} model "
                       "(config.json and the checkpoint's tensors disagree)")
    matrices = stored_matrices(manifest, tensors)
    del tensors
    model, fam, _ = ckpt.load_compressed(checkpoint)
    _make_parent(output)
    layers, kv, hd = cache_geometry(config)
    from ..compress.qlinear import TiedHead

    # load_compressed gives a head tied to a float embedding with a low-rank branch a TiedHead
    tied_lowrank = isinstance(model.get_output_embeddings(), TiedHead)
    digests = float_effective(model)
    if tied_lowrank:  # the head reads the same effective table as the Gather
        from torch import nn

        emb = model.get_submodule(fam.embedding_attr)
        head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
        head.weight = emb.weight
        model.set_output_embeddings(head)
    wrapper = _with_past(model, layers)
    with tempfile.TemporaryDirectory(prefix=".quantseal-trace.", dir=output.parent) as work:
        traced = Path(work) / "float.onnx"
        _trace(wrapper, traced, config)
        del wrapper, model
        proto = onnx.load(str(traced))
    if tied_lowrank:
        from onnx import numpy_helper

        from .onnx import _digest

        by_digest = {d: n for d, n in digests.items() if n == fam.embedding_attr}
        table = [t.name for t in proto.graph.initializer if tuple(t.dims) == tuple(matrices[fam.embedding_attr].shape)
                 and _digest(numpy_helper.to_array(t)) in by_digest]
        if len(table) != 1:
            raise RuntimeError(f"export: the tied embedding table was found {len(table)} times in the traced graph")
        _rewrite_tied_head(proto, table[0], matrices[fam.embedding_attr])
    rewrite_lowbit(proto, digests, matrices, accuracy_level, manifest.extra.get("activations"))
    _check_tied_once(proto, config)
    matrix_bytes = matrix_initializer_bytes(proto, matrices)
    meta = _metadata(manifest, fam.name, matrix_bytes)
    eos = config.get("eos_token_id")
    meta.update({
        "quantseal.output": LOGITS, "quantseal.pooling": "none",
        "quantseal.num_layers": str(layers), "quantseal.num_kv_heads": str(kv), "quantseal.head_dim": str(hd),
        "quantseal.eos_token_id": ",".join(str(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None),
    })
    return finish_export(proto, output, checkpoint, manifest, fam.name, matrix_bytes, meta, t0)


def float_reference_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Torch logits of ``model`` for a batch, with the same position ids as the exported graph."""
    import torch

    ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
