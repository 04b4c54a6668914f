"""CBQ's quantised Linear (quantseal.compress.cbq_linear): LoRA-Rounding's start and its terms."""

import pytest
import torch

from quantseal.compress.cbq_linear import CBQLinear, rectified_sigmoid, rounding_regularizer
from quantseal.compress.formats import FormatSpec
from quantseal.compress.quantizers import dequantize, quantize_int


def test_rounding_regularizer_and_rectified_sigmoid():
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0
    v = torch.tensor([-50.0, 0.0, 50.0])
    assert rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]


def test_lora_rounding_starts_at_round_to_nearest():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 12)
    spec = FormatSpec("int", 2, 16)
    ql = CBQLinear(lin, spec, rank=4)
    rtn = quantize_int(lin.weight.detach(), spec)
    qt = ql.to_quantized()
    assert torch.equal(qt.codes, rtn.codes) and torch.equal(qt.scales, rtn.scales)
    # the training forward sees exactly the integer weights (straight-through hard rounding)
    assert torch.equal(ql.weight_hat().detach(), dequantize(rtn))
    # without hard_forward the soft weights reproduce W wherever it is not clipped (h(V₀) is the
    # rest of W / s₀), as in AdaRound
    soft = CBQLinear(lin, spec, rank=4, hard_forward=False)
    q, _ = soft.codes()
    inside = ((q > 0) & (q < 3)).reshape(12, -1)[:, :40]
    assert torch.allclose(soft.weight_hat()[inside], lin.weight.detach()[inside], atol=1e-6)


@pytest.mark.parametrize("rank", [0, 4])
def test_given_codes_are_the_starting_point(rank):
    """init=QuantizedTensor (e.g. GPTQ's codes, which need not be nearest rounding): CBQ starts
    from exactly those integers and scales."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(40, 12)
    spec = FormatSpec("int", 3, 16)
    start = quantize_int(lin.weight.detach(), spec)
    g = torch.Generator().manual_seed(0)  # move some codes one step away from nearest rounding
    flip = (torch.rand(start.codes.shape, generator=g) < 0.3) & (start.codes < 7)
    flip[:, 40:] = False  # the padded columns keep the zero point
    start.codes = (start.codes.int() + flip.int()).to(torch.uint8)
    ql = CBQLinear(lin, spec, rank=rank, init=start)
    qt = ql.to_quantized()
    assert torch.equal(qt.codes, start.codes) and torch.equal(qt.scales, start.scales)
    assert torch.equal(ql.weight_hat().detach(), dequantize(start))
    with pytest.raises(ValueError):
        CBQLinear(lin, FormatSpec("int", 2, 16), rank=rank, init=start)
