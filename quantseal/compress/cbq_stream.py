"""Streaming CBQ of a decoder (issue #12): one window of blocks and its calibration activations in
memory, each block written into the checkpoint as soon as no later window touches it.

The windows, losses and training are :func:`~.cbq.cbq_windows`, the loop the in-memory path
(:func:`~.cbq.cbq_quantize_model`) runs too (Ding et al. 2024, CBQ §3.1–3.2: windows of ``k``
blocks sliding with overlap 1).  What differs is who holds the blocks: the model is read through
:class:`~quantseal.lazy_source.LazySource` and

1. the token table (and rotary tables) are materialised only to capture block 0's inputs for every
   calibration batch (``(B, T, H)``, float16 as the in-memory path stores them; float32 too when a
   tied integer table is calibrated as the LM head); a round-to-nearest ``--table`` is written
   then, and they are dropped;
2. block i is read from the source at its first visit (:class:`StreamedBlocks`).  Before CBQ
   sees it, the steps the in-memory path runs over the whole model first are run on it alone:
   CFP's exact activation folds (``--abits 4|8`` with ``--init gptq``: :func:`~.cbq.cfp_prefold`'s
   step, on its own stream of unfolded float outputs) and GPTQ's starting codes
   (:func:`~.gptq.gptq_quantize_block` on a copy, advancing GPTQ's own quantised stream;
   :func:`~.cbq.gptq_init`).  Every block's computation sees the same float32 weights and inputs as
   in memory, and the window loop draws from its generator in the same order, so the checkpoint is
   byte-identical (tests/compress/test_cbq_stream.py);
3. when a block is final its codes, activation scales and other tensors (norms, after CFP's folds)
   are written, its head-stream step is run (float32, the dequantised weights) and its memory is
   released.

Activations held at once: the float and quantised streams at the window's first block, the float
outputs of each window block, GPTQ's stream (``--init gptq``), the unfolded float stream (A4/A8
with ``--init gptq``) and the head stream (a calibrated tied table), each ``(B, T, H)`` per batch:
all in one :class:`ActivationPool` of ``--activation-mb``, spilled to disk beyond it
(:mod:`.spill`).  Blocks held at once: the window's float blocks, their CBQ copies (a few float32
copies of each weight: W, ⌊W/s₀⌋, V₀) and one GPTQ copy.  So the peak is flat in depth.

With ``--abits 4|8`` CFP may give a Linear an explicit input scale (``input_smooth``, known only
once its block is calibrated), so the checkpoint's tensor list is not known up front: finished
tensors are staged in a scratch folder and copied into the checkpoint at the end.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..devices import resolve_device, to_device
from ..lazy_source import LazySource, fix_mmap_threshold
from ..models import blocks, compressible_linears, final_norm
from ..tensorfile import TensorInfo, info_of
from ..text import calibration_texts
from .calibrated import (CalibratedConfig, calibrated_manifest, calibrated_report, calibrates_table, linear_specs,
                         table_entry, table_spec)
from .calibration import BlockInputs, block_forward, calibration_batches, capture_block_inputs
from .cbq import CBQConfig, CBQResult, _prepare_float_block, _run_into, _write_back, cbq_windows
from .formats import FormatSpec
from .gptq import gptq_quantize_block
from .spill import SpillStore
from .streaming import output_specs

MB = 1_000_000


class ActivationPool:
    """One in-memory allowance (bytes) shared by every activation list of a streamed run."""

    def __init__(self, cap_bytes: float):
        self.cap_bytes = float(cap_bytes)
        self.used = 0
        self.peak = 0  # the most bytes held in memory at once

    def new_list(self) -> "PooledStore":
        return PooledStore(self)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _give_back(self, held: list[int]) -> None:
        self.used -= held[0]
        held[0] = 0


class PooledStore(SpillStore):
    """A :class:`~.spill.SpillStore` whose in-memory cap is what its pool has left; tensors are
    returned on the device they came from.  Its bytes go back to the pool when it is closed or
    garbage-collected (a stream replaced by the next block's drops its last reference)."""

    def __init__(self, pool: ActivationPool):
        super().__init__(0.0)
        self.pool = pool
        self.device: torch.device | None = None
        self._held = [0]
        weakref.finalize(self, pool._give_back, self._held)

    def append(self, t: torch.Tensor) -> None:
        if self.device is None:
            self.device = t.device
        before = self.memory_bytes
        self.cap_bytes = before + max(self.pool.cap_bytes - self.pool.used, 0)
        super().append(t)
        grown = self.memory_bytes - before
        self._held[0] += grown
        self.pool._take(grown)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return super().__getitem__(i)
        return super().__getitem__(i).to(self.device)

    def close(self) -> None:
        self.pool._give_back(self._held)
        super().close()


class _Casting:
    """Appends ``t.to(dtype)`` to ``inner`` (an output list that stores what the next block reads)."""

    def __init__(self, inner, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype

    def append(self, t: torch.Tensor) -> None:
        self.inner.append(t.to(self.dtype))


class StreamedBlocks:
    """``block_at(i)`` of :func:`~.cbq.cbq_windows` for a lazy source: block i's float weights are
    read at its first visit (visits come in order), CFP's pre-folds and GPTQ's starting codes are
    computed for it then (see the module notes), and :meth:`release` drops it."""

    def __init__(self, source: LazySource, device: torch.device, inputs: BlockInputs, cfg: CBQConfig,
                 specs: dict[str, FormatSpec], init: dict | None, folded: dict, new_list,
                 prepare: Callable[[int, str, nn.Module], None] | None = None):
        """``init`` (a dict, filled in here) for GPTQ's starting codes, None for round-to-nearest;
        ``prepare(i, prefix, block)`` instead of GPTQ: the caller's own starting point for a
        freshly loaded block (LQ+CBQ: the plan's codes and low-rank branches)."""
        self.source, self.fam, self.device, self.cfg = source, source.fam, device, cfg
        self.specs, self.init, self.folded, self.new_list = specs, init, folded, new_list
        self.prepare = prepare
        self.blocks = blocks(source.model, source.fam)
        self.loaded: dict[int, nn.Module] = {}
        self.next = 0
        self.dtype = inputs.hidden[0].dtype
        gptq = init is not None and prepare is None
        prefold = gptq and cfg.abits < 16 and cfg.cfp_activations  # cfp_prefold's condition
        self.x_pf = inputs if prefold else None  # the unfolded float stream cfp_prefold walks
        self.x_g = inputs if gptq else None  # GPTQ's quantised stream
        self.peak_loaded = 0  # the most float blocks held at once

    def __len__(self) -> int:
        return len(self.blocks)

    def __call__(self, i: int) -> nn.Module:
        if i in self.loaded:
            return self.loaded[i]
        if i != self.next:
            raise RuntimeError(f"streamed CBQ visits block {i} before block {self.next}")
        self.next += 1
        prefix = f"{self.fam.blocks_attr}.{i}"
        block = self.source.load_module(self.blocks[i], prefix, self.device)
        self.loaded[i] = block
        self.peak_loaded = max(self.peak_loaded, len(self.loaded))
        if self.prepare is not None:
            self.prepare(i, prefix, block)
        if self.x_pf is not None:  # cfp_prefold's step: fold, output unchanged
            out = self.new_list()
            _prepare_float_block(block, self.fam, self.x_pf, self.cfg, self.folded, prefix, {},
                                 out=_Casting(out, self.dtype))
            self.x_pf = self.x_pf.with_hidden(out) if i + 1 < len(self) else None
        if self.x_g is not None:  # gptq_init's step: GPTQ's codes of the folded block, on a copy
            with torch.no_grad():
                g = copy.deepcopy(block)
                self.init.update(gptq_quantize_block(g, prefix, self.fam, self.x_g, self.specs,
                                                     act_order=self.cfg.gptq_order == "act"))
                nxt = _run_into(self.new_list(), lambda t, a, kw: block_forward(g, t, a, kw).to(self.dtype), self.x_g)
                self.x_g = self.x_g.with_hidden(nxt) if i + 1 < len(self) else None
                del g
        return block

    def release(self, i: int) -> None:
        self.source.release(self.loaded.pop(i))


class StagedTensors(Mapping):
    """Named tensors kept in a scratch folder (a :class:`~.spill.SpillStore` that spills
    everything) until they can be written: ``put(name, t)``, then read back by name."""

    def __init__(self):
        self.store = SpillStore(0)  # every tensor to disk
        self.index: dict[str, int] = {}
        self.infos: dict[str, TensorInfo] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        self.index[name] = len(self.store)
        self.store.append(t)
        self.infos[name] = info_of(t)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.store[self.index[name]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def drain(self, writer: ckpt.CheckpointWriter, skip: set[str] = frozenset()) -> None:
        """Write every staged tensor not in ``skip`` to ``writer``, then delete the folder."""
        for name in self.index:
            if name not in skip:
                writer.put(name, self[name])
        self.store.close()


def can_stream(cfg: CalibratedConfig, source: LazySource, fplan=None) -> bool:
    """Whether :func:`stream_cbq` runs ``cfg`` (and its ``--budget-mb`` plan ``fplan``) on
    ``source`` (else the in-memory path does): a decoder, and a final norm where a tied table is
    head-calibrated."""
    if source.fam.name != "decoder":
        return False
    calibrate = calibrates_table(cfg, source.model.config, source.fam.name, table_spec(cfg, fplan))
    return not calibrate or final_norm(source.model, source.fam) is not None


def stream_cbq(cfg: CalibratedConfig, source: LazySource, callback, t0: float | None = None,
               stats: dict | None = None, fplan=None) -> dict:
    """``compress --method cbq`` of a safetensors decoder, streamed (see the module notes).
    ``stats`` (optional, filled in): ``peak_loaded_blocks``, ``peak_activation_bytes``.
    ``fplan``: a ``--budget-mb`` plan (each Linear's format and the table's; ``--init gptq``)."""
    t0 = time.perf_counter() if t0 is None else t0
    fix_mmap_threshold()
    fam = source.fam
    device = resolve_device(cfg.device)
    model = source.load_outside_blocks(device)
    linears = list(compressible_linears(model, fam))  # names only: the blocks are still on meta
    texts = calibration_texts(cfg.calib, cfg.calib_samples)
    batches = to_device(calibration_batches(cfg.model, texts, cfg.batch_size), device)
    lin_specs = linear_specs(cfg, linears, fplan)
    table = table_spec(cfg, fplan)
    calibrate = calibrates_table(cfg, source.model.config, fam.name, table)
    ccfg = cfg.cbq()
    pool = ActivationPool(cfg.activation_mb * MB)
    specs = output_specs(source, linears, lin_specs, table)
    entries: dict[str, ckpt.MatrixEntry] = {}
    t_cal = time.perf_counter()
    inputs = capture_block_inputs(model, fam, batches, torch.float16, store=pool.new_list())
    head = capture_block_inputs(model, fam, batches, torch.float32, store=pool.new_list()) if calibrate else None
    staged = StagedTensors() if ccfg.abits < 16 else None  # CFP may add input_smooth vectors
    with contextlib.ExitStack() as stack:
        writer = None if staged is not None else stack.enter_context(ckpt.CheckpointWriter(cfg.output, specs,
                                                                                           cfg.model))
        sink = writer if staged is None else staged
        if staged is not None:
            stack.callback(staged.store.close)  # the scratch folder goes, whatever happens
        if table is not None and not calibrate:  # round-to-nearest, from the table loaded now
            w = source.model.get_submodule(fam.embedding_attr).weight.detach().float().cpu()
            name, mt, entries[name] = table_entry(fam.embedding_attr, w, table)
            for key, t in mt.items():
                sink.put(key, t)
            del w, mt
        source.release(model)  # the token table is no longer needed in memory
        folded: dict[str, list[int]] = {}
        init: dict | None = {} if cfg.init == "gptq" else None
        res = CBQResult({})
        held = StreamedBlocks(source, device, inputs, ccfg, lin_specs, init, folded, pool.new_list)
        planned = {n + ".weight" for n in linears}
        written = {fam.embedding_attr + ".weight"} if table is not None else set()  # source keys done

        def finish(i: int, qb: nn.Module) -> None:
            nonlocal head
            prefix = f"{fam.blocks_attr}.{i}"
            block = held.loaded[i]
            _write_back(block, qb, fam, prefix, res)  # the float block now holds the stored weights
            for rel in fam.linears:
                full = f"{prefix}.{rel}"
                qt = res.quantized.pop(full)
                mt = ckpt.matrix_tensors(full, qt.spec, qt, None, None, None)
                for key, t in mt.items():
                    sink.put(key, t)
                entries[full] = ckpt.MatrixEntry(qt.spec.name, 0, list(qt.shape), 0.0,
                                                 sum(t.numel() * t.element_size() for t in mt.values()), "linear")
                if init is not None:
                    init.pop(full, None)
            for key, t in block.state_dict().items():  # norms (CFP-folded), biases, input scales
                full = f"{prefix}.{key}"
                if full not in planned:
                    sink.put(full, t.detach().contiguous())
                    written.add(full)
            if head is not None:  # the LM head's inputs run through the finished (dequantised) model
                nxt = _run_into(pool.new_list(), lambda t, a, kw: block_forward(block, t, a, kw), head)
                head = head.with_hidden(nxt)
            held.release(i)

        cbq_windows(len(held), held, finish, fam, inputs, ccfg, res, callback, init, prefolded=init is not None,
                    new_list=pool.new_list)
        del inputs
        calib_seconds = time.perf_counter() - t_cal
        if calibrate:  # GPTQ's codes of the tied table as the head, on the final normed states
            name, norm = final_norm(source.model, fam)
            source.load_module(norm, name, device)
            with torch.no_grad():
                x = torch.cat([norm(h)[m].float().cpu() for h, m in zip(head.hidden, head.token_mask)])
            head = None
            source.release(norm)
            w = source.get(fam.embedding_attr + ".weight")
            tname, mt, entries[tname] = table_entry(fam.embedding_attr, w, table, x)
            for key, t in mt.items():
                sink.put(key, t)
            del w, mt, x
        if staged is not None:
            specs = {**specs, **staged.infos}
            writer = stack.enter_context(ckpt.CheckpointWriter(cfg.output, specs, cfg.model))
            staged.drain(writer)
        for key in source.stored:  # the rest as stored: the token table (unless quantised), final norm
            if key not in planned and key not in written:
                writer.put(key, source.get(key))
        lin_params = sum(source.stored[n + ".weight"].numel() for n in linears)
        total_bytes = sum(s.nbytes for s in specs.values())
        extra_info = {"window_losses": [round(x, 6) for x in res.losses],
                      "cfp_activation_channels": {**folded, **res.folded},
                      "cfp_truncated_weights": res.truncated}
        manifest = calibrated_manifest(cfg, fam.name, source.model.config.model_type, entries, lin_params,
                                       total_bytes, len(texts), extra_info, res.activations,
                                       None if table is None else ("gptq" if calibrate else "rtn"), fplan)
        writer.finish(manifest)
    if stats is not None:
        stats.update(peak_loaded_blocks=held.peak_loaded, peak_activation_bytes=pool.peak)
    return calibrated_report(cfg, manifest, calib_seconds, t0, fplan)
