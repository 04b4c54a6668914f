"""VeRA (Kopiczko et al. 2024, eq. 1): ``ΔW = Λ_b B Λ_d A`` with shared frozen random ``A``, ``B``.

PEFT keeps one ``vera_A: (r, K_max)`` and ``vera_B: (N_max, r)`` for the whole model and slices
them per layer (``VeraLayer.forward``: ``A[:, :K]``, ``B[:N, :]``); each layer trains
``vera_lambda_d: (r,)`` and ``vera_lambda_b: (N,)``:

    y += λ_b ⊙ ((λ_d ⊙ (x A[:, :K]ᵀ)) B[:N]ᵀ)   ⇒   b = diag(λ_b) B[:N] diag(λ_d)  (N, r),  a = A[:, :K]  (r, K).

The shared pair is read from the folder (``base_model.vera_A`` / ``vera_B``, ``save_projection``)
or regenerated from ``projection_prng_key`` exactly as PEFT does (``_init_vera_A_vera_B``: a CPU
``torch.Generator`` seeded with the key draws ``A`` then ``B`` by Kaiming-uniform with
``bound = √3 · √2 / √fan_in``, sized by the largest adapted K and N).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ...errors import BadInput
from .base import MatrixDelta, Tensors, number, register


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``vera.model._kaiming_init``: U(−b, b), b = √3 · √2 / √shape[1] (fan_in of a 2-D tensor)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(key: int, r: int, n_max: int, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared ``(vera_A (r, K_max), vera_B (N_max, r))`` PEFT draws from ``projection_prng_key``."""
    g = torch.Generator(device="cpu").manual_seed(int(key))
    a = kaiming_uniform((r, k_max), g)
    b = kaiming_uniform((n_max, r), g)
    return a.double().numpy(), b.double().numpy()


@register("VERA", ("vera_lambda_b", "vera_lambda_d"))
def read_vera(folder: Path, cfg: dict, tensors: Tensors):
    """Returns ``(deltas, resolve)``: the deltas' ``b``/``a`` are filled in by ``resolve(shapes)``
    once the fold knows each module's (N, K) (VeRA's vectors do not say K)."""
    r = number(cfg, "r", 256, folder, int)
    pa = [k for k in tensors.rest if k.split(".")[-1] == "vera_A" or ".vera_A." in k]
    pb = [k for k in tensors.rest if k.split(".")[-1] == "vera_B" or ".vera_B." in k]
    lambdas = {}
    for module in sorted(tensors.modules):
        lb, ld = tensors.need(module, "vera_lambda_b", 1), tensors.need(module, "vera_lambda_d", 1)
        if ld.shape != (r,):
            raise BadInput(f"{tensors.where}: {module}: vera_lambda_d has {ld.shape[0]} entries, the config says r = {r}")
        lambdas[module] = (lb, ld)
    shared: list = [None, None]
    if pa or pb:
        if len(pa) != 1 or len(pb) != 1:
            raise BadInput(f"{tensors.where}: expected one vera_A and one vera_B, found {sorted(pa + pb)}")
        shared = [tensors.rest.pop(pa[0]), tensors.rest.pop(pb[0])]
        if shared[0].ndim != 2 or shared[1].ndim != 2 or shared[0].shape[0] != r or shared[1].shape[1] != r:
            raise BadInput(f"{tensors.where}: vera_A {list(shared[0].shape)} / vera_B {list(shared[1].shape)} are "
                           f"not (r, in) / (out, r) with r = {r}")
    elif cfg.get("save_projection", True):
        raise BadInput(f"{tensors.where}: save_projection is true but vera_A / vera_B are missing")
    key = number(cfg, "projection_prng_key", 0, folder, int)
    out = {m: MatrixDelta(m, (lb.shape[0], -1), "linear") for m, (lb, _) in lambdas.items()}

    def resolve(shapes: dict[str, tuple[int, int]]) -> None:
        big_a, big_b = shared
        if big_a is None:  # PEFT sizes the pair by the largest adapted layer
            big_a, big_b = projections(key, r, max(n for n, _ in shapes.values()), max(k for _, k in shapes.values()))
        for module, d in out.items():
            n, k = shapes[module]
            if n > big_b.shape[0] or k > big_a.shape[1]:
                raise BadInput(f"{tensors.where}: {module} is {n}x{k}, larger than the shared vera_B / vera_A")
            lb, ld = lambdas[module]
            d.b = lb[:, None] * big_b[:n] * ld[None, :]
            d.a = big_a[:, :k].copy()
            d.shape = (d.shape[0], k)

    return out, resolve
