"""CBQ (quantseal.compress.cbq): the loss terms, windows, reconstruction, exact integer results."""

import copy

import pytest
import torch

from quantseal.compress.calibration import block_forward, capture_block_inputs
from quantseal.compress.cbq import (CBQConfig, attach_activation_quant, cbq_quantize_model, gptq_init, kl_term,
                                    reconstruction_loss, window_starts)
from quantseal.compress.gptq import gptq_quantize_model
from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import dequantize, fake_quantize
from quantseal.models import ENCODER, compressible_linears


def tiny_bert(seed: int = 0, layers: int = 1, hidden: int = 32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, attn_implementation="eager",
                     initializer_range=0.2)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_batches(seed: int = 0, n: int = 6, b: int = 4, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 4:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def block_error(model, ref_model, x) -> float:
    """Σ‖h_fp − h_q‖² / Σ‖h_fp‖² of the whole encoder stack on captured inputs (real tokens)."""
    num = den = 0.0
    with torch.no_grad():
        for h, a, kw, m in zip(x.hidden, x.args, x.kwargs, x.token_mask):
            hq, hf = h.float(), h.float()
            for bq, bf in zip(model.encoder.layer, ref_model.encoder.layer):
                hq, hf = block_forward(bq, hq, a, kw), block_forward(bf, hf, a, kw)
            num += float(((hq - hf)[m] ** 2).sum())
            den += float((hf[m] ** 2).sum())
    return num / den


def test_kl_term_is_zero_for_identical_outputs_and_positive_otherwise():
    h = torch.randn(10, 16)
    assert float(kl_term(h, h)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_term(h, h + 0.3 * torch.randn(10, 16))) > 1e-4
    mask = torch.ones(2, 5, dtype=torch.bool)
    rec, kl = reconstruction_loss(h.view(2, 5, 16), h.view(2, 5, 16), mask)
    assert float(rec) == 0.0 and float(kl) == pytest.approx(0.0, abs=1e-7)
    # float64 reference of KL(p ‖ q)
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    p, q = a.softmax(-1), b.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kl_term(a, b)) == pytest.approx(float(ref), rel=1e-9)


def test_window_starts_overlap_one():
    assert window_starts(6, 2, 1) == [0, 1, 2, 3, 4]
    assert window_starts(6, 3, 1) == [0, 2, 3]
    assert window_starts(1, 2, 1) == [0]
    assert window_starts(4, 1, 0) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def reconstruction():
    """A seeded one-block model at W2, block 16: RTN, learned scales only, LoRA-Rounding."""
    ref = tiny_bert(seed=3)
    x = capture_block_inputs(ref, ENCODER, tiny_batches(seed=4), torch.float32)
    spec = FormatSpec("int", 2, 16)
    rtn = copy.deepcopy(ref)
    with torch.no_grad():
        for lin in compressible_linears(rtn, ENCODER).values():
            lin.weight.data = fake_quantize(lin.weight.data, spec)
    out = {"ref": ref, "x": x, "rtn": block_error(rtn, ref, x)}
    for rank in (0, 4):
        m = copy.deepcopy(ref)
        cfg = CBQConfig(wbits=2, block=16, window=2, rank=rank, steps=200, seed=0)
        res = cbq_quantize_model(m, ENCODER, x, cfg)
        out[rank] = (m, res, block_error(m, ref, x))
    g = copy.deepcopy(ref)
    gptq_quantize_model(g, ENCODER, x, spec)
    out["gptq"] = block_error(g, ref, x)
    m = copy.deepcopy(ref)
    cfg = CBQConfig(wbits=2, block=16, window=2, rank=4, steps=200, seed=0, init="gptq")
    init, _ = gptq_init(m, ENCODER, x, cfg)
    cbq_quantize_model(m, ENCODER, x, cfg, init=init)
    out["cbq_gptq"] = block_error(m, ref, x)
    return out


def test_lora_rounding_beats_rtn_and_learned_scales(reconstruction):
    r = reconstruction
    err_scales, err_lora = r[0][2], r[4][2]
    assert err_scales < r["rtn"]
    assert err_lora < 0.8 * r["rtn"], (err_lora, r["rtn"])
    assert err_lora < err_scales, (err_lora, err_scales)


def test_cbq_from_gptq_codes_improves_on_gptq(reconstruction):
    r = reconstruction
    assert r["gptq"] < r["rtn"]
    assert r["cbq_gptq"] < 0.95 * r["gptq"], (r["cbq_gptq"], r["gptq"])


def test_cbq_codes_are_exact_integers_the_model_uses(reconstruction):
    model, res, _ = reconstruction[4]
    lins = compressible_linears(model, ENCODER)
    assert set(res.quantized) == set(lins)
    for name, lin in lins.items():
        qt = res.quantized[name]
        assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 3
        assert qt.zeros.dtype == torch.uint8 and int(qt.zeros.max()) <= 3
        assert torch.equal(qt.scales, qt.scales.half().float())
        assert torch.equal(dequantize(qt), lin.weight.detach())


def test_cbq_is_deterministic(reconstruction):
    r = reconstruction
    m = copy.deepcopy(r["ref"])
    res = cbq_quantize_model(m, ENCODER, r["x"], CBQConfig(wbits=2, block=16, rank=4, steps=200, seed=0))
    for name, qt in res.quantized.items():
        assert torch.equal(qt.codes, r[4][1].quantized[name].codes)
        assert torch.equal(qt.scales, r[4][1].quantized[name].scales)


def test_a8_scales_are_recorded_and_reproduce_the_fake_quantised_model():
    ref = tiny_bert(seed=5, layers=2)
    x = capture_block_inputs(ref, ENCODER, tiny_batches(seed=6, n=3), torch.float32)
    m = copy.deepcopy(ref)
    res = cbq_quantize_model(m, ENCODER, x, CBQConfig(wbits=4, abits=8, block=16, rank=2, steps=20, seed=0))
    assert set(res.activations) == set(compressible_linears(m, ENCODER))
    for p in res.activations.values():
        assert p["bits"] == 8 and p["scale"] > 0 and 0 <= p["zero_point"] <= 255
    # the recorded static scales on the written-back model = activation fake quantisation
    handles = attach_activation_quant(m, res.activations)
    try:
        err_a8 = block_error(m, ref, x)
    finally:
        for h in handles:
            h.remove()
    err_a16 = block_error(m, ref, x)
    assert err_a8 >= err_a16 * 0.999 and err_a8 < 0.05
