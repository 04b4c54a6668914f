"""CFP (quantseal.compress.cfp): outlier detection, truncation and exact activation-scale folding."""

import pytest
import torch
from torch import nn

from quantseal.compress.cfp import (activation_channel_scales, fold_activation_scale, fold_sites,
                                    outlier_threshold, truncate_weight_outliers)
from quantseal.models import ENCODER


@pytest.mark.parametrize("shape", [(64, 64), (384, 384), (384, 1536)])
def test_finds_planted_weight_outliers(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * 0.05
    idx = torch.randperm(w.numel(), generator=g)[:5]
    w.view(-1)[idx] = torch.tensor([0.6, -0.75, 0.55, -0.9, 0.8])
    wt, n = truncate_weight_outliers(w)
    assert n == 5
    changed = torch.nonzero((wt != w).view(-1)).flatten()
    assert sorted(changed.tolist()) == sorted(idx.tolist())
    assert wt.abs().max() <= w.view(-1)[torch.ones(w.numel(), dtype=torch.bool).index_fill_(0, idx, False)].abs().max()


@pytest.mark.parametrize("seed", range(6))
def test_leaves_outlier_free_tensors_alone(seed):
    g = torch.Generator().manual_seed(seed)
    for shape in [(64, 64), (384, 384), (1536, 384)]:
        w = torch.randn(*shape, generator=g)
        assert outlier_threshold(w.abs()) is None
        wt, n = truncate_weight_outliers(w)
        assert n == 0 and torch.equal(wt, w)
    u = torch.rand(256, 256, generator=g) * 2 - 1  # bounded: no quartile candidates at all
    assert outlier_threshold(u.abs()) is None


def test_activation_channel_scales_bring_outlier_channels_down():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 64, generator=g)
    x[:, [3, 40]] *= 30
    cmax = x.abs().amax(0)
    s = activation_channel_scales(cmax)
    assert torch.nonzero(s > 1).flatten().tolist() == [3, 40]
    assert torch.all(s[[i for i in range(64) if i not in (3, 40)]] == 1)
    scaled = (cmax / s)
    assert scaled[[3, 40]].max() <= cmax[[i for i in range(64) if i not in (3, 40)]].max() * (1 + 1e-6)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_fold_into_linear_leaves_bert_output_unchanged():
    model = _tiny_bert()
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    block = model.encoder.layer[0]
    sites = fold_sites(ENCODER, block)
    assert [c for _, _, c in sites] == ["attention.output.dense"]
    producer, consumers, _ = sites[0]
    w_before = consumers[0].weight.detach().clone()
    s = torch.ones(32)
    s[[2, 17, 30]] = torch.tensor([4.0, 9.5, 2.25])
    fold_activation_scale(producer, consumers, s)
    assert not torch.equal(consumers[0].weight.detach(), w_before)  # the fold did change the weights
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_fold_into_norm_leaves_output_unchanged(norm):
    torch.manual_seed(0)
    n = nn.LayerNorm(16) if norm == "layernorm" else nn.RMSNorm(16)
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0)
        if getattr(n, "bias", None) is not None:
            n.bias.uniform_(-1, 1)
    q, v = nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(20, 16)
    x[:, 5] *= 50
    with torch.no_grad():
        h = n(x)
        ref = torch.cat([q(h), v(h)], -1)
        s = activation_channel_scales(h.abs().amax(0))
    assert s[5] > 1
    fold_activation_scale(n, [q, v], s)
    with torch.no_grad():
        h2 = n(x)
        out = torch.cat([q(h2), v(h2)], -1)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert h2.abs().amax(0)[5] < h.abs().amax(0)[5]


def test_phi3_folds_into_its_norms_and_fused_projections():
    """A Phi-3 block's exact sites are its two RMSNorms → the fused qkv_proj / gate_up_proj; folding
    a scale through both leaves the decoder's logits unchanged."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from quantseal.models import PHI3

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2)).eval()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sites = fold_sites(PHI3, model.model.layers[0])
    assert [c for _, _, c in sites] == ["self_attn.qkv_proj", "mlp.gate_up_proj"]
    s = torch.ones(32)
    s[[3, 20]] = torch.tensor([6.0, 2.5])
    for producer, consumers, _ in sites:
        w_before = consumers[0].weight.detach().clone()
        fold_activation_scale(producer, consumers, s)
        assert not torch.equal(consumers[0].weight.detach(), w_before)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
