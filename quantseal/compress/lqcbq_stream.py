"""Streaming LQ+CBQ of a decoder (issue #12): the LQ/ILP plan streamed as ``--method lq`` is, its
tensors staged on disk, then CBQ's windows over blocks read one at a time.

:func:`~.lqcbq.lq_cbq_compress` in memory loads the float model for CBQ.  Here:

1. the candidate table is built from the lazy source (:func:`~.pipeline.build_candidate_table`,
   one matrix at a time) and the ILP picks; the chosen candidates are rebuilt one matrix at a time
   (:func:`~.pipeline.materialize_into`) into :class:`~.cbq_stream.StagedTensors`, a scratch
   folder: nothing of the plan's output is held in memory;
2. block 0's calibration inputs are captured (the token table materialised for that only), and
   CBQ's windows run over blocks read at their first visit (:class:`~.cbq_stream.StreamedBlocks`),
   each block's starting point taken from the staged plan then (:func:`~.lqcbq.add_start`: the
   integer matrices' codes and frozen low-rank branches, the other formats kept as planned);
3. a final block's refined codes (same format and rank: the plan's bytes) go straight into the
   checkpoint; at the end every other staged tensor (kept matrices, norms, the token table) is
   copied in and the folder published.

Every number is the in-memory path's: the same table, plan, starting codes, block inputs and
window loop (:func:`~.cbq.cbq_windows`), so the checkpoint is byte-identical
(tests/compress/test_lqcbq_stream.py).  Activations share one
:data:`~.spill.DEFAULT_ACTIVATION_MB` pool, spilled beyond it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..lazy_source import fix_mmap_threshold
from ..text import calibration_texts
from .calibration import calibration_batches, capture_block_inputs
from .cbq import CBQConfig, CBQResult, LQStart, StepCallback, _write_back, cbq_windows
from .cbq_stream import MB, ActivationPool, StagedTensors, StreamedBlocks
from .lqcbq import add_start, cbq_samples
from .pipeline import CandidateTable, CompressConfig, Progress, make_manifest, materialize_into, planned_specs
from .pipeline import summarize
from .spill import DEFAULT_ACTIVATION_MB


def stream_lq_cbq(cfg: CompressConfig, cbq: CBQConfig, table: CandidateTable, choice: list[int],
                  progress: Progress, callback: StepCallback | None, t0: float) -> dict:
    """Steps 1–3 of the module notes for a streamed ``table`` (``table.source`` set) and its plan."""
    fix_mmap_threshold()
    source, fam = table.source, table.fam
    staged = StagedTensors()
    try:
        entries = materialize_into(table, choice, staged.put, progress)
        specs = planned_specs(table, choice)
        pool = ActivationPool(DEFAULT_ACTIVATION_MB * MB)
        t_cal = time.perf_counter()
        model = source.load_outside_blocks("cpu")
        batches = calibration_batches(cfg.model, calibration_texts(cfg.calib, cbq_samples(cfg)), 16)
        inputs = capture_block_inputs(model, fam, batches, torch.float16, store=pool.new_list())
        source.release(model)
        init: dict = {}
        start = LQStart()

        def prepare(i: int, prefix: str, block: nn.Module) -> None:
            for rel in fam.linears:
                full = f"{prefix}.{rel}"
                add_start(full, entries[full], staged, block.get_submodule(rel).bias, init, start)

        held = StreamedBlocks(source, torch.device("cpu"), inputs, cbq, {}, init, {}, pool.new_list, prepare=prepare)
        res = CBQResult({})
        written: set[str] = set()
        counts = {"refined": 0, "kept": 0}
        with ckpt.CheckpointWriter(cfg.output, specs, cfg.model) as writer:

            def finish(i: int, qb: nn.Module) -> None:
                prefix = f"{fam.blocks_attr}.{i}"
                _write_back(held.loaded[i], qb, fam, prefix, res)
                for rel in fam.linears:
                    full = f"{prefix}.{rel}"
                    init.pop(full, None)
                    if start.frozen.pop(full, None) is not None:
                        counts["kept"] += 1
                        continue
                    e, qt, lr = entries[full], res.quantized.pop(full), start.lowrank.pop(full, None)
                    mt = ckpt.matrix_tensors(full, e.spec, qt, None, *(lr if lr is not None else (None, None)))
                    stored = sum(t.numel() * t.element_size() for t in mt.values())
                    if stored != e.bytes:  # same format and rank: the plan's bytes
                        raise RuntimeError(f"{full}: refined codes store {stored} bytes, the plan {e.bytes}")
                    for key, t in mt.items():
                        writer.put(key, t)
                        written.add(key)
                    counts["refined"] += 1
                held.release(i)

            cbq_windows(len(held), held, finish, fam, inputs, cbq, res, callback, init, start, prefolded=True,
                        new_list=pool.new_list)
            del inputs
            calib_seconds = time.perf_counter() - t_cal
            staged.drain(writer, skip=written)  # kept matrices, norms, the token table
            manifest = make_manifest(table, cfg, entries, specs)
            manifest.method = "lq+cbq"
            manifest.extra.update({"cbq": {"window": cbq.window, "rank": cbq.rank, "steps": cbq.steps, **counts,
                                           "window_losses": [round(x, 6) for x in res.losses]}})
            writer.finish(manifest)
    finally:
        staged.store.close()
    report = summarize(manifest, cfg.output)
    report.update(**counts, calibration_seconds=round(calib_seconds, 3), seconds=round(time.perf_counter() - t0, 3))
    return report
