"""The quantized modules' declared slots (weight / activation quantizer, learned rounding, bias correction) and
the graph-wide modes (``ptq.set_mode`` / ``ptq.mode``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import api
from edgeslim.algorithms import ptq
from edgeslim.config import PTQConfig
from edgeslim.errors import EdgeslimError
from edgeslim.quant import primitives as P
from edgeslim.quant.modules import ActQuant, ConvAct, QuantConv2d, QuantLinear, QuantSpec


class Eighths(nn.Module):
    """A stand-in weight / activation quantizer: round to multiples of 1/8."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.tensor(0.125))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.step) * self.step


def _conv() -> QuantConv2d:
    torch.manual_seed(0)
    return QuantConv2d.from_float(ConvAct(nn.Conv2d(3, 4, 3, padding=1), "relu"), QuantSpec(bits=4, per_channel=True))


def _net() -> nn.Module:
    """No batch norm: the float mode is then exactly this module (folding changes nothing)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _state(gm):
    return ([m.mode for m in gm.modules() if isinstance(m, ActQuant)],
            [m.quant_enabled for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))])


def test_empty_slots_add_no_state_dict_keys():
    conv = _conv()
    assert set(conv.state_dict()) == {"weight", "bias", "w_scale", "w_zero_point", "input_scale"}
    assert set(ActQuant(QuantSpec()).state_dict()) == {"scale", "zero_point"}
    assert conv.wq is None and conv.round_up is None and conv.bias_delta is None


def test_weight_quantizer_slot_is_the_quantizer_applied_by_hand():
    conv, x = _conv(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rtn = F.relu(F.conv2d(x, P.fake_quantize(conv.weight, conv.w_scale, conv.w_zero_point, conv.w_qmin,
                                             conv.w_qmax, conv.w_axis), conv.bias, padding=1))
    with torch.no_grad():
        assert torch.equal(conv(x), rtn)
        conv.set_weight_quantizer(Eighths())
        by_hand = F.relu(F.conv2d(x, torch.round(conv.weight / 0.125) * 0.125, conv.bias, padding=1))
        assert torch.equal(conv(x), by_hand)
        assert not torch.equal(by_hand, rtn)
        assert set(conv.state_dict()) == {"weight", "bias", "w_scale", "w_zero_point", "input_scale", "wq.step"}
        conv.set_weight_quantizer(None)
        assert torch.equal(conv(x), rtn)


def test_weight_quantizer_state_loads_under_its_old_key():
    conv = _conv()
    conv.set_weight_quantizer(Eighths())
    conv.wq.step.fill_(0.25)
    fresh = _conv()
    fresh.set_weight_quantizer(Eighths())
    fresh.load_state_dict(conv.state_dict())  # strict: the keys are "wq.*", as before the slot was declared
    assert float(fresh.wq.step) == 0.25


def test_activation_quantizer_slot_only_in_quant_mode():
    q, x = ActQuant(QuantSpec()), torch.linspace(-1, 1, 33)
    q.freeze(torch.tensor(-1.0), torch.tensor(1.0))
    grid = P.fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax)
    q.set_quantizer(Eighths())
    assert torch.equal(q(x), torch.round(x / 0.125) * 0.125)
    q.mode = "off"
    assert torch.equal(q(x), x)
    q.mode = "quant"
    q.set_quantizer(None)
    assert torch.equal(q(x), grid)


def test_bias_correction_accumulates_and_the_float_reference_ignores_it():
    conv = _conv()
    d1, d2 = torch.full((4,), 0.5), torch.arange(4.0)
    conv.add_bias_correction(d1)
    conv.add_bias_correction(d2)
    assert torch.equal(conv.quant_bias(), conv.bias + d1 + d2)
    conv.quant_enabled = False
    assert conv.fq_bias() is conv.bias


def test_mode_restores_each_quantizer_also_after_an_exception():
    model, x = _net(), torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    q = api.quantize(model, x, PTQConfig(), input_shape=(3, 8, 8))
    gm = q.model
    with torch.no_grad():
        quantized, fp32 = gm(x), model(x)
        with pytest.raises(RuntimeError, match="inside"):
            with ptq.mode(gm, "off") as inner:
                assert inner is gm
                assert torch.equal(gm(x), fp32)
                raise RuntimeError("inside")
        modes, enabled = _state(gm)
        assert set(modes) == {"quant"} and enabled == [True] * 3
        assert torch.equal(gm(x), quantized)
        assert not torch.equal(quantized, fp32)
    # a mixed state comes back as it was, quantizer by quantizer
    quants = [m for m in gm.modules() if isinstance(m, ActQuant)]
    quants[0].mode = "observe"
    gm.get_submodule(ptq.layer_names(gm)[1]).quant_enabled = False
    before = _state(gm)
    with ptq.mode(gm, "quant"):
        assert _state(gm) == (["quant"] * len(quants), [True] * 3)
    assert _state(gm) == before


def test_unknown_mode_is_one_error_naming_the_modes():
    model, x = _net(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    gm = api.quantize(model, x, PTQConfig(), input_shape=(3, 8, 8)).model
    before = _state(gm)
    for call in (lambda: ptq.set_mode(gm, "float"), lambda: ptq.mode(gm, "float").__enter__()):
        with pytest.raises(EdgeslimError, match=r"unknown quantization mode 'float': use one of "
                                                r"observe, histogram, quant, off"):
            call()
        assert _state(gm) == before
