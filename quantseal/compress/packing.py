"""n-bit pack / unpack in onnxruntime's MatMulNBits layout (exact round trip).

``B: uint8 [N, ceil(K/bs), bs·bits/8]``: within each byte the first code sits in the
least-significant bits.  Zero points: ``uint8 [N, ceil(n_blocks·bits/8)]``, packed the same way
along the block axis.  Codes of 3-bit formats travel in 4-bit slots (onnxruntime runs 2, 4, 8).
"""

from __future__ import annotations

import torch


def pack_lsb_first(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last axis of ``codes`` (uint8, values < 2^bits) into bytes, LSB first.

    (..., L) → (..., ceil(L·bits/8)); a partial last byte is zero-filled."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into bytes")
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per = 8 // bits
    length = codes.shape[-1]
    pad = (-length) % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    # in uint8 throughout (a code < 2^bits shifted by < 8 − bits + 1 places fits a byte, and the
    # slots do not overlap, so OR = sum): temporaries of 1/per the codes' size, never int32/int64
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (j * bits)
    return out


def unpack_lsb_first(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_lsb_first`: (..., bytes) → (..., length) uint8."""
    if bits == 8:
        return packed[..., :length].to(torch.uint8).clone()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :length].to(torch.uint8)


def pack_weight(codes: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Codes ``(N, nb·block)`` → MatMulNBits ``B: (N, nb, block·bits/8)``."""
    n, width = codes.shape
    nb = width // block
    return pack_lsb_first(codes.reshape(n, nb, block), bits)


def unpack_weight(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """MatMulNBits ``B: (N, nb, bytes)`` → codes ``(N, nb·block)``."""
    n, nb, nbytes = packed.shape
    block = nbytes * 8 // bits
    return unpack_lsb_first(packed, bits, block).reshape(n, nb * block)


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``(N, nb)`` → ``(N, ceil(nb·bits/8))``."""
    return pack_lsb_first(zeros, bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, n_blocks: int) -> torch.Tensor:
    return unpack_lsb_first(packed, bits, n_blocks)
