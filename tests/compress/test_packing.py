"""Exact pack/unpack round trips in onnxruntime's MatMulNBits layout (after HQQ's tests)."""

import pytest
import torch

from quantseal.compress.packing import (pack_lsb_first, pack_weight, pack_zero_points, unpack_lsb_first,
                                        unpack_weight, unpack_zero_points)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (17, 129), (2, 3, 31)])
def test_lsb_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + sum(shape))
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    packed = pack_lsb_first(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == -(-shape[-1] * bits // 8)
    assert torch.equal(unpack_lsb_first(packed, bits, shape[-1]), codes)


def test_lsb_first_layout_by_hand():
    # 2-bit codes 1, 2, 3, 0 → 0b00_11_10_01 ; 4-bit codes 0xA, 0x5 → 0x5A
    assert pack_lsb_first(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack_lsb_first(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    # a partial last byte is zero-filled
    assert pack_lsb_first(torch.tensor([3, 1, 2], dtype=torch.uint8), 4).tolist() == [0x13, 0x02]


@pytest.mark.parametrize("bits,block", [(2, 16), (2, 64), (4, 32), (4, 128), (8, 64)])
@pytest.mark.parametrize("n,nb", [(1, 1), (7, 3), (16, 5)])
def test_weight_and_zero_points_round_trip(bits, block, n, nb):
    gen = torch.Generator().manual_seed(n * nb + bits + block)
    codes = torch.randint(0, 2**bits, (n, nb * block), generator=gen, dtype=torch.int32).to(torch.uint8)
    packed = pack_weight(codes, bits, block)
    assert packed.shape == (n, nb, block * bits // 8)
    assert torch.equal(unpack_weight(packed, bits), codes)
    zeros = torch.randint(0, 2**bits, (n, nb), generator=gen, dtype=torch.int32).to(torch.uint8)
    pz = pack_zero_points(zeros, bits)
    assert pz.shape == (n, -(-nb * bits // 8))
    assert torch.equal(unpack_zero_points(pz, bits, nb), zeros)
