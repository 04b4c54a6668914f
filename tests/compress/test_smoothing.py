"""CFP's explicit input smoothing (quantseal.compress.smoothing): exact in float, carried through
CBQ and the compressed Linear, and it lowers static A8 error on planted outlier channels."""

import copy

import pytest
import torch
from torch import nn

from quantseal.compress.calibration import capture_block_inputs
from quantseal.compress.cbq import CBQConfig, attach_activation_quant, cfp_prefold
from quantseal.compress.cbq_linear import ActQuantizer, CBQLinear
from quantseal.compress.formats import FormatSpec
from quantseal.compress.qlinear import CompressedLinear
from quantseal.compress.smoothing import (attach_input_smoothing, has_input_smoothing, input_smoothing,
                                          smooth_linear_input)
from quantseal.models import ENCODER, compressible_linears

from test_cbq import block_error, tiny_batches, tiny_bert  # tests/compress is on sys.path


def test_smoothing_leaves_the_linear_output_unchanged():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(40, 24).double()
    x = torch.randn(5, 7, 40, generator=g, dtype=torch.float64)
    x[..., 3] *= 50
    ref, w0 = lin(x), lin.weight.detach().clone()
    s = torch.ones(40)
    s[3] = 37.5
    smooth_linear_input(lin, s)
    assert has_input_smoothing(lin) and torch.equal(input_smoothing(lin), s)
    torch.testing.assert_close(lin(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.weight.detach(), w0 * s.double()[None, :], rtol=0, atol=0)  # it holds W·diag(s)
    with pytest.raises(ValueError):
        attach_input_smoothing(lin, s)  # twice
    with pytest.raises(ValueError):
        attach_input_smoothing(nn.Linear(40, 2), torch.zeros(40))  # not positive
    with pytest.raises(ValueError):
        attach_input_smoothing(nn.Linear(40, 2), torch.ones(39))  # wrong size


def test_compressed_and_cbq_linears_divide_before_the_activation_quantiser():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    s = 1 + 4 * torch.rand(32, generator=g)
    x = torch.randn(3, 32, generator=g) * s
    cl = CompressedLinear(w, None, None, b, input_smooth=s)
    torch.testing.assert_close(cl(x), (x / s) @ w.T + b)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
    attach_input_smoothing(lin, s)
    q = CBQLinear(lin, FormatSpec("int", 4, 16), rank=0, act_bits=8)
    q.act.init_from(x / s)
    want = nn.functional.linear(q.act(x / s), q.weight_hat(), q.bias)
    torch.testing.assert_close(q(x), want)


def _outlier_bert():
    """A tiny BERT whose attention LayerNorm (post-LN, it also feeds the residual) has two
    outlier channels, so intermediate.dense's input does too: no exact fold exists there."""
    m = tiny_bert(seed=3, layers=2)
    with torch.no_grad():
        for layer in m.encoder.layer:
            layer.attention.output.LayerNorm.weight[[2, 9]] *= 40
    return m


def test_cfp_smooths_unfoldable_outliers_exactly_and_helps_static_a8():
    ref = _outlier_bert()
    x = capture_block_inputs(ref, ENCODER, tiny_batches(seed=4, n=3), torch.float32)
    smoothed = copy.deepcopy(ref)
    folded = cfp_prefold(smoothed, ENCODER, x, CBQConfig(wbits=4, abits=8, block=16))
    lins = compressible_linears(smoothed, ENCODER)
    for i in range(2):
        name = f"encoder.layer.{i}.intermediate.dense"
        s = input_smoothing(lins[name])
        assert s is not None and {2, 9} <= set(folded[name]) and float(s[[2, 9]].min()) > 5
    assert block_error(smoothed, ref, x) < 1e-10  # the float model is unchanged

    def static_a8_error(model):
        model = copy.deepcopy(model)
        samples: dict[str, list] = {n: [] for n in compressible_linears(model, ENCODER)}
        hooks = [lin.register_forward_pre_hook(lambda _m, a, _n=n: samples[_n].append(a[0].flatten(0, 1)))
                 for n, lin in compressible_linears(model, ENCODER).items()]
        block_error(model, ref, x)
        for h in hooks:
            h.remove()
        acts = {}
        for n, xs in samples.items():
            q = ActQuantizer(8)
            q.init_from(torch.cat(xs))
            acts[n] = q.export()
        attach_activation_quant(model, acts)
        return block_error(model, ref, x)

    plain, smooth = static_a8_error(ref), static_a8_error(smoothed)
    assert smooth < 0.5 * plain, (smooth, plain)
