"""Zoo models: build, forward, fx-trace, layout and parameter counts; model spec errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.models import ZOO, ModelInfo, build_model, parse_shape
from edgeslim.models.resnet_cifar import CifarBasicBlock, OptionAShortcut

# Published parameter counts (He et al. 2016 table 6; torchvision model cards).
PARAM_COUNTS = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
}
# Big ImageNet models run at a small spatial size: the graph is the same, the test is fast.
SMALL_HW = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 64}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_builds_runs_and_traces(name: str) -> None:
    torch.manual_seed(0)
    model, info = build_model(name)
    assert info == ZOO[name].info and info.name == name
    assert not model.training
    c, h, w = info.input_shape
    hw = SMALL_HW.get(name)
    x = torch.randn(2, c, hw or h, hw or w)
    with torch.no_grad():
        out = model(x)
        gm = torch.fx.symbolic_trace(model)
        traced = gm(x)
    assert out.shape == (2, info.num_classes)
    torch.testing.assert_close(traced, out)
    if name in PARAM_COUNTS:
        assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_zoo_infos() -> None:
    assert set(ZOO) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "resnet50",
                        "mobilenet_v2", "digits_cnn"}
    assert ZOO["resnet20"].info.input_shape == (3, 32, 32) and ZOO["resnet20"].info.num_classes == 10
    assert ZOO["resnet50"].info.input_shape == (3, 224, 224) and ZOO["resnet50"].info.num_classes == 1000
    assert ZOO["digits_cnn"].info == ModelInfo("digits_cnn", (1, 8, 8), (0.5,), (0.5,), 10)
    with pytest.raises(Exception):
        ZOO["resnet20"].info.num_classes = 3  # type: ignore[misc]  # frozen


def test_checkpoint_key_layouts() -> None:
    """Names must match the public checkpoints; shortcuts and ReLUs add no keys."""
    r20 = set(ZOO["resnet20"].factory().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.bn2.bias",
            "layer3.2.conv2.weight", "linear.weight", "linear.bias"} <= r20
    assert not any("shortcut" in k or "relu" in k for k in r20)
    assert len(r20) == 116
    r18 = set(ZOO["resnet18"].factory().state_dict())
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "fc.weight"} <= r18
    assert not any(k.startswith("layer1.0.downsample") for k in r18)
    r50 = set(ZOO["resnet50"].factory().state_dict())
    assert {"layer1.0.downsample.0.weight", "layer4.2.conv3.weight", "layer4.2.bn3.bias"} <= r50
    mb = set(ZOO["mobilenet_v2"].factory().state_dict())
    assert {"features.0.0.weight", "features.0.1.weight", "features.1.conv.0.0.weight",
            "features.1.conv.1.weight", "features.1.conv.2.weight", "features.2.conv.0.0.weight",
            "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.2.conv.3.running_var",
            "features.17.conv.3.weight", "features.18.0.weight", "classifier.1.weight"} <= mb
    assert "features.19.0.weight" not in mb


def _option_a_numpy(x: np.ndarray, planes: int) -> np.ndarray:
    sub = x[:, :, ::2, ::2]
    pad = planes // 4
    return np.pad(sub, ((0, 0), (pad, pad), (0, 0), (0, 0)))


@pytest.mark.parametrize("in_planes,planes", [(16, 32), (32, 64)])
def test_option_a_shortcut_matches_numpy(in_planes: int, planes: int) -> None:
    x = torch.randn(2, in_planes, 8, 8)
    out = OptionAShortcut(in_planes, planes, stride=2)(x)
    np.testing.assert_array_equal(out.numpy(), _option_a_numpy(x.numpy(), planes))


def test_downsampling_block_uses_option_a() -> None:
    """A stride-2 block's residual equals conv path + the numpy shortcut (then ReLU)."""
    torch.manual_seed(0)
    block = CifarBasicBlock(16, 32, stride=2).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = np.maximum(main.numpy() + _option_a_numpy(x.numpy(), 32), 0)
        np.testing.assert_allclose(block(x).numpy(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x))


def test_digits_cnn_has_residual_add() -> None:
    gm = torch.fx.symbolic_trace(ZOO["digits_cnn"].factory())
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert any(getattr(t, "__name__", "") == "add" for t in targets)


def test_build_model_loads_weights(tmp_path) -> None:
    src = ZOO["digits_cnn"].factory()
    path = tmp_path / "d.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    model, _ = build_model("digits_cnn", str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_overrides_and_bad_values() -> None:
    _, info = build_model("resnet18", input_shape=(3, 160, 160))
    assert info.input_shape == (3, 160, 160) and info.mean == ZOO["resnet18"].info.mean
    with pytest.raises(EdgeslimError, match="mean has 2 values"):
        build_model("resnet20", mean=(0.1, 0.2))
    with pytest.raises(EdgeslimError, match="positive std"):
        build_model("resnet20", std=(0.0,))
    with pytest.raises(EdgeslimError, match="not C,H,W"):
        build_model("resnet20", input_shape=(3, 32))


def test_parse_shape() -> None:
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_shape("1x8x8") == (1, 8, 8)
    for bad in ("3,224", "a,b,c", "3,0,4", ""):
        with pytest.raises(EdgeslimError, match="C,H,W"):
            parse_shape(bad)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(EdgeslimError) as err:
        build_model("resnet21")
    msg = str(err.value)
    assert "unknown model 'resnet21'" in msg and "resnet20" in msg and "digits_cnn" in msg
    assert "\n" not in msg


USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 7)
        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def make():
        return Net()

    def make_declared():
        net = Net()
        net.edgeslim_info = {"input_shape": (3, 16, 16), "mean": (0.5,), "std": (0.25,)}
        return net

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("boom")

    VALUE = 3
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "es_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "es_user_models.py"


def test_user_model_spec(user_module) -> None:
    model, info = build_model("es_user_models:make", input_shape=(3, 12, 12))
    assert isinstance(model, nn.Module) and not model.training
    assert info == ModelInfo("es_user_models:make", (3, 12, 12), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 7)
    _, declared = build_model("es_user_models:make_declared")
    assert declared.input_shape == (3, 16, 16) and declared.std == (0.25,) and declared.num_classes == 7
    _, by_path = build_model(f"{user_module}:make", input_shape=(3, 8, 8))
    assert by_path.num_classes == 7


@pytest.mark.parametrize("spec,kwargs,match", [
    ("es_user_models:make", {}, "pass --input-shape"),
    ("es_user_models:make", {"input_shape": (1, 8, 8)}, "fails on input shape"),
    ("es_user_models:missing", {}, "has no attribute 'missing'"),
    ("es_user_models:VALUE", {}, "not callable"),
    ("es_user_models:not_a_model", {}, "not a torch.nn.Module"),
    ("es_user_models:broken", {}, "raised RuntimeError: boom"),
    ("es_no_such_module_xyz:make", {}, "cannot import module"),
    ("es_user_models:", {}, "malformed"),
    ("/nonexistent/dir/models.py:make", {}, "does not exist"),
])
def test_bad_user_specs(user_module, spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(EdgeslimError, match=match) as err:
        build_model(spec, **kwargs)
    assert "\n" not in str(err.value)
