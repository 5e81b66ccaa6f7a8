"""Zoo architectures and concatenation go through quantize -> ONNX with every conv integer in onnxruntime."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.eval import ort as ort_eval
from edgeslim.models import build_model


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.head(y)


def _check(model, shape, tmp_path, n_convs):
    torch.manual_seed(0)
    calib = torch.randn(16, *shape)
    q = api.quantize(model, calib, PTQConfig())
    path = api.export_onnx(q, tmp_path / "m.onnx")
    assert ort_eval.integer_convs(path) == (n_convs, n_convs)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = q.model(x).numpy()
    got = ort_eval.predict(ort_eval.session(path), x.numpy())
    return q, got, expected


def test_concat_requantizes_inputs(tmp_path):
    q, got, expected = _check(CatNet().eval(), (3, 8, 8), tmp_path, 3)
    assert any(n.op == "QLinearConcat" for n in q.intgraph.nodes)
    out_scale = q.intgraph.qparams[q.intgraph.nodes[-1].inputs[0]].scale
    assert np.abs(got - expected).max() <= out_scale * 1.01


@pytest.mark.parametrize("name,shape,convs", [("mobilenet_v2", (3, 32, 32), 52), ("resnet18", (3, 32, 32), 20)])
def test_zoo_models_export_as_integer(tmp_path, name, shape, convs):
    model, _ = build_model(name, input_shape=shape)
    q, got, expected = _check(model, shape, tmp_path, convs)
    assert (got.argmax(1) == expected.argmax(1)).all()
