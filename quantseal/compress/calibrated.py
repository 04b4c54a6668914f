"""``quantseal compress --method gptq|cbq``: calibrated quantisation → checkpoint.

Every compressible Linear gets the same format ``int{wbits}_b{block}`` (affine, float16 scales,
integer zero points: exactly MatMulNBits), or with ``--budget-mb`` the format the ILP planned for
it (:mod:`.calibrated_plan`).  A token table stored in an integer format (``--table`` or the
plan's) gets, when the head is tied to it, GPTQ's codes for it as the LM head
(:mod:`.head_table`), computed last, on the quantised model's head inputs.  The codes come from GPTQ (:mod:`.gptq`, the
calibrated baseline) or from CBQ's cross-block reconstruction (:mod:`.cbq`); the checkpoint is
an ordinary quantseal checkpoint (manifest ``method`` = gptq / cbq).  With ``abits < 16`` the
calibrated static activation scales are recorded in the manifest's ``extra["activations"]``
(``{linear name: {bits, scale, zero_point, signed}}``) for the exporter's QuantizeLinear /
DequantizeLinear pairs; CFP's exact activation folds live in the stored norm / Linear tensors.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..devices import resolve_device, to_device
from ..errors import BadInput
from ..lazy_source import open_source
from ..models import compressible_linears, default_model_path, final_norm, load_model
from ..text import calibration_texts
from .calibration import calibration_batches, capture_block_inputs
from .cbq import CBQConfig, StepCallback, cbq_quantize_model, gptq_init
from .formats import BLOCK_SIZES, FormatSpec, expand_families
from .gptq import DEFAULT_HESSIAN_TOKENS, gptq_quantize_model
from .quantizers import dequantize
from .spill import DEFAULT_ACTIVATION_MB

METHODS = ("gptq", "cbq")
WBITS = (2, 3, 4, 8)
ABITS = (4, 8, 16)


@dataclass
class CalibratedConfig:
    """Everything ``quantseal compress --method gptq|cbq`` takes."""

    output: Path
    model: Path | None = None
    method: str = "cbq"
    wbits: int = 4
    abits: int = 16
    block: int = 64
    window: int = 2
    rank: int = 8
    steps: int = 200
    init: str = "gptq"  # cbq's starting codes: "gptq" or "rtn"
    calib: Path | None = None
    calib_samples: int = 128
    batch_size: int = 16
    seed: int = 0
    table: str | None = None  # the token table's format, None: kept as is
    table_method: str = "gptq"  # a tied integer table: "gptq" calibrated as the head (head_table.py), or "rtn"
    budget_mb: float | None = None  # per-matrix formats from the ILP under this file size (calibrated_plan.py)
    formats: tuple[str, ...] = ("int4", "int8")  # the plan's candidate Linear formats (integer only)
    max_decode_ms: float | None = None  # the plan's bound on the estimated per-token decode time
    workers: int = 1  # the plan's candidate table
    activation_mb: float = DEFAULT_ACTIVATION_MB  # streamed GPTQ / CBQ: activations held in memory, the rest spilled
    device: str = "auto"  # where GPTQ / CBQ compute (quantseal.devices); results are written from the CPU
    hessian_tokens: int = DEFAULT_HESSIAN_TOKENS  # gptq: padded tokens per forward pass (gptq.py, max_tokens)
    gptq_order: str = "act"  # GPTQ's column order (gptq and cbq's gptq init): "act" (static groups) or "natural"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"unknown calibrated method {self.method!r} ({', '.join(METHODS)})")
        if self.wbits not in WBITS:
            raise BadInput(f"--wbits must be one of {WBITS}, not {self.wbits}")
        if self.abits not in ABITS:
            raise BadInput(f"--abits must be one of {ABITS}, not {self.abits}")
        if self.method == "gptq" and self.abits != 16:
            raise BadInput("GPTQ quantises weights only: use --abits 16 (or --method cbq)")
        if self.block not in BLOCK_SIZES:
            raise BadInput(f"--block must be one of {BLOCK_SIZES}, not {self.block}")
        if self.window < 1:
            raise BadInput(f"--window must be at least 1, not {self.window}")
        if self.rank < 0:
            raise BadInput(f"--rank must be non-negative, not {self.rank}")
        if self.init not in ("gptq", "rtn"):
            raise BadInput(f"--init must be gptq or rtn, not {self.init!r}")
        if self.steps < 1:
            raise BadInput(f"--steps must be at least 1, not {self.steps}")
        if self.calib_samples < 1:
            raise BadInput(f"--calib-samples must be at least 1, not {self.calib_samples}")
        resolve_device(self.device)  # cuda without a GPU: one line, before any compute
        if isinstance(self.hessian_tokens, bool) or not isinstance(self.hessian_tokens, int) or self.hessian_tokens < 1:
            raise BadInput(f"--hessian-tokens must be a positive integer, not {self.hessian_tokens}")
        if self.gptq_order not in ("act", "natural"):
            raise BadInput(f"--gptq-order must be act or natural, not {self.gptq_order!r}")
        if not self.activation_mb >= 0:
            raise BadInput(f"--activation-mb must be a non-negative number, not {self.activation_mb}")
        if self.table is not None:
            try:
                FormatSpec.parse(self.table)  # BadInput for an unknown name
            except BadInput as exc:
                raise BadInput(f"--table {self.table}: {exc}") from None
        if self.table_method not in ("gptq", "rtn"):
            raise BadInput(f"--table-method must be gptq or rtn, not {self.table_method!r}")
        if self.budget_mb is not None:
            if self.table is not None:
                raise BadInput("with --budget-mb the plan chooses the token table's format: drop --table")
            if self.method == "cbq" and self.init != "gptq":
                raise BadInput("--method cbq --budget-mb starts from GPTQ's codes in the planned formats: use --init gptq")
            if self.abits != 16:
                raise BadInput("--budget-mb with gptq/cbq plans weights only: use --abits 16")
            kinds = ("int",) if self.method == "cbq" else ("int", "intf")  # CBQ learns integer zero points only
            bad = [f.name for f in expand_families(self.formats) if f.kind not in kinds]
            if bad:
                raise BadInput(f"--method {self.method} writes integer formats, not {', '.join(bad)}")
        elif self.max_decode_ms is not None:
            raise BadInput("--max-decode-ms bounds a plan: give --budget-mb too")
        self.model = Path(self.model) if self.model is not None else default_model_path()
        self.output = Path(self.output)

    @property
    def spec(self) -> FormatSpec:
        return FormatSpec("int", self.wbits, self.block)

    def cbq(self) -> CBQConfig:
        return CBQConfig(wbits=self.wbits, abits=self.abits, block=self.block, window=self.window,
                         overlap=1 if self.window > 1 else 0, rank=self.rank, steps=self.steps, init=self.init,
                         seed=self.seed, gptq_order=self.gptq_order)


def linear_specs(cfg: CalibratedConfig, linears, fplan=None) -> dict[str, FormatSpec]:
    """Each Linear's stored format: the ``--budget-mb`` plan's, else ``--wbits``/``--block``'s."""
    return {n: fplan.formats[n] if fplan is not None else cfg.spec for n in linears}


def table_spec(cfg: CalibratedConfig, fplan=None) -> FormatSpec | None:
    """The token table's stored format: the plan's, else ``--table``'s (None: kept as is)."""
    if fplan is not None:
        return fplan.formats[fplan.table] if fplan.table is not None else None
    return FormatSpec.parse(cfg.table) if cfg.table is not None else None


def calibrates_table(cfg: CalibratedConfig, config, family: str, table: FormatSpec | None) -> bool:
    """Whether the table's codes are GPTQ's for it as the LM head (:mod:`.head_table`): a tied
    decoder table in an integer format, ``--table-method gptq``; else round to nearest."""
    tied = bool(getattr(config, "tie_word_embeddings", False)) and family == "decoder"
    return table is not None and tied and cfg.table_method == "gptq" and table.kind in ("int", "intf")


def _no_callback(stage: str, done: int, total: int, info: dict) -> None:
    pass


def _table_entry(model, fam, spec: FormatSpec, batches: list | None = None):
    """The token table stored in ``spec``: ``(name, stored tensors, manifest entry)``.

    With ``batches`` (a tied table in an integer format, ``--table-method gptq``) its codes are
    GPTQ's for the table as the LM head, on the head inputs of ``model`` as it is now (its block
    Linears already quantised): :mod:`.head_table`; else round-to-nearest with the MSE clip search,
    as the budgeted planner's candidates.  The manifest entry's error is the head's squared output
    error ‖(E − Ê)Xᵀ‖² when calibrated, else the table's own ‖E − Ê‖²."""
    from ..models import embedding
    from .head_table import head_inputs

    w = embedding(model, fam).weight.detach().float().cpu()  # written from the CPU (--device)
    x = head_inputs(model, batches) if batches is not None and spec.kind != "fp" else None
    return table_entry(fam.embedding_attr, w, spec, x)


def table_entry(name: str, w: torch.Tensor, spec: FormatSpec, x: torch.Tensor | None = None):
    """:func:`_table_entry` of the table ``w: (V, H)`` float32, given the head inputs
    ``x: (n, H)`` for a calibrated table (None: round-to-nearest).  Streamed CBQ
    (:mod:`.cbq_stream`) gathers ``x`` block by block and calls this."""
    from .head_table import calibrate_table, head_error
    from .quantizers import quantize, round_float

    if spec.kind == "fp":
        w_hat, qt = round_float(w, spec), None
        error = float(((w - w_hat) ** 2).sum())
    elif x is not None:
        qt = calibrate_table(w, x, spec)
        w_hat = dequantize(qt)
        error = head_error(w, w_hat, x)
    else:
        qt = quantize(w, spec)
        w_hat = dequantize(qt)
        error = float(((w - w_hat) ** 2).sum())
    mt = ckpt.matrix_tensors(name, spec, qt, w_hat, None, None)
    stored = sum(t.numel() * t.element_size() for t in mt.values())
    return name, mt, ckpt.MatrixEntry(spec.name, 0, list(w.shape), error, stored, "embedding")


def calibrated_compress(cfg: CalibratedConfig, callback: StepCallback = _no_callback, stream: bool = True) -> dict:
    """Run GPTQ or CBQ and write the checkpoint; returns the report ``--json`` prints.  Uniform
    GPTQ of a safetensors decoder (no ``--budget-mb`` plan, no head-calibrated table) is streamed,
    one block in memory (:mod:`.streaming`), and so is CBQ without a plan, one window of blocks
    (:mod:`.cbq_stream`); ``stream=False`` loads the whole model, the same bytes."""
    t0 = time.perf_counter()
    if cfg.output.exists() and not ckpt.is_checkpoint(cfg.output):
        raise BadInput(f"{cfg.output}: exists and is not a quantseal checkpoint; refusing to overwrite it")
    fplan = None
    if cfg.budget_mb is not None:
        from .calibrated_plan import plan_formats

        fplan = plan_formats(cfg.model, cfg.budget_mb, tuple(cfg.formats), cfg.max_decode_ms, cfg.calib,
                             cfg.calib_samples, seed=cfg.seed, workers=cfg.workers)
    torch.manual_seed(cfg.seed)
    source = open_source(cfg.model) if stream and cfg.method == "gptq" else None
    if source is not None and source.fam.name == "decoder":  # one block in memory at a time (a plan too)
        from .streaming import stream_gptq

        if final_norm(source.model, source.fam) is not None:
            return stream_gptq(cfg, source, callback, t0, fplan)
    if stream and cfg.method == "cbq":  # a window of blocks in memory at a time (a plan too)
        from .cbq_stream import can_stream, stream_cbq

        source = open_source(cfg.model)
        if source is not None and can_stream(cfg, source, fplan):
            return stream_cbq(cfg, source, callback, t0, fplan=fplan)
    model, fam = load_model(cfg.model)
    linears = compressible_linears(model, fam)
    texts = calibration_texts(cfg.calib, cfg.calib_samples)
    batches = calibration_batches(cfg.model, texts, cfg.batch_size)
    specs = linear_specs(cfg, linears, fplan)
    table = table_spec(cfg, fplan)
    t_cal = time.perf_counter()
    activations: dict[str, dict] = {}
    extra_info: dict = {}
    if cfg.method == "gptq":
        device = resolve_device(cfg.device)
        model.to(device)
        inputs = capture_block_inputs(model, fam, to_device(batches, device), torch.float32)
        done = [0]

        def tick(what: str) -> None:
            done[0] += 1
            callback("gptq", done[0], len(linears), {"layer": what})

        quantized = gptq_quantize_model(model, fam, inputs, specs, tick=tick, max_tokens=cfg.hessian_tokens,
                                        act_order=cfg.gptq_order == "act")
        model.to("cpu")  # results are written from the CPU
    else:
        device = resolve_device(cfg.device)  # the float model, activations and CBQ's parameters on it
        model.to(device)
        inputs = capture_block_inputs(model, fam, to_device(batches, device), torch.float16)
        ccfg = cfg.cbq()
        init, folded = gptq_init(model, fam, inputs, ccfg, specs) if cfg.init == "gptq" else (None, {})
        res = cbq_quantize_model(model, fam, inputs, ccfg, callback, init=init)
        quantized, activations = res.quantized, res.activations
        model.to("cpu")  # results are written from the CPU
        extra_info = {"window_losses": [round(x, 6) for x in res.losses],
                      "cfp_activation_channels": {**folded, **res.folded},
                      "cfp_truncated_weights": res.truncated}
    calib_seconds = time.perf_counter() - t_cal

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, ckpt.MatrixEntry] = {}
    for name, lin in linears.items():
        qt = quantized[name]
        w_hat = dequantize(qt)
        assert torch.equal(w_hat, lin.weight.detach()), name  # the model holds exactly the stored weights
        assert qt.spec == specs[name], (name, qt.spec)
        mt = ckpt.matrix_tensors(name, qt.spec, qt, None, None, None)
        tensors.update(mt)
        stored = sum(t.numel() * t.element_size() for t in mt.values())
        assert stored == qt.spec.stored_bytes(*qt.shape), (name, stored)
        entries[name] = ckpt.MatrixEntry(qt.spec.name, 0, list(qt.shape), 0.0, stored, "linear")
    planned = {n + ".weight" for n in linears}
    if table is not None:
        calibrate = calibrates_table(cfg, model.config, fam.name, table)
        name, mt, entry = _table_entry(model, fam, table, batches if calibrate else None)
        tensors.update(mt)
        entries[name] = entry
        planned.add(name + ".weight")
    state = ckpt.stored_state(model)
    for k, v in state.items():
        if k not in planned:
            tensors[k] = v.detach().clone().contiguous()

    lin_params = sum(l.weight.numel() for l in linears.values())
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    table_method = None if table is None else ("gptq" if calibrate else "rtn")
    manifest = calibrated_manifest(cfg, fam.name, model.config.model_type, entries, lin_params, total_bytes,
                                   len(texts), extra_info, activations, table_method, fplan)
    ckpt.write_checkpoint(cfg.output, manifest, tensors, cfg.model)
    return calibrated_report(cfg, manifest, calib_seconds, t0, fplan)


def calibrated_manifest(cfg: CalibratedConfig, family: str, model_type: str, entries: dict[str, ckpt.MatrixEntry],
                        lin_params: int, total_bytes: int, n_texts: int, extra_info: dict, activations: dict,
                        table_method: str | None = None, fplan=None) -> ckpt.Manifest:
    """The manifest of a GPTQ / CBQ checkpoint (``total_bytes``: every stored tensor's bytes)."""
    lin_bytes = sum(e.bytes for e in entries.values())
    bits_pp = lin_bytes * 8 / lin_params
    budget = {"kind": "uniform" if fplan is None else "mb", "asked": cfg.budget_mb, "bits_per_param": bits_pp, "compressible_bytes": lin_bytes,
              "compressible_params": lin_params, "tensor_bytes": total_bytes}
    source_file = next(iter(sorted(Path(cfg.model).glob("*.safetensors"))), None)
    source = {"path": str(cfg.model), "family": family, "model_type": model_type,
              "sha256": ckpt.file_sha256(source_file) if source_file else None}
    extra = {"seed": cfg.seed, "calib": str(cfg.calib) if cfg.calib else "pydoc_data.topics",
             "calib_samples": n_texts, "wbits": cfg.wbits, "abits": cfg.abits, "block": cfg.block,
             "stored_bits": cfg.spec.stored_bits, **extra_info, **cfg.extra}
    if table_method is not None:
        extra["table_method"] = table_method
    if cfg.method == "gptq" or cfg.init == "gptq":
        extra["gptq_order"] = cfg.gptq_order
    if fplan is not None:
        extra["plan"] = {"budget_mb": cfg.budget_mb, "formats": list(cfg.formats), "max_decode_ms": cfg.max_decode_ms,
                         "planned_bytes": fplan.planned_bytes, "decode_ms_estimate": round(fplan.decode_ms, 6),
                         "pack_groups": len(fplan.groups or [])}
    if cfg.method == "cbq":
        extra.update({"window": cfg.window, "rank": cfg.rank, "steps": cfg.steps, "init": cfg.init})
    if activations:
        extra["activations"] = activations
    return ckpt.Manifest(source=source, method=cfg.method, budget=budget, matrices=entries, extra=extra)


def calibrated_report(cfg: CalibratedConfig, manifest: ckpt.Manifest, calib_seconds: float, t0: float,
                      fplan=None) -> dict:
    """What ``--json`` prints for a written GPTQ / CBQ checkpoint."""
    b = manifest.budget
    return {
        "output": str(cfg.output),
        "method": cfg.method,
        "format": cfg.spec.name if fplan is None else "planned",
        "formats": dict(sorted(Counter(e.format for e in manifest.matrices.values()).items())),
        "wbits": cfg.wbits,
        "abits": cfg.abits,
        "bits_per_param": round(b["bits_per_param"], 6),
        "bytes": b["tensor_bytes"],
        "file_bytes": ckpt.tensor_files_bytes(cfg.output),
        "compressible_bytes": b["compressible_bytes"],
        "matrices": len(manifest.matrices),
        "calibration_seconds": round(calib_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
