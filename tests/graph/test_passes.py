import pytest
import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.graph.capture import capture
from edgeslim.graph.passes import fold_bn, fuse_conv_act
from edgeslim.quant.modules import ConvAct


def test_fold_bn_keeps_the_function(tiny_model, tiny_calib):
    gm = fold_bn(capture(tiny_model, (3, 16, 16)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(tiny_calib), tiny_model(tiny_calib), rtol=1e-5, atol=1e-5)


def test_fuse_conv_relu(tiny_model, tiny_calib):
    gm = fuse_conv_act(fold_bn(capture(tiny_model, (3, 16, 16))))
    fused = [m for m in gm.modules() if isinstance(m, ConvAct)]
    assert len(fused) == 1 and fused[0].act == "relu"  # c1 only: c2 and c3 feed residual adds
    with torch.no_grad():
        torch.testing.assert_close(gm(tiny_calib), tiny_model(tiny_calib), rtol=1e-5, atol=1e-5)


def test_fuse_relu6_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    gm = fuse_conv_act(fold_bn(capture(m, (3, 8, 8))))
    assert [type(x).__name__ for x in gm.children()] == ["ConvAct"]
    assert gm.get_submodule("0").act == "relu6"


def test_original_model_is_not_modified(tiny_model):
    before = tiny_model.c1.weight.clone()
    fold_bn(capture(tiny_model, (3, 16, 16)))
    assert torch.equal(tiny_model.c1.weight, before)  # fold_bn copies the conv it rewrites


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_is_a_one_line_error():
    with pytest.raises(EdgeslimError, match="cannot be traced by torch.fx") as info:
        capture(Untraceable(), (3, 4, 4))
    assert "\n" not in str(info.value)


def test_wrong_input_shape_is_a_clear_error():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(EdgeslimError, match="input of shape"):
        capture(m, (3, 4, 5))
