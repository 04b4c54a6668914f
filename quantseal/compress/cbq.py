"""CBQ cross-block reconstruction (Ding et al. 2024, "CBQ: Cross-Block Quantization for Large
Language Models", §3.1–3.2), producing plain blockwise INT-k codes in our exact format.

The quantised Linear (step sizes, LoRA-Rounding of the codes, eq. 5) and the static activation
quantiser are :mod:`.cbq_linear`'s :class:`~.cbq_linear.CBQLinear` and :class:`~.cbq_linear.ActQuantizer`.

Loss of a window of k blocks (eq. 6–7), over real (non-padding) tokens:

    L = ‖h_fp − h_q‖² / ‖h_fp‖² + KL(softmax h_fp ‖ softmax h_q) + λ L₀ · mean(1 − |2h − 1|^β)

with β annealed linearly 20 → 2 after a warm-up without the rounding term (AdaRound §3.3), and
L₀ the window's loss at its round-to-nearest start (so λ is scale-free).
Windows of k consecutive blocks slide with overlap 1 (stride k − 1): a block shared by two
windows keeps its parameters and is trained again; the hard-rounded output of the blocks a
window finalises is the next window's quantised input, the float model's output its target.
The window loop (:func:`cbq_windows`) does not care who holds the blocks: the whole model here, one
window read from the safetensors source at a time in :mod:`.cbq_stream` (the same bytes).
"""

from __future__ import annotations

import copy
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BadInput
from ..models import Family, blocks
from .calibration import BlockInputs, block_forward
from .cfp import activation_channel_scales, fold_activation_scale, fold_sites, truncate_weight_outliers
from .cbq_linear import CBQLinear, _round_ste
from .formats import FormatSpec
from .quantizers import QuantizedTensor, dequantize
from .smoothing import smooth_linear_input

StepCallback = Callable[[str, int, int, dict], None]  # (stage, done, total, info)


def kl_term(h_fp: torch.Tensor, h_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax h_fp ‖ softmax h_q) along the hidden axis.  (n, H) → ()"""
    return F.kl_div(F.log_softmax(h_q, -1), F.log_softmax(h_fp, -1), log_target=True, reduction="batchmean")


def reconstruction_loss(h_fp: torch.Tensor, h_q: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖h_fp − h_q‖² / ‖h_fp‖², KL term) over real tokens.  h: (B, T, H), mask: (B, T) bool."""
    a, b = h_fp[mask].float(), h_q[mask]
    rel = ((a - b) ** 2).sum() / (a * a).sum().clamp(min=1e-12)
    return rel, kl_term(a, b)


@dataclass
class CBQConfig:
    """Settings of one CBQ run (defaults sized for MiniLM on 2 CPU cores)."""

    wbits: int = 4
    abits: int = 16
    block: int = 64
    window: int = 2
    overlap: int = 1
    rank: int = 8
    steps: int = 200
    lr_scale: float = 2e-3
    # Adam moves every entry of A1 by ~lr per step, so V = V₀ + A1·A2 moves by ~√r·lr·steps:
    # 1e-3 lets a few hundred steps flip the roundings that matter; 1e-2 flipped them wholesale
    # (worse than round-to-nearest on MiniLM)
    lr_round: float = 1e-3
    lr_act: float = 2e-3
    lam: float = 1.0  # rounding-term weight, relative to the window's round-to-nearest loss
    kl_weight: float = 1.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    hard_forward: bool = True  # train through the hard rounding (straight-through)
    init: str = "rtn"  # starting codes: "rtn" (round-to-nearest, AdaRound init) or "gptq"
    # CFP weight truncation is off by default: MiniLM's few weight outliers (e.g. 7.9 where the
    # kept range ends at 1.2) are real, and blockwise scales already isolate them to one block
    cfp_weights: bool = False
    cfp_activations: bool = True  # folds only when activations are quantised (abits < 16)
    # where no layer can absorb CFP's scale (post-LN residual, GELU): an explicit x / s in front
    # of the Linear (smoothing.py); off = only exact folds, the rest quantised as they are
    cfp_smooth: bool = True
    seed: int = 0
    gptq_order: str = "act"  # init="gptq": GPTQ's column order ("act", static groups, or "natural")

    def __post_init__(self) -> None:
        if self.window < 1 or self.rank < 0 or self.steps < 1 or not 0 <= self.overlap < max(self.window, 1):
            raise BadInput(f"CBQ needs window ≥ 1, 0 ≤ overlap < window, rank ≥ 0 and steps ≥ 1 "
                           f"(got window {self.window}, overlap {self.overlap}, rank {self.rank}, steps {self.steps})")
        if self.init not in ("rtn", "gptq"):
            raise BadInput(f"CBQ init must be rtn or gptq, not {self.init!r}")

    @property
    def spec(self) -> FormatSpec:
        return FormatSpec("int", self.wbits, self.block)


@dataclass
class LQStart:
    """What LQ+CBQ keeps from an LQ plan: each planned Linear's frozen low-rank branch (L1, L2)
    and, for matrices in a non-integer format (NF4, float), the whole compressed module."""

    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class CBQResult:
    quantized: dict[str, QuantizedTensor]
    activations: dict[str, dict] = field(default_factory=dict)  # linear name → ActQuantizer.export()
    truncated: dict[str, int] = field(default_factory=dict)  # CFP weight outliers per matrix
    folded: dict[str, list[int]] = field(default_factory=dict)  # CFP activation outlier channels
    losses: list[float] = field(default_factory=list)  # final training loss of every window


def window_starts(n_blocks: int, window: int, overlap: int) -> list[int]:
    """First block of every window: stride ``window − overlap``, the last window ends at the last block."""
    window = min(window, n_blocks)
    stride = max(window - overlap, 1)
    starts = list(range(0, n_blocks - window + 1, stride))
    if starts[-1] != n_blocks - window:
        starts.append(n_blocks - window)
    return starts


def _quant_block(block: nn.Module, fam: Family, cfg: CBQConfig, gen: torch.Generator,
                 truncated: dict, prefix: str, init: dict[str, QuantizedTensor] | None = None,
                 lq: LQStart | None = None) -> nn.Module:
    """A deep copy of ``block`` whose compressible Linears are :class:`CBQLinear`."""
    from .qlinear import set_submodule

    qb = copy.deepcopy(block)
    for rel in fam.linears:
        lin = qb.get_submodule(rel)
        w = None
        if cfg.cfp_weights:
            w, n = truncate_weight_outliers(lin.weight.detach().float())
            truncated[f"{prefix}.{rel}"] = n
        full = f"{prefix}.{rel}"
        if lq is not None and full in lq.frozen:  # a non-integer LQ format: kept as it is
            set_submodule(qb, rel, copy.deepcopy(lq.frozen[full]))
            continue
        start = None if init is None else init[full]
        lowrank = None if lq is None else lq.lowrank.get(full)
        if lowrank is not None:  # Q approximates the residual W − L1 L2
            w = lin.weight.detach().float() - lowrank[0].float() @ lowrank[1].float()
        spec = start.spec if start is not None else cfg.spec
        set_submodule(qb, rel, CBQLinear(lin, spec, cfg.rank, cfg.abits, w, gen, cfg.hard_forward, start, lowrank))
    for p in qb.parameters():
        p.requires_grad_(False)
    for m in qb.modules():
        if isinstance(m, CBQLinear):
            for p in m.parameters():
                p.requires_grad_(True)
    return qb.train(False)


@torch.no_grad()
def _prepare_float_block(block: nn.Module, fam: Family, x: BlockInputs, cfg: CBQConfig,
                         folded: dict, prefix: str, act_samples: dict, fold: bool = True,
                         out: MutableSequence | None = None) -> MutableSequence:
    """Run the float block over ``x`` (returning its float32 outputs, appended to ``out`` when
    given) while collecting activation statistics; CFP folds activation outlier scales into the
    block (output unchanged) unless ``fold`` is False (already folded by :func:`cfp_prefold`)."""
    sites = fold_sites(fam, block) if (fold and cfg.abits < 16 and cfg.cfp_activations) else []
    chmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {rel: [] for rel in fam.linears} if cfg.abits < 16 else {}
    handles = []
    state = {}
    for rel in (fam.linears if cfg.abits < 16 else ()):
        def hook(_m, args, _rel=rel):
            a = args[0][state["mask"]].float()
            chmax[_rel] = torch.maximum(chmax[_rel], a.abs().amax(0)) if _rel in chmax else a.abs().amax(0)
            samples[_rel].append(a)
        handles.append(block.get_submodule(rel).register_forward_pre_hook(hook))
    outs = [] if out is None else out
    try:
        for h, a, kw, m in zip(x.hidden, x.args, x.kwargs, x.token_mask):
            state["mask"] = m
            outs.append(block_forward(block, h, a, kw).float())
    finally:
        for hd in handles:
            hd.remove()
    covered = set()
    for producer, consumers, first in sites:
        s = activation_channel_scales(chmax[first])
        for rel in fam.linears:
            if block.get_submodule(rel) in consumers:
                covered.add(rel)
                if bool((s > 1).any()):
                    samples[rel] = [t / s for t in samples[rel]]
        if bool((s > 1).any()):
            fold_activation_scale(producer, consumers, s)
            folded[f"{prefix}.{first}"] = torch.nonzero(s > 1).flatten().tolist()
    if fold and cfg.abits < 16 and cfg.cfp_activations and cfg.cfp_smooth:
        for rel in fam.linears:  # no producer can absorb the scale: an explicit x / s (smoothing.py)
            if rel in covered:
                continue
            s = activation_channel_scales(chmax[rel])
            if bool((s > 1).any()):
                smooth_linear_input(block.get_submodule(rel), s)
                samples[rel] = [t / s for t in samples[rel]]
                folded[f"{prefix}.{rel}"] = torch.nonzero(s > 1).flatten().tolist()
    for rel, ts in samples.items():
        act_samples[rel] = torch.cat(ts) if ts else torch.zeros(1)
    return outs


def cbq_quantize_model(model: nn.Module, fam: Family, inputs: BlockInputs, cfg: CBQConfig,
                       callback: StepCallback | None = None,
                       init: dict[str, QuantizedTensor] | None = None, lq: LQStart | None = None) -> CBQResult:
    """Windowed cross-block reconstruction over all blocks of ``model`` (float32, eval).

    ``inputs``: block 0's captured calibration inputs.  ``init``: starting codes per Linear (e.g.
    GPTQ's, see :func:`gptq_init`); default round-to-nearest.  ``lq``: an LQ plan's low-rank
    branches (frozen, in the loop) and its non-integer matrices (kept); ``init`` then holds its
    integer matrices' codes (:func:`lq_start`).  On return the model's compressible
    Linears hold the dequantised hard-rounded weights (and CFP's exact activation folds)."""
    if init is not None and cfg.cfp_weights:
        raise ValueError("CFP weight truncation changes W; it cannot start from codes computed before it")
    blist = blocks(model, fam)
    res = CBQResult({})

    def finish(i: int, qb: nn.Module) -> None:
        _write_back(blist[i], qb, fam, f"{fam.blocks_attr}.{i}", res)

    # with given codes, CFP's activation folds were made before them
    return cbq_windows(len(blist), blist.__getitem__, finish, fam, inputs, cfg, res, callback, init, lq,
                       prefolded=init is not None)


def cbq_windows(n: int, block_at: Callable[[int], nn.Module], finish: Callable[[int, nn.Module], None],
                fam: Family, inputs: BlockInputs, cfg: CBQConfig, res: CBQResult,
                callback: StepCallback | None = None, init: dict[str, QuantizedTensor] | None = None,
                lq: LQStart | None = None, prefolded: bool = False,
                new_list: Callable[[], MutableSequence] = list) -> CBQResult:
    """The window loop of :func:`cbq_quantize_model` over ``n`` blocks, whoever holds them.

    ``block_at(i)``: float block i (float32, eval; called on each visit, in increasing order of
    first visits, before its starting codes ``init`` are read, so a streamed caller may load the
    block and add its codes then); ``finish(i, qb)``: block i is final (``qb`` its hard-rounded
    CBQ copy; :func:`_write_back` it), no later window touches it.  ``new_list()``: an empty list
    for one stream of per-batch hidden states (a :class:`~.spill.SpillStore` to bound memory).
    Held at once: the window's float and CBQ blocks, the float and quantised streams at the
    window's first block and the float outputs of each window block."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = window_starts(n, cfg.window, cfg.overlap)
    dtype = inputs.hidden[0].dtype
    qblocks: dict[int, nn.Module] = {}
    x_fp, x_q = inputs, inputs  # float and quantised streams at the current window's first block
    done = 0  # blocks finalised so far
    for wi, a in enumerate(starts):
        b = min(a + cfg.window, n)
        # float targets of the window; first visits prepare the block (CFP, activation init)
        h = x_fp.hidden
        fp_outs: dict[int, MutableSequence] = {}
        for i in range(a, b):
            cur = x_fp.with_hidden(h)
            block = block_at(i)
            if i not in qblocks:
                samples: dict[str, torch.Tensor] = {}
                h = _prepare_float_block(block, fam, cur, cfg, res.folded, f"{fam.blocks_attr}.{i}", samples,
                                         fold=not prefolded, out=new_list())
                qblocks[i] = _quant_block(block, fam, cfg, gen, res.truncated, f"{fam.blocks_attr}.{i}", init, lq)
                for rel, smp in samples.items():
                    act = qblocks[i].get_submodule(rel).act
                    if act is not None:
                        act.init_from(smp)
                del samples
            else:
                h = _run_into(new_list(), lambda t, ar, kw: block_forward(block, t, ar, kw).float(), cur)
            fp_outs[i] = h
        targets = h
        last = wi == len(starts) - 1
        res.losses.append(_train_window([qblocks[i] for i in range(a, b)], x_q, targets, cfg, gen,
                                        wi, len(starts), callback))
        del targets, h, cur
        # finalise the blocks no later window touches; advance both streams past them
        stop = b if last else starts[wi + 1]
        for i in range(done, stop):
            qb = qblocks.pop(i)
            for m in qb.modules():
                if isinstance(m, CBQLinear):
                    m.hard = True
            x_q = x_q.with_hidden(_run_into(new_list(), lambda t, ar, kw: block_forward(qb, t, ar, kw).to(dtype), x_q))
            out = new_list()
            for t in fp_outs.pop(i):
                out.append(t.to(dtype))
            x_fp = x_fp.with_hidden(out)
            finish(i, qb)
            del qb
        done = stop
    return res


@torch.no_grad()
def _run_into(out: MutableSequence, fn: Callable, x: BlockInputs) -> MutableSequence:
    """``fn(hidden, args, kwargs)`` of every batch of ``x``, appended to ``out``."""
    for t, ar, kw in zip(x.hidden, x.args, x.kwargs):
        out.append(fn(t, ar, kw))
    return out


def _write_back(block: nn.Module, qb: nn.Module, fam: Family, prefix: str, res: CBQResult) -> None:
    with torch.no_grad():
        for rel in fam.linears:
            ql = qb.get_submodule(rel)
            if not isinstance(ql, CBQLinear):  # an LQ matrix kept as it is
                block.get_submodule(rel).weight.data = ql.effective_weight()
                continue
            qt = ql.to_quantized()  # on the CPU (what is written)
            w = dequantize(qt).to(ql.s0.device)
            block.get_submodule(rel).weight.data = w if ql.l1 is None else w + ql.l1 @ ql.l2
            res.quantized[f"{prefix}.{rel}"] = qt
            if ql.act is not None:
                res.activations[f"{prefix}.{rel}"] = ql.act.export()


def _train_window(qblocks: list[nn.Module], x_q: BlockInputs, targets: list[torch.Tensor], cfg: CBQConfig,
                  gen: torch.Generator, wi: int, n_windows: int, callback: StepCallback | None) -> float:
    """Adam on the window's step sizes, LoRA-Rounding factors and activation scales."""
    qlins = [m for qb in qblocks for m in qb.modules() if isinstance(m, CBQLinear)]
    groups = [{"params": [m.log_scale for m in qlins], "lr": cfg.lr_scale}]
    rnd = [p for m in qlins if m.rank > 0 for p in (m.a1, m.a2)]
    if rnd:
        groups.append({"params": rnd, "lr": cfg.lr_round})
    acts = [m.act.log_scale for m in qlins if m.act is not None]
    if acts:
        groups.append({"params": acts, "lr": cfg.lr_act})
    opt = torch.optim.Adam(groups)
    nb = len(targets)
    # λ is relative to the window's loss at its hard-rounded (round-to-nearest) start, so the
    # rounding term weighs the same against reconstruction whatever the scale of the hidden states
    reg_weight = cfg.lam * _hard_loss(qblocks, qlins, x_q, targets, cfg) if rnd else 0.0
    order: list[int] = []
    warm = int(cfg.warmup * cfg.steps)
    loss_val = float("nan")
    for step in range(cfg.steps):
        if not order:
            order = torch.randperm(nb, generator=gen).tolist()
        j = order.pop()
        h = x_q.hidden[j].float()
        for qb in qblocks:
            h = block_forward(qb, h, x_q.args[j], x_q.kwargs[j])
        rec, kl = reconstruction_loss(targets[j], h, x_q.token_mask[j])
        loss = rec + cfg.kl_weight * kl
        if rnd and step >= warm:
            frac = (step - warm) / max(cfg.steps - warm - 1, 1)
            beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac
            reg, cnt = zip(*(m.regularizer(beta) for m in qlins))
            loss = loss + reg_weight * sum(reg) / max(sum(cnt), 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
        if callback:
            callback("cbq", wi * cfg.steps + step + 1, n_windows * cfg.steps,
                     {"window": wi + 1, "windows": n_windows, "step": step + 1, "loss": loss_val,
                      "rec": float(rec.detach()), "kl": float(kl.detach())})
    return loss_val


@torch.no_grad()
def _hard_loss(qblocks: list[nn.Module], qlins: list[CBQLinear], x_q: BlockInputs, targets: list[torch.Tensor],
               cfg: CBQConfig, max_batches: int = 4) -> float:
    """Mean window loss (reconstruction + KL) with the current rounding hardened."""
    for m in qlins:
        m.hard = True
    total = 0.0
    try:
        use = range(min(max_batches, len(targets)))
        for j in use:
            h = x_q.hidden[j].float()
            for qb in qblocks:
                h = block_forward(qb, h, x_q.args[j], x_q.kwargs[j])
            rec, kl = reconstruction_loss(targets[j], h, x_q.token_mask[j])
            total += float(rec + cfg.kl_weight * kl)
    finally:
        for m in qlins:
            m.hard = False
    return total / len(use)


@torch.no_grad()
def output_error(block_fn: Callable[[torch.Tensor], torch.Tensor], x: BlockInputs, targets: list[torch.Tensor]) -> float:
    """Σ‖h_fp − h_q‖² / Σ‖h_fp‖² over real tokens (for tests and reports)."""
    num = den = 0.0
    for j, t in enumerate(targets):
        m = x.token_mask[j]
        h = block_fn(j)
        num += float(((t[m].float() - h[m]) ** 2).sum())
        den += float((t[m].float() ** 2).sum())
    return num / max(den, 1e-30)


def attach_activation_quant(model: nn.Module, activations: dict[str, dict]) -> list:
    """Fake-quantise the inputs of the named Linears of a (loaded) model with the calibrated
    static scales (the torch reference for QDQ exports).  Returns the hook handles."""
    handles = []
    for name, p in activations.items():
        s, z, qmax = float(p["scale"]), float(p["zero_point"]), 2 ** int(p["bits"]) - 1

        def hook(_m, args, _s=s, _z=z, _q=qmax):
            x = args[0]  # after any input smoothing (its hook was registered first)
            return ((torch.clamp(_round_ste(x / _s) + _z, 0, _q) - _z) * _s,) + tuple(args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def cfp_prefold(model: nn.Module, fam: Family, inputs: BlockInputs, cfg: CBQConfig) -> dict[str, list[int]]:
    """CFP's activation folds over the whole float model at once (output unchanged), so that
    starting codes can be computed on the folded weights; returns the folded channels."""
    folded: dict[str, list[int]] = {}
    if cfg.abits >= 16 or not cfg.cfp_activations:
        return folded
    x = inputs
    for i, block in enumerate(blocks(model, fam)):
        outs = _prepare_float_block(block, fam, x, cfg, folded, f"{fam.blocks_attr}.{i}", {})
        x = x.with_hidden([t.to(inputs.hidden[0].dtype) for t in outs])
    return folded


def gptq_init(model: nn.Module, fam: Family, inputs: BlockInputs, cfg: CBQConfig,
              specs: dict[str, FormatSpec] | None = None) -> tuple[dict, dict]:
    """CBQ's ``init="gptq"`` starting point: CFP's activation folds applied to ``model`` in place
    (:func:`cfp_prefold`; the float output is unchanged), then GPTQ's codes and scales for every
    compressible Linear, computed on a copy (``model`` stays float), in ``cfg.spec`` or the
    per-matrix ``specs`` (CBQ keeps each starting code's format).  Returns (codes, folds)."""
    from .gptq import gptq_quantize_model

    folded = cfp_prefold(model, fam, inputs, cfg)
    codes = gptq_quantize_model(copy.deepcopy(model), fam, inputs, specs or cfg.spec,
                                storage_dtype=inputs.hidden[0].dtype, act_order=cfg.gptq_order == "act")
    return codes, folded
