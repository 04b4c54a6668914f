"""``quantseal compress --method lq+cbq``: the LQ/ILP plan, then CBQ learns Q's rounding and step
sizes with the plan's low-rank factors in the loop.

The budgeted plan (:mod:`.pipeline`) gives every Linear a format and a decomposition
W ≈ Q + L1 L2 (LQ-LoRA eq. 1).  CBQ's cross-block reconstruction (:mod:`.cbq`) then refines the
integer matrices: each starts from the plan's codes and scales, sees ``W − L1 L2`` as the weight
its rounding approximates, and is trained jointly over windows of blocks with ``x·L2ᵀ·L1ᵀ``
(frozen) added to its output, so the learned rounding compensates what the branch leaves.
Formats, ranks and therefore stored bytes are the plan's exactly: the budget still holds.
Matrices in non-integer formats (NF4, float) are kept as planned.  Weights only (A16).
A safetensors decoder is streamed (:mod:`.lqcbq_stream`), byte-identical to this in-memory path.
"""

from __future__ import annotations

import time

import torch

from .. import checkpoint as ckpt
from ..compress.qlinear import CompressedLinear
from ..errors import BadInput
from ..lazy_source import open_source
from ..models import compressible_linears, source_files
from ..text import calibration_texts
from .calibration import calibration_batches, capture_block_inputs
from .cbq import CBQConfig, LQStart, StepCallback, cbq_quantize_model
from .pipeline import CompressConfig, Progress, _no_progress, build_candidate_table, make_manifest, materialize, plan
from .pipeline import summarize
from .quantizers import QuantizedTensor


def lq_start(entries: dict[str, ckpt.MatrixEntry], tensors: dict[str, torch.Tensor],
             linears: dict[str, torch.nn.Module]) -> tuple[dict[str, QuantizedTensor], LQStart]:
    """Split a materialised plan into CBQ's starting codes (integer Linears) and what stays fixed."""
    init: dict[str, QuantizedTensor] = {}
    start = LQStart()
    for name, e in entries.items():
        if e.kind == "linear":
            add_start(name, e, tensors, linears[name].bias, init, start)
    return init, start


def add_start(name: str, e: ckpt.MatrixEntry, tensors, bias: torch.Tensor | None,
              init: dict[str, QuantizedTensor], start: LQStart) -> None:
    """One planned Linear's part of :func:`lq_start` (``tensors``: any mapping of its stored
    tensors; ``bias``: the float Linear's, kept by a non-integer matrix)."""
    l1, l2 = tensors.get(f"{name}.L1"), tensors.get(f"{name}.L2")
    if e.spec.kind == "int":
        init[name] = ckpt.stored_quantized(name, e, tensors)
        if l1 is not None:
            start.lowrank[name] = (l1.float(), l2.float())
    else:
        w_hat, dl1, dl2 = ckpt.dequantized_matrix(name, e, tensors)
        start.frozen[name] = CompressedLinear(w_hat, dl1, dl2, None if bias is None else bias.detach())


def lq_cbq_compress(cfg: CompressConfig, cbq: CBQConfig, progress: Progress = _no_progress,
                    callback: StepCallback | None = None, stream: bool = True) -> dict:
    """Plan with LQ + ILP, refine the integer matrices with CBQ, write the checkpoint.  A
    safetensors decoder (not ``--data-aware``: the Fisher needs the whole model) is streamed, one
    window of blocks in memory (:mod:`.lqcbq_stream`; ``stream=False`` loads the whole model, the
    same bytes)."""
    t0 = time.perf_counter()
    if cbq.abits != 16 or cbq.cfp_weights:
        raise BadInput("--method lq+cbq refines weights only (--abits 16, no weight truncation)")
    if cfg.output.exists() and not ckpt.is_checkpoint(cfg.output):
        raise BadInput(f"{cfg.output}: exists and is not a quantseal checkpoint; refusing to overwrite it")
    source = open_source(cfg.model) if stream and not cfg.data_aware else None
    streamed = source is not None and source.fam.name == "decoder"
    table = build_candidate_table(cfg, progress, stream=streamed)
    choice = plan(table, cfg.budget_bits, cfg.budget_mb, ",".join(cfg.formats), cfg.max_decode_ms)
    if table.source is not None:
        from .lqcbq_stream import stream_lq_cbq

        return stream_lq_cbq(cfg, cbq, table, choice, progress, callback, t0)
    tensors, entries = materialize(table, choice, progress)
    model, fam = table.model, table.fam
    init, start = lq_start(entries, tensors, compressible_linears(model, fam))
    t_cal = time.perf_counter()
    batches = calibration_batches(cfg.model, calibration_texts(cfg.calib, cbq_samples(cfg)), 16)
    inputs = capture_block_inputs(model, fam, batches, torch.float16)
    res = cbq_quantize_model(model, fam, inputs, cbq, callback, init=init, lq=start)
    calib_seconds = time.perf_counter() - t_cal
    for name, qt in res.quantized.items():
        e = entries[name]
        lr = start.lowrank.get(name)
        mt = ckpt.matrix_tensors(name, e.spec, qt, None, *(lr if lr is not None else (None, None)))
        stored = sum(t.numel() * t.element_size() for t in mt.values())
        if stored != e.bytes:  # same format and rank: the plan's bytes
            raise RuntimeError(f"{name}: refined codes store {stored} bytes, the plan {e.bytes}")
        tensors.update(mt)
    manifest = make_manifest(table, cfg, entries, tensors)
    manifest.method = "lq+cbq"
    manifest.extra.update({"cbq": {"window": cbq.window, "rank": cbq.rank, "steps": cbq.steps,
                                   "refined": len(res.quantized), "kept": len(start.frozen),
                                   "window_losses": [round(x, 6) for x in res.losses]}})
    ckpt.write_checkpoint(cfg.output, manifest, tensors, cfg.model, source_files(cfg.model, model))
    report = summarize(manifest, cfg.output)
    report.update(refined=len(res.quantized), kept=len(start.frozen), calibration_seconds=round(calib_seconds, 3),
                  seconds=round(time.perf_counter() - t0, 3))
    return report


def cbq_samples(cfg: CompressConfig) -> int:
    """Calibration texts for the CBQ stage: CBQ's default 128 unless more were asked for."""
    return min(cfg.calib_samples, 128)
