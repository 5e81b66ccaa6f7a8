"""Checkpoint reading: wrappers, prefixes, strict loading and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.io.checkpoints import load_state_dict, load_weights
from edgeslim.models import ZOO, build_model
from edgeslim.models.resnet_cifar import resnet20

SHARED_MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "nested", "legacy"])
def test_round_trip_wrappers_and_prefix(tmp_path, wrap: str) -> None:
    src = _tiny()
    sd = src.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "w.pt"
    if wrap == "plain":
        torch.save(sd, path)
    elif wrap == "nested":
        torch.save({"epoch": 3, "model": {"state_dict": prefixed}}, path)
    elif wrap == "legacy":
        torch.save({"state_dict": prefixed, "best_prec1": 91.7}, path, _use_new_zipfile_serialization=False)
    else:
        torch.save({wrap: prefixed, "optimizer": {"lr": 0.1}}, path)
    _assert_same(load_state_dict(path), sd)
    dst = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    assert load_weights(dst, str(path)) is dst
    _assert_same(dst.state_dict(), sd)


def test_compile_prefix_is_stripped(tmp_path) -> None:
    sd = _tiny().state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "c.pt")
    _assert_same(load_state_dict(tmp_path / "c.pt"), sd)


def test_missing_num_batches_tracked_is_tolerated(tmp_path) -> None:
    """Old checkpoints (e.g. the public CIFAR ResNets) lack BatchNorm's counter."""
    src = resnet20()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, tmp_path / "old.th")
    model = load_weights(resnet20(), tmp_path / "old.th", name="resnet20")
    torch.testing.assert_close(model.linear.weight, src.linear.weight)


def _raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(EdgeslimError, match=match) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    return msg


def test_missing_file_and_directory(tmp_path) -> None:
    _raises_one_line("does not exist", load_state_dict, tmp_path / "nope.pt")
    _raises_one_line("is a directory", load_state_dict, tmp_path)


@pytest.mark.parametrize("content", [b"\x13\x37 garbage bytes" * 20, b"hello world\n", b""])
def test_not_a_checkpoint(tmp_path, content: bytes) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    _raises_one_line("not a zip or pickle file", load_state_dict, tmp_path / "bad.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tmp_path, legacy: bool) -> None:
    path = tmp_path / "cut.pt"
    torch.save(resnet20().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_one_line("corrupt", load_state_dict, path)


def test_pickled_module_needs_allow_pickle(tmp_path) -> None:
    src = _tiny()
    torch.save({"model": src}, tmp_path / "full.pt")
    msg = _raises_one_line("pickled Python objects", load_state_dict, tmp_path / "full.pt")
    assert "--allow-pickle" in msg and "torch.save(model.state_dict())" in msg
    _assert_same(load_state_dict(tmp_path / "full.pt", allow_pickle=True), src.state_dict())


def test_content_that_is_not_a_state_dict(tmp_path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _raises_one_line("holds a list, not a state_dict", load_state_dict, tmp_path / "list.pt")
    torch.save({"epoch": 3, "acc": 0.9}, tmp_path / "meta.pt")
    _raises_one_line("has no state_dict .*'epoch'", load_state_dict, tmp_path / "meta.pt")
    torch.save({}, tmp_path / "empty.pt")
    _raises_one_line("has no state_dict", load_state_dict, tmp_path / "empty.pt")


def test_wrong_architecture(tmp_path) -> None:
    path = tmp_path / "r20.pt"
    torch.save(resnet20().state_dict(), path)
    msg = _raises_one_line("does not match model 'resnet32'", build_model, "resnet32", str(path))
    assert "missing keys layer1.3." in msg and "more)" in msg and "trained for this architecture" in msg

    torch.save(ZOO["resnet32"].factory().state_dict(), tmp_path / "r32.pt")
    msg = _raises_one_line("unexpected keys", load_weights, resnet20(), tmp_path / "r32.pt", name="resnet20")
    assert "layer1.3." in msg

    msg = _raises_one_line("shape mismatch", load_weights, resnet20(num_classes=100), path, name="resnet20")
    assert "linear.weight (10,64) vs (100,64)" in msg


def test_extra_prefix_hint(tmp_path) -> None:
    sd = _tiny().state_dict()
    torch.save({f"backbone.{k}": v for k, v in sd.items()}, tmp_path / "bb.pt")
    msg = _raises_one_line("extra 'backbone.' prefix", load_weights, _tiny(), tmp_path / "bb.pt")
    assert "missing keys" in msg


@pytest.mark.slow
@pytest.mark.parametrize("spec,filename", [
    ("resnet20", "resnet20-12fca82f.th"),
    ("resnet32", "resnet32-d509ac18.th"),
    ("resnet20", "resnet20_cifar10jpeg.pt"),
])
def test_public_cifar_checkpoints_load_strictly(spec: str, filename: str) -> None:
    path = SHARED_MODELS / filename
    if not path.is_file():
        pytest.skip(f"{path} not present")
    model, info = build_model(spec, str(path))
    raw = load_state_dict(path)
    for k, v in raw.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    x = torch.randn(2, *info.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.slow
def test_public_pickled_yolo_needs_allow_pickle() -> None:
    path = SHARED_MODELS / "yolov5n.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    _raises_one_line("--allow-pickle", load_state_dict, path)
