"""``quantseal compress``: model folder → budgeted plan → compressed checkpoint folder.

1. open the model; the compressible matrices are its blocks' Linears (plus the token embedding
   when the budget is the whole file, ``budget_mb``).  A safetensors folder is streamed
   (:mod:`quantseal.lazy_source`): the model is a meta-device skeleton, each matrix is read from
   the file when a candidate evaluation or the final rebuild needs it, and results go straight
   into the checkpoint's files (:class:`quantseal.checkpoint.CheckpointWriter`), so peak memory is
   one matrix and its candidates, not the model.  GGUF folders, and data-aware runs of an encoder
   or on a GPU (their Fisher is the whole model's backward pass), load the model in memory;
2. data-aware: the output-sensitivity Fisher from calibration text (:mod:`.fisher`; a streamed
   decoder's block by block from the file, :mod:`.fisher_stream`, kept in a scratch file);
3. every (format, rank) candidate of every matrix is decomposed (:mod:`.lowrank`) on a process
   pool, giving its error and exact stored bytes;
4. the ILP (:mod:`.budget`) picks one candidate per matrix under the budget;
5. the chosen candidates are rebuilt (deterministically) and written (:mod:`..checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt
from ..devices import resolve_device, to_device
from ..errors import BadInput, BudgetInfeasible
from ..lazy_source import LazySource, TensorRef, open_source
from ..tensorfile import TensorInfo
from ..models import (blocks, compressible_linears, default_model_path, embedding, load_model, model_tokenizer,
                      source_files, source_weights)
from ..text import calibration_texts
from .budget import MatrixOptions, solve_allocation
from .decode_cost import DECODER_FAMILIES, candidate_cost_us
from .fisher import floor_fisher, output_fisher
from .formats import DEFAULT_FAMILIES, Candidate, FormatSpec, expand_families, max_useful_rank
from .lowrank import lq_decompose

DEFAULT_RANKS = (0, 8, 16, 32, 64)
EMBEDDING_FAMILIES = ("int4", "int8", "fp16", "fp32")
MB = 1_000_000
# ``--budget-mb`` bounds the exported file, not only its tensors: the ONNX graph (nodes, names,
# shapes) and quantseal's metadata took 175 KB for MiniLM (benchmarks/export_minilm.py).
GRAPH_RESERVE_BYTES = 256_000
# An int4f matrix adds ~8 nodes to the graph (its block-sum correction, export/lowbit.py): 1.7 KB per
# Linear in SmolLM2-135M's export (459 KB of graph against 200 KB for int4).  Reserved per planned
# matrix whenever int4f is a candidate, so a --budget-mb plan still bounds the file.
INT4F_GRAPH_BYTES = 1_800

Progress = Callable[[int, str], Callable[[int], None]]


def _no_progress(total: int, desc: str) -> Callable[[int], None]:
    return lambda n=1: None


def default_families(model: Path | None) -> tuple[str, ...]:
    """The candidate format families when ``--formats`` is not given: without nf4 for a decoder,
    whose nf4 matrices decode ~20x slower per token than int4 (:mod:`.decode_cost`)."""
    from ..models import FAMILY_BY_MODEL_TYPE, gguf_file

    path = Path(model) if model is not None else None
    if path is None or not path.is_dir():
        return DEFAULT_FAMILIES
    if gguf_file(path) is not None:
        return DECODER_FAMILIES
    try:
        import json

        fam = FAMILY_BY_MODEL_TYPE.get(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_FAMILIES
    return DECODER_FAMILIES if fam is not None and fam.name == "decoder" else DEFAULT_FAMILIES


@dataclass
class CompressConfig:
    """Everything ``quantseal compress`` takes.  Exactly one of ``budget_bits`` / ``budget_mb``."""

    output: Path
    model: Path | None = None
    budget_bits: float | None = None
    budget_mb: float | None = None
    method: str = "lq"  # "lq" | "rtn"
    data_aware: bool = False
    calib: Path | None = None
    calib_samples: int = 256
    ranks: tuple[int, ...] = DEFAULT_RANKS
    formats: tuple[str, ...] = DEFAULT_FAMILIES
    workers: int = 2
    ray: str | None = None  # Ray address for the candidate table (quantseal.distributed.ray_address)
    seed: int = 0
    max_iter: int = 4
    max_decode_ms: float | None = None  # bound on the plan's estimated per-token decode time (decode_cost)
    adapters: tuple = ()  # PEFT adapter folders whose ranks join the plan (adapter_budget)
    adapter_rank: str | int = "auto"
    device: str = "auto"  # where the Fisher and the LQ candidates compute (quantseal.devices)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.budget_bits is None) == (self.budget_mb is None):
            raise BadInput("give exactly one of --budget BITS and --budget-mb MB")
        if self.budget_bits is not None and not (0 < self.budget_bits <= 32):
            raise BadInput(f"--budget must be in (0, 32] bits per parameter, not {self.budget_bits}")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise BadInput(f"--budget-mb must be positive, not {self.budget_mb}")
        if self.method not in ("lq", "rtn"):
            raise BadInput(f"unknown method {self.method!r} (lq, rtn)")
        if any(r < 0 for r in self.ranks):
            raise BadInput("ranks must be non-negative")
        if self.max_decode_ms is not None and not (0 < self.max_decode_ms < float("inf")):
            raise BadInput(f"--max-decode-ms must be a positive number, not {self.max_decode_ms}")
        if self.adapters and self.max_decode_ms is not None:
            raise BadInput("--max-decode-ms with --adapter is not supported (no decode cost for adapter branches)")
        self.model = Path(self.model) if self.model is not None else default_model_path()
        self.output = Path(self.output)
        self.ranks = tuple(sorted(set(self.ranks) | {0})) if self.method == "lq" else (0,)
        expand_families(self.formats)  # validates the names early
        resolve_device(self.device)  # cuda without a GPU: one line, before any compute


def matrix_candidates(n: int, k: int, formats: list[FormatSpec], ranks: tuple[int, ...]) -> list[Candidate]:
    """Every (format, rank) worth decomposing for ``W: (n, k)``: ranks only on ≤ 4-bit
    formats (an 8-bit residual has nothing left for a low-rank branch) and only up to
    :func:`max_useful_rank`."""
    cap = max_useful_rank(n, k)
    out = []
    for fmt in formats:
        lowbit = fmt.kind != "fp" and fmt.bits <= 4
        for r in ranks:
            if r == 0 or (lowbit and r <= cap):
                out.append(Candidate(fmt, r))
    return out


def _evaluate(task) -> list[tuple[float, int]]:
    """Worker: (error, bytes) of every candidate of one matrix, computed with one torch thread
    wherever it runs (a float sum's order depends on the thread count: with the main process's
    threads the serial path differed from the pool's in the last bits, and the plan could too)."""
    w, fisher, cands, clip, max_iter, *device = task  # device: optional 6th item (default cpu)
    device = torch.device(device[0] if device else "cpu")
    if isinstance(w, TensorRef):  # streamed: the worker reads its matrix from the source file
        w = w.load()
    w = w.to(device)
    fisher = None if fisher is None else fisher_tensor(fisher).to(device)
    n, k = w.shape
    with one_torch_thread():
        return [(lq_decompose(w, c, fisher, max_iter=max_iter, clip_search=clip).error, c.stored_bytes(n, k))
                for c in cands]


@contextlib.contextmanager
def one_torch_thread():
    """Compute with one torch thread inside (restored after): the candidate table and the stored
    tensors are then the same floats whatever the machine's core count or the fan-out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def evaluate_candidates(tasks: list, workers: int, tick: Callable[[int], None],
                        ray: str | None = None) -> list[list[tuple[float, int]]]:
    """Map :func:`_evaluate` over matrices, in matrix order: serially, on a spawn-started process
    pool when workers > 1, or as Ray tasks when ``ray`` is an address
    (:mod:`quantseal.distributed`; the ILP stays here)."""
    from ..distributed import Fanout, fan_out

    return fan_out(_evaluate, tasks, Fanout(workers=max(1, workers), ray=ray), tick)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CandidateTable:
    """Steps 1–3 of the job: every candidate's error and bytes, ready for any budget."""

    model: torch.nn.Module  # on the meta device when streamed (``source`` set)
    fam: object
    targets: dict[str, tuple[torch.Tensor, str]]  # name → (weight (N, K), "linear" | "embedding")
    fisher: dict[str, torch.Tensor | None]
    cands: dict[str, list[Candidate]]
    options: list[MatrixOptions]
    fixed_bytes: int  # every tensor not planned, as stored
    linear_params: int  # Σ N·K over the planned Linears
    clip: bool
    max_iter: int
    source: LazySource | None = None  # the streamed source, else the model holds the weights
    device: str = "cpu"  # where the chosen candidates are rebuilt (as the table was evaluated)
    scratch: object = None  # a TemporaryDirectory holding streamed Fishers (fisher: TensorRefs into it)

    def weight(self, name: str) -> torch.Tensor:
        """Matrix ``name``'s float32 weight (N, K), read from the source file when streamed."""
        if self.source is not None:
            return self.source.get(name + ".weight")
        return self.targets[name][0].detach().float()

    def untouched(self) -> dict[str, torch.Tensor]:
        """Every stored tensor that is not planned (meta tensors when streamed: shapes only)."""
        planned = {n + ".weight" for n in self.targets}
        return {k: v for k, v in ckpt.stored_state(self.model).items() if k not in planned}

    def untouched_value(self, key: str) -> torch.Tensor:
        if self.source is not None:
            return self.source.get(key)
        return ckpt.stored_state(self.model)[key].detach().clone().contiguous()

    def budget_bytes(self, budget_bits: float | None = None, budget_mb: float | None = None) -> int:
        """Bytes the planned matrices may take: bits × Linear params / 8, or MB − fixed bytes −
        the reserve for the ONNX graph itself."""
        if budget_bits is not None:
            return math.floor(budget_bits * self.linear_params / 8)
        return math.floor(budget_mb * MB) - self.fixed_bytes - self.graph_reserve()

    def graph_reserve(self) -> int:
        """Bytes kept for the ONNX graph's nodes: :data:`GRAPH_RESERVE_BYTES`, plus
        :data:`INT4F_GRAPH_BYTES` per matrix when an int4f candidate is on the table."""
        offsets = any(c.fmt.kind == "intf" for cs in self.cands.values() for c in cs)
        return GRAPH_RESERVE_BYTES + (INT4F_GRAPH_BYTES * len(self.cands) if offsets else 0)


def build_candidate_table(cfg: CompressConfig, progress: Progress = _no_progress,
                          stream: bool = True) -> CandidateTable:
    """Open the model (streamed where it can be, see the module notes; ``stream=False`` loads
    it), estimate the Fisher (data-aware) and evaluate every candidate."""
    device = resolve_device(cfg.device)
    source = open_source(cfg.model) if stream else None
    if source is not None and cfg.data_aware and not streams_fisher(source, device):
        source = None  # an encoder's (or another family's) Fisher needs the loaded model
    if source is not None:
        model, fam = source.model, source.fam
    else:
        model, fam = load_model(cfg.model)
    linears = compressible_linears(model, fam)
    targets: dict[str, tuple[torch.Tensor, str]] = {n: (m.weight, "linear") for n, m in linears.items()}
    if cfg.budget_mb is not None:
        targets[fam.embedding_attr] = (embedding(model, fam).weight, "embedding")

    fisher: dict[str, torch.Tensor | TensorRef | None] = {n: None for n in targets}
    scratch = None
    if cfg.data_aware and source is not None:  # block by block from the file (compress/fisher_stream.py)
        from .fisher_stream import streamed_output_fisher

        scratch = tempfile.TemporaryDirectory(prefix="quantseal-fisher-")  # removed with the table
        fisher = streamed_output_fisher(source, fisher_batches(cfg), Path(scratch.name) / "fisher.safetensors",
                                        table=fam.embedding_attr in targets,
                                        progress=progress(len(blocks(model, fam)), "fisher"))
    elif cfg.data_aware:
        batches = fisher_batches(cfg)
        tick = progress(sum(len(b["input_ids"]) for b in batches), "fisher")
        model.to(device)
        raw = output_fisher(model, fam, to_device(batches, device), {n: p for n, (p, _) in targets.items()},
                            seed=cfg.seed, progress=tick)
        model.to("cpu")
        fisher = {n: floor_fisher(f) for n, f in raw.items()}

    lin_formats = expand_families(cfg.formats)
    # a float-offset format asked for the Linears is a table candidate too (GatherBlockQuantized + offsets)
    emb_formats = sorted(set(expand_families(EMBEDDING_FAMILIES)) | {f for f in lin_formats if f.kind == "intf"})
    clip = cfg.method == "lq"
    cands: dict[str, list[Candidate]] = {}
    tasks = []
    for n, (w, kind) in targets.items():
        rows, cols = w.shape
        cands[n] = (matrix_candidates(rows, cols, lin_formats, cfg.ranks) if kind == "linear"
                    else [Candidate(f) for f in emb_formats])
        tasks.append((_task_weight(source, w, n), fisher[n], cands[n], clip, cfg.max_iter, str(device)))
    results = evaluate_candidates(tasks, cfg.workers, progress(len(tasks), "candidates"), cfg.ray)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    options = [MatrixOptions(n, [c.name for c in cands[n]], [b for _, b in r], [e for e, _ in r],
                             _decode_costs(cands[n], targets[n], tied))
               for n, r in zip(targets, results)]
    state = ckpt.stored_state(model)
    planned = {n + ".weight" for n in targets}
    fixed = sum(_tensor_bytes(v) for k, v in state.items() if k not in planned)
    if fam.name == "decoder":  # the exported graph also holds the rotary tables (GroupQueryAttention's caches)
        from ..export.decoder_arch import arch_of, graph_table_bytes

        fixed += graph_table_bytes(arch_of(model.config.to_dict()))
    lin_params = sum(w.numel() for w, kind in targets.values() if kind == "linear")
    return CandidateTable(model, fam, targets, fisher, cands, options, fixed, lin_params, clip, cfg.max_iter, source,
                          str(device), scratch)


def streams_fisher(source: LazySource, device: torch.device) -> bool:
    """Whether a data-aware table can keep ``source`` streamed: a CPU run of a decoder whose
    block 0 reads the table lookup as is (:mod:`.fisher_stream`)."""
    from .fisher_stream import LOOKUP_IS_INPUT

    return device.type == "cpu" and source.fam.name == "decoder" and source.model.config.model_type in LOOKUP_IS_INPUT


def fisher_batches(cfg: CompressConfig) -> list[dict[str, torch.Tensor]]:
    """The Fisher's calibration batches: ``cfg.calib_samples`` texts, 16 per batch, in order."""
    texts = calibration_texts(cfg.calib, cfg.calib_samples)
    tok = model_tokenizer(cfg.model)
    return [{k: torch.from_numpy(v) for k, v in tok(texts[i:i + 16]).items()} for i in range(0, len(texts), 16)]


def fisher_tensor(f: torch.Tensor | TensorRef | None) -> torch.Tensor | None:
    """A Fisher as a tensor: read from its file when the table streamed it."""
    return f.load() if isinstance(f, TensorRef) else f


def _task_weight(source: LazySource | None, w: torch.Tensor, name: str):
    """What a candidate-evaluation task carries: a :class:`TensorRef` when streamed (the worker
    reads the matrix itself, so no process holds them all), else a float32 copy of the weight."""
    return source.ref(name + ".weight") if source is not None else w.detach().float().clone()


def _decode_costs(cands: list[Candidate], target: tuple[torch.Tensor, str], tied: bool) -> list[float]:
    """Estimated per-token µs of each candidate (:mod:`.decode_cost`): a Linear's product, a token
    table's only when a tied head multiplies by it (the lookup itself is a gather)."""
    w, kind = target
    n, k = w.shape
    if kind == "embedding" and not tied:
        return [0.0] * len(cands)
    return [candidate_cost_us(c, n, k) for c in cands]


def plan(table: CandidateTable, budget_bits: float | None = None, budget_mb: float | None = None,
         formats_label: str = "", max_decode_ms: float | None = None,
         extra: list[MatrixOptions] | None = None) -> list[int]:
    """Step 4: the ILP; an infeasible budget names the smallest feasible one.  ``extra``: more
    groups under the same budget (adapter ranks, :mod:`.adapter_budget`), chosen after the
    table's matrices in the returned list."""
    max_cost = None if max_decode_ms is None else 1000.0 * max_decode_ms
    try:
        return solve_allocation(table.options + list(extra or []), table.budget_bytes(budget_bits, budget_mb),
                                max_cost=max_cost)
    except BudgetInfeasible as exc:
        if getattr(exc, "min_cost", None) is not None:
            raise BudgetInfeasible(f"--max-decode-ms {max_decode_ms:g} is infeasible: the fastest plan is estimated "
                                   f"at {exc.min_cost / 1000:.3f} ms per token"
                                   + (f" with formats {formats_label}" if formats_label else "")) from None
        floor = exc.min_bytes
        if budget_bits is not None:
            need = f"{floor * 8 / table.linear_params:.4f} bits per parameter"
        else:
            need = f"{(floor + table.fixed_bytes + table.graph_reserve()) / MB:.4f} MB"
        raise BudgetInfeasible(f"budget is infeasible: the smallest feasible plan needs {need}"
                               + (f" with formats {formats_label}" if formats_label else "")) from None


def planned_specs(table: CandidateTable, choice: list[int]) -> dict[str, TensorInfo]:
    """Dtype and shape of every tensor the checkpoint of plan ``choice`` stores, known before any
    is computed (so the shard files are laid out up front)."""
    specs: dict[str, TensorInfo] = {}
    for (n, (w, _kind)), c_idx in zip(table.targets.items(), choice):
        specs.update(ckpt.matrix_specs(n, table.cands[n][c_idx], *w.shape))
    for k, v in table.untouched().items():
        specs[k] = TensorInfo(v.dtype, v.shape)
    return specs


def materialize_into(table: CandidateTable, choice: list[int], put: Callable[[str, torch.Tensor], None],
                     progress: Progress = _no_progress) -> dict[str, ckpt.MatrixEntry]:
    """Step 5, streamed: rebuild the chosen candidates one matrix at a time and hand every stored
    tensor to ``put(name, tensor)`` as soon as it exists; returns the manifest entries."""
    entries: dict[str, ckpt.MatrixEntry] = {}
    tick = progress(len(choice), "writing")
    for (n, (w, kind)), c_idx, opt in zip(table.targets.items(), choice, table.options):
        cand = table.cands[n][c_idx]
        fisher = fisher_tensor(table.fisher[n])
        with one_torch_thread():  # the same floats as the candidate table's evaluation
            res = lq_decompose(table.weight(n).to(table.device), cand,
                               None if fisher is None else fisher.to(table.device),
                               max_iter=table.max_iter, clip_search=table.clip).cpu()
        mt = ckpt.matrix_tensors(n, cand.fmt, res.qt, res.w_hat, res.l1, res.l2)
        stored = sum(_tensor_bytes(t) for t in mt.values())
        if stored != opt.bytes[c_idx]:  # the ILP's byte count must be the file's
            raise RuntimeError(f"{n}: {cand.name} stores {stored} bytes, planned {opt.bytes[c_idx]}")
        for key, t in mt.items():
            put(key, t)
        entries[n] = ckpt.MatrixEntry(cand.fmt.name, cand.rank, list(w.shape), res.error, stored, kind)
        del res, mt
        tick(1)
    for k in table.untouched():
        put(k, table.untouched_value(k))
    return entries


def materialize(table: CandidateTable, choice: list[int],
                progress: Progress = _no_progress) -> tuple[dict[str, torch.Tensor], dict[str, ckpt.MatrixEntry]]:
    """Step 5 in memory: every stored tensor and the manifest entries."""
    tensors: dict[str, torch.Tensor] = {}
    entries = materialize_into(table, choice, tensors.__setitem__, progress)
    return tensors, entries


def compress(cfg: CompressConfig, progress: Progress = _no_progress) -> dict:
    """Run the whole job; returns the report that ``--json`` prints.  The checkpoint's tensors
    are written as they are rebuilt (:class:`~quantseal.checkpoint.CheckpointWriter`)."""
    t0 = time.perf_counter()
    if cfg.output.exists() and not ckpt.is_checkpoint(cfg.output):
        raise BadInput(f"{cfg.output}: exists and is not a quantseal checkpoint; refusing to overwrite it")
    table = build_candidate_table(cfg, progress)
    adapters, ranked = [], []
    if cfg.adapters:
        from .adapter_budget import adapter_rank_options

        linears = {n: tuple(w.shape) for n, (w, kind) in table.targets.items() if kind == "linear"}
        fisher = {n: fisher_tensor(f) for n, f in table.fisher.items()}
        adapters, ranked = adapter_rank_options(cfg.adapters, linears, fisher, cfg.adapter_rank)
    t_solve = time.perf_counter()
    if cfg.budget_mb is not None and not cfg.adapters and cfg.ranks == (0,):  # packable: q/k/v share a format
        from .pack_groups import grouped_plan

        choice, _ = grouped_plan(table, cfg.budget_bits, cfg.budget_mb, ",".join(cfg.formats), cfg.max_decode_ms)
    else:
        choice = plan(table, cfg.budget_bits, cfg.budget_mb, ",".join(cfg.formats), cfg.max_decode_ms,
                      extra=[o.matrix_options() for o in ranked])
    solve_seconds = time.perf_counter() - t_solve
    choice, adapter_choice = choice[:len(table.options)], choice[len(table.options):]
    if adapters:  # the adapters fold into the materialised tensors: built in memory
        from .adapter_budget import fold_chosen

        tensors, entries = materialize(table, choice, progress)
        manifest = make_manifest(table, cfg, entries, tensors)
        folded, tensors, _ = fold_chosen(manifest, tensors, adapters, ranked, adapter_choice)
        manifest = make_manifest(table, cfg, folded.matrices, tensors)
        manifest.extra.update(adapters=folded.extra["adapters"], adapter_rank=folded.extra["adapter_rank"])
        ckpt.write_checkpoint(cfg.output, manifest, tensors, cfg.model, source_files(cfg.model, table.model))
    else:  # written as each matrix is rebuilt
        specs = planned_specs(table, choice)
        extra_files = {} if table.source is not None else source_files(cfg.model, table.model)
        with ckpt.CheckpointWriter(cfg.output, specs, cfg.model, extra_files) as writer:
            entries = materialize_into(table, choice, writer.put, progress)
            manifest = make_manifest(table, cfg, entries, specs)
            writer.finish(manifest)
    report = summarize(manifest, cfg.output)
    decode_us = sum(o.costs[c] for o, c in zip(table.options, choice))
    report.update(solver_seconds=round(solve_seconds, 4), seconds=round(time.perf_counter() - t0, 3),
                  decode_ms_estimate=round(decode_us / 1000, 6))
    if adapters:
        report["adapter_rank"] = manifest.extra["adapter_rank"]
    return report


def make_manifest(table: CandidateTable, cfg: CompressConfig, entries: dict[str, ckpt.MatrixEntry],
                  tensors: dict) -> ckpt.Manifest:
    """The manifest; ``tensors`` maps every stored name to its tensor or its
    :class:`~quantseal.tensorfile.TensorInfo` (only the sizes are read)."""
    lin_bytes = sum(e.bytes for e in entries.values() if e.kind == "linear")
    budget = {"kind": "bits" if cfg.budget_bits is not None else "mb",
              "asked": cfg.budget_bits if cfg.budget_bits is not None else cfg.budget_mb,
              "bits_per_param": lin_bytes * 8 / table.linear_params, "compressible_bytes": lin_bytes,
              "compressible_params": table.linear_params,
              "tensor_bytes": sum(_tensor_bytes(t) for t in tensors.values())}
    source_file = source_weights(cfg.model)
    source = {"path": str(cfg.model), "family": table.fam.name, "model_type": table.model.config.model_type,
              "sha256": ckpt.file_sha256(source_file) if source_file else None}
    return ckpt.Manifest(source=source, method=cfg.method, budget=budget, matrices=entries,
                         extra={"data_aware": cfg.data_aware, "seed": cfg.seed,
                                "calib": str(cfg.calib) if cfg.calib else "pydoc_data.topics"})


def summarize(manifest: ckpt.Manifest, output: Path) -> dict:
    """The ``--json`` report of a written checkpoint."""
    formats: dict[str, int] = {}
    for e in manifest.matrices.values():
        key = e.format + (f"+r{e.rank}" if e.rank else "")
        formats[key] = formats.get(key, 0) + 1
    b = manifest.budget
    return {
        "output": str(output),
        "method": manifest.method,
        "data_aware": manifest.extra.get("data_aware", False),
        "budget": b["asked"],
        "budget_kind": b["kind"],
        "bits_per_param": round(b["bits_per_param"], 6),
        "bytes": b["tensor_bytes"],
        "file_bytes": ckpt.tensor_files_bytes(output),
        "compressible_bytes": b["compressible_bytes"],
        "matrices": len(manifest.matrices),
        "formats": dict(sorted(formats.items())),
        "total_error": sum(e.error for e in manifest.matrices.values()),
    }
