"""GPTQ (quantseal.compress.gptq): lower layer-output error than round-to-nearest, our exact format."""

import torch
from torch import nn

from quantseal.compress.calibration import capture_block_inputs
from quantseal.compress.formats import FormatSpec
from quantseal.compress.gptq import GPTQ, gptq_quantize_model
from quantseal.compress.quantizers import dequantize, quantize_int
from quantseal.models import ENCODER, compressible_linears


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)


def tiny_bert(seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_batches(seed: int = 0, n: int = 4, b: int = 4, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3:] = 0  # one padded row
        out.append({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def test_gptq_beats_rtn_on_correlated_inputs():
    x = correlated_inputs(2048, 96, seed=1)
    torch.manual_seed(2)
    layer = nn.Linear(96, 48)
    w = layer.weight.detach()
    for bits in (2, 3, 4):
        spec = FormatSpec("int", bits, 32)
        solver = GPTQ(layer)
        solver.add_batch(x[:1000])
        solver.add_batch(x[1000:])  # accumulating in two batches = one batch
        qt = solver.quantize(spec)
        err_gptq = (x @ (w - dequantize(qt)).T).norm()
        err_rtn = (x @ (w - dequantize(quantize_int(w, spec))).T).norm()
        assert err_gptq < 0.9 * err_rtn, (bits, err_gptq, err_rtn)


def test_gptq_hessian_accumulation_matches_one_batch():
    x = correlated_inputs(300, 16, seed=3)
    layer = nn.Linear(16, 8)
    a, b = GPTQ(layer), GPTQ(layer)
    a.add_batch(x)
    b.add_batch(x[:100])
    b.add_batch(x[100:])
    ref = 2 * x.double().T @ x.double() / 300
    assert torch.allclose(a.H, ref) and torch.allclose(b.H, ref)


def test_gptq_output_is_our_exact_format_with_padding():
    x = correlated_inputs(512, 40, seed=4)  # K = 40: not a multiple of the block
    layer = nn.Linear(40, 8)
    solver = GPTQ(layer)
    solver.add_batch(x)
    spec = FormatSpec("int", 4, 16)
    qt = solver.quantize(spec)
    assert qt.codes.shape == (8, 48) and qt.scales.shape == (8, 3) and qt.zeros.shape == (8, 3)
    assert int(qt.codes.max()) <= 15
    assert torch.equal(qt.scales, qt.scales.half().float())  # float16-exact scales
    assert torch.equal(qt.codes[:, 40:], qt.zeros[:, 2:3].expand(8, 8))  # padding holds the zero point
    w_hat = dequantize(qt)
    assert w_hat.shape == (8, 40)
    assert (w_hat - layer.weight.detach()).abs().max() < 0.5 * layer.weight.detach().abs().max()


def test_sequential_driver_writes_dequantised_weights():
    model = tiny_bert()
    fam = ENCODER
    ref = {n: l.weight.detach().clone() for n, l in compressible_linears(model, fam).items()}
    x = capture_block_inputs(model, fam, tiny_batches(), torch.float32)
    spec = FormatSpec("int", 4, 16)
    qts = gptq_quantize_model(model, fam, x, spec)
    assert set(qts) == set(ref)
    for n, lin in compressible_linears(model, fam).items():
        assert torch.equal(lin.weight.detach(), dequantize(qts[n]))
        assert not torch.equal(lin.weight.detach(), ref[n])


def test_gptq_int4f_beats_its_rtn_and_stays_on_each_blocks_grid():
    """int4f (ŵ = s·q + m): each block's grid fixed from its min/max when the group starts, every
    column rounded to it; lower output error than int4f round-to-nearest, exact float16 s and m, K = 80
    (a padded last block)."""
    from quantseal.compress.quantizers import quantize_offset

    x = correlated_inputs(2048, 80, seed=5)
    torch.manual_seed(6)
    layer = nn.Linear(80, 24)
    w = layer.weight.detach()
    spec = FormatSpec.parse("int4f_b32")
    solver = GPTQ(layer)
    solver.add_batch(x)
    qt = solver.quantize(spec)
    assert qt.zeros is None and qt.offsets.shape == (24, 3) and int(qt.codes.max()) <= 15
    assert torch.equal(qt.offsets, qt.offsets.half().float()) and torch.equal(qt.scales, qt.scales.half().float())
    w_hat = dequantize(qt)
    blocks = (qt.codes.reshape(24, 3, 32).float() * qt.scales[..., None] + qt.offsets[..., None]).reshape(24, -1)
    assert torch.equal(w_hat, blocks[:, :80])
    err_gptq = (x @ (w - w_hat).T).norm()
    err_rtn = (x @ (w - dequantize(quantize_offset(w, spec))).T).norm()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
