"""Backbone swap (seed 003 G1): the trained head survives bit for bit, the output shape is the original's, the new
model traces, exports and matches onnxruntime, distillation reduces the KD loss, and the target check lists what
a restrictive target cannot run in integer."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.algorithms.backbone import SwappedModel, downsample_plan, swap_backbone
from edgeslim.algorithms.finetune import finetune
from edgeslim.api import export_fp32_onnx
from edgeslim.config import FinetuneConfig
from edgeslim.errors import EdgeslimError
from edgeslim.eval.profile import profile
from edgeslim.graph.capture import capture
from edgeslim.train.data import TrainData
from edgeslim.train.losses import distillation_loss
from edgeslim.models.resnet import resnet18
from edgeslim.models.resnet_cifar import resnet20
from edgeslim.targets import TARGETS

BACKBONES = ("mobilenet_v2", "shufflenet_v2")
CASES = [("resnet20", resnet20, (3, 32, 32), "linear"), ("resnet18", lambda: resnet18(10), (3, 64, 64), "fc")]


def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _x(shape, n=2, seed=1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def swapped():
    """(case, backbone) -> (original, new, record), built once for the module."""
    out = {}
    for name, factory, shape, _ in CASES:
        for bb in BACKBONES:
            original = _seeded(factory)
            new, rec = swap_backbone(original, shape, backbone=bb, width=0.5 if name == "resnet20" else 1.0)
            out[name, bb] = (original, new, rec)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] if isinstance(c, tuple) else c)
@pytest.mark.parametrize("bb", BACKBONES)
def test_swap_keeps_head_and_output_shape(swapped, case, bb):
    name, _, shape, fc = case
    original, new, rec = swapped[name, bb]
    assert isinstance(new, SwappedModel)
    x = _x(shape)
    with torch.no_grad():
        assert new(x).shape == original(x).shape
    lin_new, lin_old = new.head.get_submodule(fc), original.get_submodule(fc)
    assert lin_new is not lin_old
    assert torch.equal(lin_new.weight, lin_old.weight) and torch.equal(lin_new.bias, lin_old.bias)
    assert rec.head_modules == ("avgpool", fc) and rec.pool_node == "avgpool"
    assert rec.backbone == bb and rec.target is None and rec.unsupported is None
    # the head alone reproduces the original on the original's features
    feats = {}
    last = original.layer3 if name == "resnet20" else original.layer4
    hook = last.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        ref = original(x)
        hook.remove()
        assert torch.equal(new.head(feats["f"]), ref)
    assert rec.feature_shape == tuple(feats["f"].shape[1:])
    assert rec.adapters[-1].name == "adapter.channels" and rec.adapters[-1].out_shape == rec.feature_shape


@pytest.mark.parametrize("bb", BACKBONES)
def test_costs_match_profile_and_resnet18_gets_lighter(swapped, bb):
    for name, _, shape, _ in CASES:
        original, new, rec = swapped[name, bb]
        for model, params, macs in ((original, rec.params_before, rec.macs_before),
                                    (new, rec.params_after, rec.macs_after)):
            assert params == sum(p.numel() for p in model.parameters())
            assert macs == sum(r.macs for r in profile(capture(copy.deepcopy(model), shape)))
    rec18 = swapped["resnet18", bb][2]
    assert rec18.downsample == 5 and rec18.backbone_shape[1:] == rec18.feature_shape[1:] == (2, 2)
    assert rec18.macs_after < rec18.macs_before / 4 and rec18.params_after < rec18.params_before / 4
    rec20 = swapped["resnet20", bb][2]
    assert rec20.downsample == 2 and rec20.backbone_shape[1:] == rec20.feature_shape[1:] == (8, 8)
    assert rec20.macs_before == 40_551_040  # ResNet-20: 40.6M MACs, 0.27M parameters
    # at width 0.5 on CIFAR, ShuffleNetV2 is lighter than ResNet-20; MobileNetV2 is not (75.5M MACs)
    assert (rec20.macs_after < rec20.macs_before) == (bb == "shufflenet_v2")


@pytest.mark.parametrize("bb", BACKBONES)
def test_export_matches_onnxruntime(swapped, bb, tmp_path):
    _, new, _ = swapped["resnet20", bb]
    path = export_fp32_onnx(new, (3, 32, 32), tmp_path / "swapped.onnx")
    counts = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    convs = sum(isinstance(m, nn.Conv2d) for m in new.modules())
    assert counts["Conv"] == convs and counts["GlobalAveragePool"] == 1 and counts["Gemm"] == 1
    assert counts["BatchNormalization"] == 0  # folded by the exporter in eval mode
    x = _x((3, 32, 32), n=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = new(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.slow  # ~5 s on an idle 2-core machine: over the fast suite's budget
def test_finetune_with_distillation_reduces_kd_loss():
    teacher = _seeded(resnet20)
    new, _ = swap_backbone(teacher, (3, 32, 32), backbone="shufflenet_v2", width=0.5)
    gen = torch.Generator().manual_seed(0)
    data = TrainData(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen),
                     torch.zeros(3))
    cfg = FinetuneConfig(epochs=6, batch_size=8, lr=0.02, augment=False)  # 24 steps

    def kd() -> float:
        with torch.no_grad():
            return float(distillation_loss(new.eval()(data.x), data.y, teacher(data.x), weight=cfg.kd_weight,
                                           temperature=cfg.temperature))

    before = kd()
    head_before = new.head.linear.weight.clone()
    result = finetune(new, data, cfg, teacher=teacher, progress=False)
    assert result["steps"] == 24
    assert kd() < 0.5 * before
    assert not torch.equal(new.head.linear.weight, head_before)  # the whole model trains, the head included


def test_target_check_lists_unsupported_ops():
    model = _seeded(resnet20)
    _, rec = swap_backbone(model, (3, 32, 32), backbone="shufflenet_v2", width=0.5, target=TARGETS["vta"])
    vta = TARGETS["vta"]
    assert rec.target == "vta" and rec.unsupported_before == {"avgpool": "avgpool"}
    kinds = Counter(rec.unsupported.values())
    # 16 units, each with a depthwise conv and a concat; the 3 first units have a second depthwise conv
    assert kinds["depthwise"] == 16 + 3 and kinds["concat"] == 16 and kinds["avgpool"] == 1
    assert not set(kinds) & set(vta.int_ops)
    assert any("stay FP32" in n for n in rec.notes)
    assert json.loads(rec.to_json())["unsupported"] == rec.unsupported
    _, rec_cpu = swap_backbone(model, (3, 32, 32), backbone="mobilenet_v2", width=0.5, target=TARGETS["cpu-int8"])
    assert rec_cpu.unsupported == {} and rec_cpu.unsupported_before == {}


class MeanHead(nn.Module):
    """Functional ops, 1 input channel, features 1x1 at 64x64 (deeper than five stride-2 layers), an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 8, 8, 3, 2, 1) for i in range(6))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        for conv in self.convs:
            x = F.relu6(conv(x))
        return self.classifier(x.mean((2, 3)))


def test_functional_pool_mlp_head_and_spatial_adapter():
    model = _seeded(MeanHead)
    new, rec = swap_backbone(model, (1, 64, 64), backbone="mobilenet_v2", width=0.25)
    assert rec.split_node == "relu6_5" and rec.pool_node == "mean"
    assert rec.head_modules == ("classifier.0", "classifier.1", "classifier.2", "classifier.3")
    assert [a.name for a in rec.adapters] == ["adapter.down0", "adapter.channels"]
    assert rec.adapters[0].in_shape[1:] == (2, 2) and rec.adapters[-1].out_shape == (8, 1, 1)
    assert isinstance(new.adapter.channels[2], nn.ReLU6)  # the original's features end in ReLU6
    x = _x((1, 64, 64))
    with torch.no_grad():
        assert new(x).shape == model(x).shape == (2, 4)
    assert torch.equal(new.head.get_submodule("classifier.3").weight, model.classifier[3].weight)


def test_downsample_plan():
    assert downsample_plan((224, 224), (7, 7)) == (5, 0)  # ImageNet schedule
    assert downsample_plan((32, 32), (8, 8)) == (2, 0)  # ResNet-20: stride-1 stem, CIFAR-style
    assert downsample_plan((32, 32), (4, 4)) == (3, 0)
    assert downsample_plan((100, 100), (4, 4)) == (5, 0)  # ceil halving: 100 -> 50 -> 25 -> 13 -> 7 -> 4
    assert downsample_plan((256, 256), (2, 2)) == (5, 2)
    assert downsample_plan((32, 32), (6, 6)) == (2, 0)  # unreachable: nearest size, no adapter


class NoPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, 2, 1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class ConvClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.cls = nn.Conv2d(3, 10, 3, 2, 1), nn.Conv2d(10, 10, 1)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.cls(self.conv(x)), 1), 1)


@pytest.mark.parametrize("model", [NoPool(), ConvClassifier()], ids=["no-pool", "no-linear"])
def test_model_without_pool_and_linear_head_is_an_error(model):
    with pytest.raises(EdgeslimError, match="no global average pool followed by a Linear") as info:
        swap_backbone(model, (3, 16, 16))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [({"backbone": "efficientnet"}, "unknown backbone 'efficientnet'"),
                                           ({"width": 0}, "invalid backbone width"),
                                           ({"target": "vta"}, "target must be")])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(EdgeslimError, match=match) as info:
        swap_backbone(resnet20(), (3, 32, 32), **kwargs)
    assert "\n" not in str(info.value)
