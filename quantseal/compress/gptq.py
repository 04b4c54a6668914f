"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), in the paper's notation, producing our exact blockwise INT-k format.

Per Linear ``W: (N, K)`` (out, in) with calibration inputs ``X: (K, n)`` (columns = tokens):

    argmin_Ŵ ‖W X − Ŵ X‖²_F,      H = 2 X Xᵀ  (K, K)                               (eq. 1–2)

Columns are quantised left to right; after column q the remaining columns absorb its error

    δ_F = − (w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:, q}                      (eq. 3)

computed from the upper Cholesky factor of H⁻¹ (§"Step 3: Cholesky reformulation") and applied
lazily, ``blocksize`` columns at a time (§"Step 2: lazy batch updates").  The group parameters
(float16-rounded scale, integer zero point: :mod:`.quantizers`) of each block of ``spec.block``
columns are chosen from the *current*, error-updated weights when the group starts, with the same
MSE-optimal clip search as our round-to-nearest (``int4f``: the block's float16 scale and float
offset from its min/max, each column then rounded to that fixed grid) — so the result is a plain
:class:`~.quantizers.QuantizedTensor` that exports exactly to MatMulNBits.

:func:`gptq_quantize_model` is the sequential driver: block i's Linears are quantised one by one
on inputs produced by the already-quantised blocks 0..i−1 (and, within the block, by the
already-quantised Linears before them).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..devices import to_device
from ..models import Family, blocks
from .calibration import BlockInputs, block_forward, row_spans, run_block, sub_batch
from .formats import FormatSpec
from .held_codes import PackedCodes, chunk_rows, hold_pending, unhold
from .held_codes import hold_codes as hold_layer_codes
from .quantizers import QuantizedTensor, quantize_int, quantize_offset


class GPTQ:
    """The solver for one Linear: ``add_batch`` accumulates H, ``quantize`` solves, ``free``."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        self.layer = layer
        self.rows, self.columns = layer.out_features, layer.in_features  # N, K
        # float32 as the reference GPTQ code keeps H (its K × K arrays are half a float64's);
        # float64 is the slow reference (tests/compress/test_gptq.py compares the two solves)
        self._H = torch.zeros(self.columns, self.columns, dtype=dtype,
                              device=layer.weight.device if device is None else device)
        self._scaled = True  # _H holds 2/n Σ x xᵀ (True) or the plain sum Σ x xᵀ still being accumulated
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor | None:
        """``H = 2/n Σ x xᵀ`` (K, K).  Batches are summed unscaled and H is scaled once, when it is
        first read: one rounding per entry for the 2/n factor, not one per batch (the reference
        code rescales the running mean at every batch; with a few hundred sub-batches those
        roundings moved GPTQ's float32 solve)."""
        if self._H is not None and not self._scaled:
            self._H.mul_(2 / self.nsamples)
            self._scaled = True
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self._scaled = value, True

    def add_batch(self, inp: torch.Tensor) -> None:
        """inp: (..., K) layer inputs (padding tokens already removed), added to Σ x xᵀ in place
        (``addmm_``: no K × K temporary; nothing is scaled, so no copy of ``inp`` is made)."""
        x = inp.reshape(-1, self.columns).to(self._H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        if self._scaled and self.nsamples:  # H was read between batches: back to the plain sum
            self._H.mul_(self.nsamples / 2)
        self._H.addmm_(x.T, x)
        self.nsamples += n
        self._scaled = False

    @torch.no_grad()
    def quantize(self, spec: FormatSpec, blocksize: int = 128, percdamp: float = 0.01,
                 consume: bool = False, overwrite: bool = False, act_order: bool = False) -> QuantizedTensor:
        """Run the lazy-batch Cholesky solver; returns codes/scales/zeros in our format.

        ``percdamp``: λ = percdamp · mean(diag H) is added to the diagonal (§4, "dampening").
        ``consume``: work in H's own memory (the solver's H is gone afterwards, as after
        :meth:`free`); ``overwrite``: work in the layer's float32 weight itself (it holds the
        error-updated weights afterwards, for a caller that replaces them with the dequantised
        result); the result is the same either way.

        ``act_order``: columns in descending order of ``diag H`` (the reference code's
        ``actorder``: the columns whose inputs carry the most energy are quantised first, while
        the most columns are left to absorb their error), with *static* groups: each group's
        scale and zero point are round-to-nearest's for the original weights (AutoGPTQ's
        ``static_groups``), so the codes stay in the file's column order and export unchanged."""
        if spec.kind not in ("int", "intf"):
            raise ValueError(f"GPTQ writes integer formats, not {spec.name}")
        W = self.layer.weight.detach()  # (N, K)
        if not (overwrite and W.dtype == torch.float32 and W.is_contiguous()):
            W = W.to(torch.float32, copy=True)  # one copy
        if not act_order:
            Hinv, dead = self.factor(percdamp, consume)
            return self.solve(W, Hinv, dead, spec, blocksize)
        static = static_groups(W, spec)
        perm = act_order_permutation(self.H)
        Hp = self.H if consume else self.H.clone()
        if consume:
            self.H = None
        permute_symmetric_(Hp, perm)  # the permuted problem, in H's own memory
        Hinv, dead = self.factor_in_place(Hp, percdamp)
        Wp = W.index_select(1, perm)
        if overwrite:
            W.copy_(Wp)  # the caller's weight is a workspace either way
        return self.solve(Wp, Hinv, dead, spec, blocksize, perm=perm, static=static)

    @torch.no_grad()
    def factor(self, percdamp: float = 0.01, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, dead)``: the upper Cholesky factor of (H + λI)⁻¹ (float32, (K, K)) and the columns
        no input reached (``(K,)`` bool); shared by every row of the weight (:meth:`solve`).
        ``consume``: in H's own memory (the solver's H is gone afterwards)."""
        # with ``consume`` H itself is the workspace (no K × K copy); the three factorisations
        # write their result over their input (``out=``) through H's transpose, a column-major
        # view of the same symmetric matrix: LAPACK's own layout, so torch makes no temporary copy
        # either (measured: no growth of the peak RSS) — one K × K array of H's dtype in all
        H = self.H if consume else self.H.clone()
        if consume:
            self.H = None
        return self.factor_in_place(H, percdamp)

    @staticmethod
    @torch.no_grad()
    def factor_in_place(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factor` of the symmetric ``H: (K, K)``, written over ``H``."""
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        damp = percdamp * torch.mean(torch.diag(H))
        H.diagonal().add_(damp)  # H + λI, in place: the same sums as adding λ·eye
        A = H.mT  # = H (symmetric), column-major
        torch.linalg.cholesky(A, out=A)  # L (lower)
        torch.cholesky_inverse(A, out=A)  # H_F⁻¹ = (L Lᵀ)⁻¹
        torch.linalg.cholesky(A, upper=True, out=A)  # upper factor: row q is (H_F⁻¹)_{q,:}/sqrt([H_F⁻¹]_qq)
        return (A if A.dtype == torch.float32 else A.float()), dead

    @staticmethod
    @torch.no_grad()
    def solve(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, spec: FormatSpec,
              blocksize: int = 128, perm: torch.Tensor | None = None,
              static: QuantizedTensor | None = None) -> QuantizedTensor:
        """The lazy-batch column sweep on the float32 rows ``W: (N, K)`` (their workspace: changed)
        with :meth:`factor`'s ``(Hinv, dead)``.  Every step is row-wise given ``Hinv``, so any
        split of the rows into chunks gives the rows' own codes (head_table.py solves a token
        table in row chunks).  ``perm`` (act order): ``W`` and ``Hinv`` are in the permuted column
        order, sweep column j is the file's column ``perm[j]``, and its group's parameters are
        ``static``'s (a quantisation of the unpermuted weights)."""
        if spec.kind not in ("int", "intf"):
            raise ValueError(f"GPTQ writes integer formats, not {spec.name}")
        offset = spec.kind == "intf"  # int4f: ŵ = s·q + m, the grid of each block fixed from its min/max
        W[:, dead] = 0
        N, K = W.shape
        B = spec.block
        blocksize = max(B, (blocksize // B) * B)  # a lazy batch holds whole groups
        nb = -(-K // B)
        qmax = 2**spec.bits - 1

        codes = torch.zeros(N, nb * B, dtype=torch.uint8, device=W.device)  # q ∈ [0, qmax]: exact
        scales = torch.zeros(N, nb, device=W.device)
        zeros = torch.zeros(N, nb, device=W.device)  # int: zero points; int4f: float offsets m
        cols = None if perm is None else perm.tolist()
        if static is not None:  # act order: every group's parameters fixed before the sweep
            scales.copy_(static.scales.float())
            if offset:
                zeros.copy_(static.offsets.float())
            else:
                zeros.copy_(static.zeros.float() if static.zeros is not None else torch.full_like(scales, 2.0 ** (spec.bits - 1)))
        for i1 in range(0, K, blocksize):
            i2 = min(i1 + blocksize, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i if cols is None else cols[i1 + i]  # the file's column
                g = col // B
                if cols is None and col % B == 0:  # a new group: its parameters from the current weights
                    # groups never straddle a lazy batch: blocksize and i1 are multiples of B
                    if offset:
                        qt = quantize_offset(W1[:, i:i + B].float(), FormatSpec("intf", spec.bits, B))
                        scales[:, g], zeros[:, g] = qt.scales[:, 0], qt.offsets[:, 0]
                    else:
                        qt = quantize_int(W1[:, i:i + B].float(), FormatSpec("int", spec.bits, B, spec.symmetric))
                        scales[:, g] = qt.scales[:, 0]
                        zeros[:, g] = qt.zeros[:, 0].float() if qt.zeros is not None else 2.0 ** (spec.bits - 1)
                w = W1[:, i]
                s, z = scales[:, g], zeros[:, g]
                if offset:
                    q = torch.clamp(torch.round((w.float() - z) / s), 0, qmax)
                    wq = q * s + z
                else:
                    q = torch.clamp(torch.round(w.float() / s) + z, 0, qmax)
                    wq = (q - z) * s
                codes[:, col] = q
                d = Hinv1[i, i]
                err = (w - wq) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # in place: no (N, K − i2) temporary
        if offset:
            codes[:, K:] = 0
            return QuantizedTensor(codes, scales, None, (N, K), spec, zeros)
        if nb * B > K:
            codes[:, K:] = zeros.repeat_interleave(B, dim=1)[:, K:]
        return QuantizedTensor(
            codes=codes,
            scales=scales,
            zeros=None if spec.symmetric else zeros.to(torch.uint8),
            shape=(N, K),
            spec=spec,
        )

    def free(self) -> None:
        self.H = None


def static_groups(w: torch.Tensor, spec: FormatSpec) -> QuantizedTensor:
    """Act order's fixed group parameters: round-to-nearest's scale and zero point (``int4f``:
    scale and offset) of every group of the original rows ``w: (N, K)``; row-wise."""
    if spec.kind == "intf":
        return quantize_offset(w, spec)
    return quantize_int(w, FormatSpec("int", spec.bits, spec.block, spec.symmetric))


def act_order_permutation(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's act order: the columns by descending ``diag H`` (ties by index), ``(K,)`` int64."""
    return torch.argsort(torch.diag(H), descending=True, stable=True)


@torch.no_grad()
def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H ← H[perm][:, perm]`` in place (no K × K temporary): the rows moved along each cycle of
    ``perm`` with one row of scratch, then the columns the same way through the transposed view."""
    order = perm.tolist()
    for view in (H, H.mT):
        seen = [False] * len(order)
        for start in range(len(order)):
            if seen[start] or order[start] == start:
                seen[start] = True
                continue
            first = view[start].clone()
            i = start
            while True:  # row i takes row order[i], until the cycle comes back to start
                seen[i] = True
                j = order[i]
                if j == start:
                    view[i] = first
                    break
                view[i] = view[j]
                i = j
    return H


Tick = Callable[[str], None]

# padded tokens per forward pass of ``compress --method gptq`` (--hessian-tokens): a decoder MLP's
# intermediates of one pass are then ≈ 4 · 256 · I float32 (23 MB at the 1B width I = 5632, not
# the 115 MB of a whole calibration batch of 1456 tokens); chosen by measurement (benchmarks/README.md)
DEFAULT_HESSIAN_TOKENS = 256


class _Stop(Exception):
    pass


def _input_group(block: nn.Module, rels: list[str], x: BlockInputs, solver: GPTQ, device,
                 max_tokens: int | None = None) -> int:
    """Accumulate ``solver``'s H (the Linear ``rels[0]``) over every calibration batch; return how
    many of ``rels`` share that input: the Linears called right after ``rels[0]`` (no other of
    the block's Linears in between) with the very same input tensor, in every batch (LLaMA's
    q/k/v and gate/up, BERT's query/key/value).  Their inputs cannot depend on the group's
    earlier members, so the sequential algorithm's H for each of them equals this H exactly.
    Each forward pass stops at the first Linear call that cannot extend the group.  ``max_tokens``:
    each batch is run a few rows at a time, at most that many padded tokens per pass
    (:func:`~.calibration.row_spans`; the Hessian's sum then runs over those sub-batches)."""
    group = len(rels)
    state: dict = {}

    def hook(_m, args, _rel):
        if _rel == rels[0]:
            state.update(x=args[0], n=1)
            solver.add_batch(args[0][state["mask"]])
            if group == 1:
                raise _Stop
            return
        n = state.get("n", 0)
        if n and n < group and _rel == rels[n] and args[0] is state["x"]:
            state["n"] = n + 1
            if state["n"] < group:
                return
        raise _Stop  # the group cannot grow past here

    handles = [block.get_submodule(rel).register_forward_pre_hook(lambda m, a, _r=rel: hook(m, a, _r))
               for rel in rels]
    try:
        for hid, a, kw, m in zip(x.hidden, x.args, x.kwargs, x.token_mask):
            for r0, r1 in row_spans(hid, max_tokens):
                state.clear()
                state["mask"] = m[r0:r1].to(device)
                h, a1, kw1 = sub_batch(hid, a, kw, r0, r1)
                try:
                    block_forward(block, h.to(device), *to_device((a1, kw1), device))
                except _Stop:
                    pass
                del h
                group = min(group, state.get("n", 0))
    finally:
        for h in handles:
            h.remove()
    if group < 1:
        raise RuntimeError(f"{rels[0]} was not called by the block's forward pass")
    return group


RowReader = Callable[[str, int, int], torch.Tensor]


def _solve_rows(rows_of: Callable[[int, int], torch.Tensor], n: int, k: int, Hinv: torch.Tensor,
                dead: torch.Tensor, spec: FormatSpec, device, chunk_bytes: int,
                perm: torch.Tensor | None = None) -> PackedCodes:
    """:meth:`GPTQ.solve` on the float32 rows of one ``(n, k)`` weight, a chunk of about
    ``chunk_bytes`` at a time (``rows_of(r0, r1)``: rows ``r0:r1``, float32, a workspace the solve
    may change); every step is row-wise given ``Hinv``, so the chunks' codes are the rows' own.
    ``perm``: act order (``Hinv`` is the permuted problem's; each chunk's static groups come from
    its original rows, :func:`static_groups`, also row-wise)."""
    out = PackedCodes.empty(n, k, spec, device)
    per = chunk_rows(n, k, chunk_bytes)
    for r0 in range(0, n, per):
        r1 = min(r0 + per, n)
        w = rows_of(r0, r1)
        if w.dtype != torch.float32 or not w.is_contiguous():
            w = w.to(torch.float32, copy=True).contiguous()
        if perm is None:
            out.put(r0, GPTQ.solve(w, Hinv, dead, spec))
        else:
            static = static_groups(w, spec)
            out.put(r0, GPTQ.solve(w.index_select(1, perm), Hinv, dead, spec, perm=perm, static=static))
        del w
    return out


def release_codes(block: nn.Module, fam: Family, dequantised: bool = True) -> None:
    """The block's Linears compute with their own weights again (:func:`~.held_codes.unhold`);
    ``dequantised``: each solved one then holds its dequantised weights (the in-memory model),
    else it is left as it was (a streamed block's meta Linear)."""
    for rel in fam.linears:
        unhold(block.get_submodule(rel), dequantised)


@torch.no_grad()
def gptq_quantize_block(block: nn.Module, prefix: str, fam: Family, x: BlockInputs,
                        spec: FormatSpec | dict[str, FormatSpec], percdamp: float = 0.01,
                        tick: Tick | None = None, hessian_dtype: torch.dtype = torch.float32,
                        sink: Callable[[str, QuantizedTensor], None] | None = None,
                        read_rows: RowReader | None = None, hold_codes: bool = False,
                        max_tokens: int | None = None,
                        chunk_bytes: int | None = None, act_order: bool = False) -> dict[str, QuantizedTensor]:
    """GPTQ on one block's Linears, in order, each on inputs produced by the already-quantised
    Linears before it.  ``x``: the block's inputs (moved batch by batch to the block's device);
    ``prefix``: the block's full name; ``spec`` one format for every Linear or ``{full_name:
    format}`` (a per-matrix plan).  Returns ``{full_name: codes}``, on the CPU.

    Linears that read the same input tensor (:func:`_input_group`) share one Hessian, accumulated
    once and factorised once (in its own memory), and each forward pass stops at the group's end:
    one K × K H alive at a time and fewer block passes (LLaMA: 4 partial passes instead of 7
    whole ones), the same codes as one H per Linear.  ``hessian_dtype``: H and its factorisations
    (float32; float64 is the slow reference).  ``max_tokens``: padded tokens per forward pass
    (:func:`_input_group`; ``None``: whole batches).

    A solved Linear is held as its packed codes (:func:`~.held_codes.hold_codes`, dequantised a
    row chunk at a time when the block's forward reaches it; the module stays in place, with its
    pre-hooks) and solved a chunk of about
    ``chunk_bytes`` float32 rows at a time, so no float32 copy of the block exists beside the
    Hessian.  ``read_rows(full_name, r0, r1)``: where a Linear's float32 rows come from (a
    streamed block's Linears are left unread on the meta device and return zeros until their
    turn: :func:`~.held_codes.hold_pending`); ``None``: the Linear's own weight.
    ``hold_codes``: leave the block holding the codes (its caller maps the inputs to the next
    block's through them, then :func:`release_codes`); else the Linears are put back holding their
    dequantised weights.  ``sink``: called with ``(full_name, codes)`` as each Linear is done,
    which are then not kept (the returned dict is empty): a streamed run writes them at once.
    ``act_order``: each group's columns in descending ``diag H`` with static groups
    (:meth:`GPTQ.quantize`); H is permuted in its own memory, once per group."""
    from .held_codes import LINEAR_CHUNK_BYTES

    chunk_bytes = LINEAR_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    device = next((p.device for p in block.parameters() if not p.is_meta), None)
    device = device if device is not None else x.hidden[0].device
    result: dict[str, QuantizedTensor] = {}
    rels = list(fam.linears)

    originals = {rel: block.get_submodule(rel) for rel in rels}
    if read_rows is not None:
        for rel in rels:
            hold_pending(originals[rel])
    i = 0
    try:
        while i < len(rels):
            solver = GPTQ(originals[rels[i]], hessian_dtype, device)
            n = _input_group(block, rels[i:], x, solver, device, max_tokens)
            perm = act_order_permutation(solver.H) if act_order else None
            if perm is not None:
                permute_symmetric_(solver.H, perm)
            Hinv, dead = solver.factor(percdamp, consume=True)  # one factor for the group (the same H)
            solver.free()
            for j, rel in enumerate(rels[i:i + n]):
                layer = originals[rel]
                full = f"{prefix}.{rel}"
                fmt = spec[full] if isinstance(spec, dict) else spec
                if fmt.kind not in ("int", "intf"):
                    raise ValueError(f"GPTQ writes integer formats, not {fmt.name}")
                if read_rows is None:
                    w = layer.weight.detach()
                    rows_of = (lambda r0, r1, _w=w: _w[r0:r1])  # solved in the Linear's own weight
                else:
                    rows_of = (lambda r0, r1, _f=full: read_rows(_f, r0, r1).to(device))
                packed = _solve_rows(rows_of, layer.out_features, layer.in_features, Hinv, dead, fmt, device,
                                     chunk_bytes, perm)
                del rows_of
                if j == n - 1:  # the group's factor is done with: freed before the codes are written
                    del Hinv, dead
                dtype = layer.weight.dtype
                if read_rows is None:
                    del w
                    layer.weight.data = layer.weight.data.new_empty(0)  # the solve's workspace: freed
                hold_layer_codes(layer, packed, dtype, chunk_bytes)
                qt = packed.quantized().cpu()
                if sink is not None:
                    sink(full, qt)
                else:
                    result[full] = qt
                del qt
                if tick:
                    tick(f"block {prefix.rsplit('.', 1)[-1]} {rel}")
            i += n
    except BaseException:
        release_codes(block, fam, dequantised=False)
        raise
    if not hold_codes:
        release_codes(block, fam, dequantised=True)
    return result


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, fam: Family, inputs: BlockInputs, spec: FormatSpec | dict[str, FormatSpec],
                        percdamp: float = 0.01, storage_dtype: torch.dtype = torch.float32,
                        tick: Tick | None = None, max_tokens: int | None = None,
                        act_order: bool = False) -> dict[str, QuantizedTensor]:
    """Sequential GPTQ over the blocks; the model's Linears are overwritten with their dequantised
    weights.  ``inputs`` are block 0's captured inputs; ``spec`` one format for every Linear or
    ``{full_name: format}`` (a per-matrix plan); ``max_tokens``: padded tokens per forward pass.
    Returns ``{full_name: QuantizedTensor}``.  Each block maps the inputs to the next block's
    through its held codes, as :mod:`.streaming` does with one block in memory."""
    result: dict[str, QuantizedTensor] = {}
    x = inputs
    for bi, block in enumerate(blocks(model, fam)):
        result.update(gptq_quantize_block(block, f"{fam.blocks_attr}.{bi}", fam, x, spec, percdamp, tick,
                                          hold_codes=True, max_tokens=max_tokens, act_order=act_order))
        x = run_block(block, x, storage_dtype, max_tokens)
        release_codes(block, fam, dequantised=True)
    return result
