"""Streaming GPTQ of a decoder (issue #12): one block's weights and one block's calibration
activations in memory, results written into the checkpoint as each block finishes.

The pass is GPTQ's own sequential capture-and-replay (Frantar et al. 2023, §4 "Step 3"; see
:mod:`.gptq`), with the model read through :class:`~quantseal.lazy_source.LazySource`:

1. the final norm and rotary tables are materialised, the token table's rows for the calibration
   ids read (:mod:`.token_rows`), and block 0's inputs captured for every calibration batch
   (``(B, T, H)`` float32 each, held in a :class:`~.spill.SpillStore` up to ``activation_mb``,
   spilled to a temporary folder beyond it); then the rows are dropped;
2. for block i: its norms are read from the source, its Linears left unread;
   :func:`~.gptq.gptq_quantize_block` quantises them in order, each read in row chunks when its
   solve starts (its input group's Hessian pass runs before, through stand-ins:
   :mod:`.held_codes`), its codes written straight to the checkpoint's shard files and held
   packed in the block; the block (through its codes, dequantised a row chunk at a time) maps the
   inputs to block i + 1's (each input dropped once its output exists), and its memory is
   released.  Every forward pass runs ``--hessian-tokens`` padded tokens (a few batch rows);
3. a tied integer table calibrated as the LM head (``--table-method gptq``, :mod:`.head_table`)
   takes its inputs from the last block's outputs through the final norm, then reads the whole
   float table for its GPTQ; a round-to-nearest ``--table`` reads it before the blocks;
4. the untouched tensors (norms, the token table in row chunks) are copied through one at a time,
   and the folder is published as a unit.

A ``--budget-mb`` plan (:mod:`.calibrated_plan`, its candidate table streamed as well) gives each
Linear its own format; the pass is the same.

Peak memory is about one GPTQ Hessian (one per group of Linears reading the same input; float32,
factorised in its own memory: one K × K array for the widest Linear, K = the MLP width for
``down_proj``), one window of activations (each batch's input is dropped as its output is made),
the block's solved Linears as packed codes (half a byte per 4-bit weight) and chunks of about
8 MB (a Linear's float32 rows; a block's intermediates over ``--hessian-tokens`` tokens): flat in
depth, growing with width through the K² of the solver and the window.  No float32 copy of a
block, or of one of its Linears, is ever whole in memory.  The token
table is never whole in memory either: block 0's inputs come from the calibration ids' rows
(:mod:`.token_rows`) and the table is copied through in row chunks.
Every number equals the in-memory path's (:func:`~.gptq.gptq_quantize_model`): the same block
code on the same float32 weights and inputs, so the checkpoint is byte-identical
(tests/compress/test_streaming.py).
"""

from __future__ import annotations

import time

import torch

from .. import checkpoint as ckpt
from ..devices import resolve_device, to_device
from ..lazy_source import LazySource, fix_mmap_threshold
from ..models import blocks, compressible_linears, embedding, final_norm
from ..tensorfile import TensorInfo
from ..text import calibration_texts
from .calibrated import (CalibratedConfig, _table_entry, calibrated_manifest, calibrated_report, calibrates_table,
                         linear_specs, table_entry, table_spec)
from .calibration import BlockInputs, block_forward_rows, calibration_batches, capture_block_inputs
from .formats import Candidate, FormatSpec
from .gptq import gptq_quantize_block, release_codes
from .spill import SpillStore
from .token_rows import rows_embedding

MB = 1_000_000


def output_specs(source: LazySource, linears: list[str], spec: FormatSpec | dict[str, FormatSpec],
                 table: FormatSpec | None) -> dict[str, TensorInfo]:
    """Every tensor the checkpoint will hold, before any is computed (``spec``: one format for
    every Linear or ``{name: format}``, a ``--budget-mb`` plan)."""
    specs: dict[str, TensorInfo] = {}
    planned = set()
    for name in linears:
        n, k = source.stored[name + ".weight"].shape
        specs.update(ckpt.matrix_specs(name, Candidate(spec[name] if isinstance(spec, dict) else spec), n, k))
        planned.add(name + ".weight")
    if table is not None:
        name = source.fam.embedding_attr
        specs.update(ckpt.matrix_specs(name, Candidate(table), *source.stored[name + ".weight"].shape))
        planned.add(name + ".weight")
    for key, info in source.stored.items():
        if key not in planned:
            specs[key] = info
    return specs


@torch.no_grad()
def run_block_spilled(block: torch.nn.Module, x: BlockInputs, cap_bytes: float,
                      device: torch.device = torch.device("cpu"), consume: bool = False,
                      max_tokens: int | None = None) -> BlockInputs:
    """The next block's inputs (float32, on the CPU), held in a new :class:`SpillStore`.
    ``consume``: each batch's input is dropped from ``x.hidden`` (a :class:`SpillStore`) as soon
    as its output exists, so the two windows together hold one window's activations (+ a batch).
    ``max_tokens``: padded tokens per forward pass (:func:`~.calibration.block_forward_rows`)."""
    out = SpillStore(cap_bytes)
    for i, (a, kw) in enumerate(zip(x.args, x.kwargs)):
        h = x.hidden[i]
        out.append(block_forward_rows(block, h.to(device), *to_device((a, kw), device), max_tokens).cpu())
        del h
        if consume:
            x.hidden.drop(i)
    return x.with_hidden(out)


def capture_rows(source: LazySource, model: torch.nn.Module, batches: list, device: torch.device,
                 cap_bytes: float) -> BlockInputs:
    """Block 0's inputs (float32, in a :class:`SpillStore`) with the token table's rows for the
    calibration ids only (:mod:`.token_rows`) when the table was left on the meta device; the
    meta table is put back afterwards."""
    fam = source.fam
    parent_name, _, attr = fam.embedding_attr.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    table = getattr(parent, attr)
    if table.weight.is_meta:
        setattr(parent, attr, rows_embedding(source, fam.embedding_attr + ".weight", batches, device))
    try:
        return capture_block_inputs(model, fam, to_device(batches, device), torch.float32, store=SpillStore(cap_bytes))
    finally:
        setattr(parent, attr, table)


def copy_through(source: LazySource, writer: ckpt.CheckpointWriter, key: str, chunk_bytes: int = 32 << 20) -> None:
    """Copy the source tensor ``key`` into the checkpoint unchanged, a chunk of rows at a time when
    it is over ``chunk_bytes`` (the token table: no whole float32 copy in memory)."""
    info = source.stored[key]
    if not info.shape or info.nbytes <= chunk_bytes or info.shape[0] < 2:
        writer.put(key, source.get(key))
        return
    per = max(1, chunk_bytes // (info.nbytes // info.shape[0]))
    for r0 in range(0, info.shape[0], per):
        writer.put_rows(key, r0, source.get_rows(key, r0, min(r0 + per, info.shape[0])))


def stream_gptq(cfg: CalibratedConfig, source: LazySource, callback, t0: float | None = None, fplan=None) -> dict:
    """``compress --method gptq`` of a safetensors decoder, streamed (see the module notes).
    ``fplan``: a ``--budget-mb`` plan (:mod:`.calibrated_plan`: each Linear's format and the
    table's).  A tied integer table with ``--table-method gptq`` is calibrated as the LM head on
    the final normed states of the quantised model (:mod:`.head_table`), read after the last
    block; it then reads the whole float table (as streamed cbq does)."""
    t0 = time.perf_counter() if t0 is None else t0
    fix_mmap_threshold()  # 1 MB and larger tensors are returned to the system when freed
    fam = source.fam
    device = resolve_device(cfg.device)
    emb = fam.embedding_attr
    model = source.load_outside_blocks(device, skip=frozenset({emb}))  # the table is read by rows
    linears = list(compressible_linears(model, fam))  # names only: the blocks are still on meta
    texts = calibration_texts(cfg.calib, cfg.calib_samples)
    batches = calibration_batches(cfg.model, texts, cfg.batch_size)
    lin_specs = linear_specs(cfg, linears, fplan)
    table = table_spec(cfg, fplan)
    calibrate = calibrates_table(cfg, source.model.config, fam.name, table)
    cap = cfg.activation_mb * MB
    specs = output_specs(source, linears, lin_specs, table)
    entries: dict[str, ckpt.MatrixEntry] = {}
    t_cal = time.perf_counter()
    x = capture_rows(source, model, batches, device, cap)
    with ckpt.CheckpointWriter(cfg.output, specs, cfg.model) as writer:
        if table is not None and not calibrate:
            if embedding(model, fam).weight.is_meta:  # the --table quantisation reads the whole table
                source.load_module(embedding(model, fam), emb, device)
            name, mt, entry = _table_entry(model, fam, table)  # round-to-nearest (not head-calibrated)
            for key, t in mt.items():
                writer.put(key, t)
            entries[name] = entry
            del mt
        source.release(model)  # the token table is no longer needed in memory
        done = [0]

        def tick(what: str) -> None:
            done[0] += 1
            callback("gptq", done[0], len(linears), {"layer": what})

        def write(name: str, qt) -> None:  # each Linear's codes written as soon as they exist
            mt = ckpt.matrix_tensors(name, qt.spec, qt, None, None, None)
            stored = sum(t.numel() * t.element_size() for t in mt.values())
            for key, t in mt.items():
                writer.put(key, t)
            entries[name] = ckpt.MatrixEntry(qt.spec.name, 0, list(qt.shape), 0.0, stored, "linear")

        def read_rows(name: str, r0: int, r1: int) -> torch.Tensor:  # a Linear's float32 rows, at its turn
            return source.get_rows(name + ".weight", r0, r1)

        tokens = cfg.hessian_tokens
        for bi, block in enumerate(blocks(model, fam)):
            prefix = f"{fam.blocks_attr}.{bi}"
            source.load_module(block, prefix, device, skip=frozenset(f"{prefix}.{r}.weight" for r in fam.linears))
            gptq_quantize_block(block, prefix, fam, x, lin_specs, tick=tick, sink=write, read_rows=read_rows,
                                hold_codes=True, max_tokens=tokens, act_order=cfg.gptq_order == "act")
            last = bi + 1 == len(blocks(model, fam))
            nxt = (None if last and not calibrate  # a calibrated table reads the last block's outputs too
                   else run_block_spilled(block, x, cap, device, consume=True, max_tokens=tokens))
            release_codes(block, fam, dequantised=False)
            x.hidden.close()
            x = nxt
            source.release(block)
        if calibrate:  # GPTQ's codes of the tied table as the head, on the final normed states
            name, norm = final_norm(source.model, fam)
            source.load_module(norm, name, device)
            with torch.no_grad():
                head_x = torch.cat([norm(h.to(device))[m.to(device)].float().cpu()
                                    for h, m in zip(x.hidden, x.token_mask)])
            x.hidden.close()
            source.release(norm)
            w = source.get(emb + ".weight")
            tname, mt, entries[tname] = table_entry(emb, w, table, head_x)
            for key, t in mt.items():
                writer.put(key, t)
            del w, mt, head_x
        calib_seconds = time.perf_counter() - t_cal
        planned = {n + ".weight" for n in entries}
        for key in source.stored:
            if key not in planned:
                copy_through(source, writer, key)
        lin_params = sum(source.stored[n + ".weight"].numel() for n in linears)
        total_bytes = sum(s.nbytes for s in specs.values())
        table_method = None if table is None else ("gptq" if calibrate else "rtn")
        manifest = calibrated_manifest(cfg, fam.name, source.model.config.model_type, entries, lin_params,
                                       total_bytes, len(texts), {}, {}, table_method, fplan)
        writer.finish(manifest)
    return calibrated_report(cfg, manifest, calib_seconds, t0, fplan)
