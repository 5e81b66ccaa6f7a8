"""ONNX -> torch.fx importer (edgeslim.io.onnx_import), checked against onnxruntime on the original file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

import edgeslim
from edgeslim import api
from edgeslim.errors import EdgeslimError
from edgeslim.models import build_model

FASTESTDET = Path(__file__).resolve().parents[3] / "shared" / "models" / "fastestdet" / "FastestDet.onnx"


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _max_diff(model: onnx.ModelProto | Path, gm: fx.GraphModule, *inputs: np.ndarray) -> float:
    """max |onnxruntime - imported| over every output."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs)})
    with torch.no_grad():
        got = gm(*(torch.from_numpy(x) for x in inputs))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert tuple(g.shape) == r.shape
    return max(float(np.abs(r - g.numpy()).max()) for r, g in zip(ref, got))


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, *, dynamic: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    return path


def _seed_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _modules(gm: fx.GraphModule) -> set[type]:
    return {type(m) for m in gm.modules()}


# ---------------------------------------------------------------------------------------------- torch exports

class PoseNet(nn.Module):
    """Strided Conv-BN-ReLU backbone, ConvTranspose2d(stride 2, output_padding 1)-BN-ReLU head, 1x1 heatmaps."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
                                  nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))

    def forward(self, x):
        return self.head(self.backbone(x))


def test_pose_network_matches_onnxruntime_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    path = _export(_seed_bn(PoseNet()), (3, 16, 16), tmp_path / "pose.onnx")
    gm = edgeslim.import_onnx(path)
    assert {nn.Conv2d, nn.ConvTranspose2d} <= _modules(gm)
    assert gm.meta["onnx_input_shape"] == (3, 16, 16) and gm.meta["onnx_dynamic_batch"]
    assert gm.meta["onnx_path"] == str(path)
    for batch in (1, 3):
        assert _max_diff(path, gm, _rand(batch, 3, 16, 16, seed=batch)) <= 1e-4


class ShuffleBlock(nn.Module):
    """ShuffleNetV2-style split / shuffle (Shape-derived reshapes), pools, Resize, Pad, Clip and friends."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Hardswish(), nn.Hardsigmoid())
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)  # Slice on Shape-derived bounds
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.size()  # channel shuffle: Shape -> Gather -> Concat -> Reshape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)
        y = F.max_pool2d(x, 3, 2, 1) + F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2)[:, :, :8, :8]
        y = F.interpolate(torch.clamp(y, -1.0, 2.0), scale_factor=2, mode="nearest")  # Clip, Resize
        y = (y - 0.5) * torch.sigmoid(y) / 2.0 + x[:, 2:6].sum(1, keepdim=True)
        down = F.interpolate(y, scale_factor=0.5, mode="bilinear")  # linear Resize, pytorch_half_pixel
        y = y + F.interpolate(down, size=y.shape[2:], mode="bilinear", align_corners=True)  # sizes from Shape
        y = torch.cat([y.mean((2, 3)), x[:, :, 0, 0].unsqueeze(-1).squeeze(-1)], 1)  # ReduceMean, Slice
        return torch.softmax(self.fc(torch.flatten(y, 1)), dim=1)


def test_shuffle_block_matches_onnxruntime(tmp_path):
    torch.manual_seed(1)
    path = _export(_seed_bn(ShuffleBlock()), (3, 16, 16), tmp_path / "shuffle.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "ConstantOfShape", "Reshape", "Transpose", "Resize", "Pad", "Clip", "Softmax", "Gemm"} <= ops
    gm = edgeslim.import_onnx(path)
    assert {nn.Conv2d, nn.Linear, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.MaxPool2d, nn.AvgPool2d} \
        <= _modules(gm)
    assert gm.meta["onnx_dynamic_batch"]
    for batch in (1, 2):
        assert _max_diff(path, gm, _rand(batch, 3, 16, 16, seed=batch)) <= 1e-4


def test_edgeslim_fp32_export_round_trips_and_quantizes_like_the_original(tiny_model, tiny_calib, tmp_path):
    path = api.export_fp32_onnx(tiny_model, (3, 16, 16), tmp_path / "fp32.onnx")
    gm = edgeslim.import_onnx(path)
    assert _max_diff(path, gm, _rand(2, 3, 16, 16)) <= 1e-4
    config = edgeslim.PTQConfig()
    q_ref, q_imp = api.quantize(tiny_model, tiny_calib, config), api.quantize(gm, tiny_calib, config)
    assert [n.op for n in q_imp.intgraph.layers()] == [n.op for n in q_ref.intgraph.layers()]
    x = torch.from_numpy(_rand(8, 3, 16, 16, seed=3))
    with torch.no_grad():
        ref, got = q_ref.model(x), q_imp.model(x)
    assert torch.allclose(ref, got, atol=0.05)


# ---------------------------------------------------------------------------------------------- hand-built graphs

def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _ints(name: str, values: list[int]) -> TensorProto:
    return _init(name, np.array(values, dtype=np.int64))


def _model(nodes, inits, inputs, outputs, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _with_axes(op: str, x: str, out: str, axes: list[int], opset: int, inits: list, **attrs) -> onnx.NodeProto:
    """Squeeze / Unsqueeze / Split / ReduceMean: axes (or split sizes) as an attribute or, later, an input."""
    moved = {"Squeeze": 13, "Unsqueeze": 13, "Split": 13, "ReduceMean": 18}[op]
    key = "split" if op == "Split" else "axes"
    outputs = out.split(",")
    if opset < moved:
        return helper.make_node(op, [x], outputs, **{key: axes}, **attrs)
    inits.append(_ints(f"{out}_{key}", axes))
    return helper.make_node(op, [x, f"{out}_{key}"], outputs, **attrs)


def _shuffle_graph(opset: int) -> onnx.ModelProto:
    """FastestDet's channel shuffle (Reshape / Transpose / Reshape, Gather halves) with a Shape-derived batch,
    plus the ops whose arguments moved between opsets 11 and 18."""
    rng = np.random.default_rng(opset)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = [_init("w1", w(8, 3, 3, 3)), _init("b1", w(8)),
             _init("g", w(8) + 1.5), _init("beta", w(8)), _init("mean", w(8)), _init("var", np.abs(w(8)) + 0.5),
             _ints("i0", [0]), _ints("tail", [2, 4, 8, 8]), _ints("tail2", [8, 8, 8]), _ints("idx0", 0),
             _ints("idx1", 1), _init("half", np.array(0.5, np.float32)), _init("lo", np.array(0.0, np.float32)),
             _init("hi", np.array(6.0, np.float32)), _init("wfc", w(4, 3)), _init("bfc", w(3)), _init("wmm", w(4, 5)),
             _init("bmm", w(5))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="stem/conv"),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Shape", ["bn"], ["shp"]),
        helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "tail"], ["shape5"], axis=0),
        helper.make_node("Reshape", ["bn", "shape5"], ["r5"]),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[1, 0, 2, 3, 4]),
        helper.make_node("Reshape", ["t5", "shape5"], ["shuffled5"]),  # [N, 2, 4, 8, 8] -> [2, N, 4, 8, 8] -> back
        helper.make_node("Gather", ["shuffled5", "idx0"], ["left"], axis=1),
        helper.make_node("Gather", ["shuffled5", "idx1"], ["right"], axis=1),
        helper.make_node("HardSigmoid", ["right"], ["hs"]),  # ONNX defaults alpha 0.2, beta 0.5
        helper.make_node("Clip", ["left", "lo", "hi"] if opset >= 11 else ["left"], ["relu6"],
                         **({} if opset >= 11 else {"min": 0.0, "max": 6.0})),
        helper.make_node("Mul", ["hs", "half"], ["hs2"]),
        helper.make_node("Concat", ["relu6", "hs2"], ["cat"], axis=1),
        helper.make_node("Pad", ["cat", "pads"], ["padded"], mode="reflect"),
        helper.make_node("MaxPool", ["padded"], ["mp"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Resize", ["mp", "roi", "scales"], ["up"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        _with_axes("Split", "up", "s0,s1", [5, 3], opset, inits, axis=1),
        helper.make_node("Sub", ["s1", "s1"], ["zero"]),
        helper.make_node("Div", ["s0", "half"], ["s0d"]),
        _with_axes("ReduceMean", "s0d", "gap", [2, 3], opset, inits, keepdims=0),
        _with_axes("Unsqueeze", "gap", "gap3", [1], opset, inits),
        _with_axes("Squeeze", "gap3", "gap2", [1], opset, inits),
        helper.make_node("Slice", ["gap2", "st", "en", "ax"], ["sl"]),
        helper.make_node("Gemm", ["sl", "wfc", "bfc"], ["logits"], alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
        helper.make_node("Flatten", ["zero"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "st", "en5", "ax"], ["flat4"]),
        helper.make_node("MatMul", ["flat4", "wmm"], ["mm"]),
        helper.make_node("Add", ["mm", "bmm"], ["feat"]),
    ]
    inits += [_ints("pads", [0, 0, 1, 1, 0, 0, 1, 1]), _init("scales", np.array([1, 1, 2, 2], np.float32)),
              _init("roi", np.zeros(0, np.float32)),
              _ints("st", [0]), _ints("en", [4]), _ints("en5", [4]), _ints("ax", [1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3]),
               helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 5])]
    return _model(nodes, inits, inputs, outputs, opset)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_hand_built_shuffle_graph_matches_onnxruntime(opset):
    model = _shuffle_graph(opset)
    gm = edgeslim.import_onnx(model)
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.MaxPool2d, nn.Softmax} <= _modules(gm)
    linears = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(m.bias is not None for m in linears)  # MatMul + Add became one Linear
    targets = {n.target for n in gm.graph.nodes}
    assert torch.select in targets and F.interpolate in targets
    assert gm.meta["onnx_dynamic_batch"]
    for batch in (1, 2):
        assert _max_diff(model, gm, _rand(batch, 3, 8, 8, seed=batch)) <= 1e-4


def test_window_ops_with_auto_pad_asymmetric_pads_and_output_shape():
    rng = np.random.default_rng(9)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = [_init("w1", w(4, 2, 3, 3)), _init("w2", w(4, 4, 2, 2)), _init("wt", w(4, 3, 3, 3)), _init("bt", w(3)),
             _init("slope", np.abs(w(3, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], auto_pad="SAME_UPPER", strides=[2, 2]),  # 9x9 -> 5x5
        helper.make_node("Conv", ["a", "w2"], ["b"], pads=[0, 0, 1, 1]),  # asymmetric: 5x5 -> 5x5
        helper.make_node("Elu", ["b"], ["be"], alpha=0.7),
        helper.make_node("ConvTranspose", ["be", "wt", "bt"], ["c"], strides=[2, 2], output_shape=[10, 10]),
        helper.make_node("PRelu", ["c", "slope"], ["cp"]),
        helper.make_node("MaxPool", ["cp"], ["d"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"),
        helper.make_node("AveragePool", ["d"], ["e"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("GlobalMaxPool", ["e"], ["y"]),
    ]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 9, 9])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 1, 1])], 13)
    gm = edgeslim.import_onnx(model)
    assert {nn.ConvTranspose2d, nn.PReLU, nn.ELU, nn.AdaptiveMaxPool2d} <= _modules(gm)
    assert _max_diff(model, gm, _rand(2, 2, 9, 9, seed=4)) <= 1e-4


def test_opset_9_attribute_forms_and_2d_softmax():
    nodes = [helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 0, 0, 0, 0, 2], value=0.5),
             helper.make_node("Clip", ["p"], ["c"], min=-0.5, max=0.8),
             helper.make_node("Upsample", ["c", "scales"], ["u"], mode="nearest"),
             helper.make_node("Slice", ["u"], ["s"], starts=[1, 0], ends=[100, -1], axes=[2, 3]),
             helper.make_node("Unsqueeze", ["s"], ["s5"], axes=[0]),
             helper.make_node("Squeeze", ["s5"], ["s4"], axes=[0]),
             helper.make_node("Softmax", ["s4"], ["y"], axis=1)]  # before opset 13: over C*H*W at once
    model = _model(nodes, [_init("scales", np.array([1, 1, 2, 3], np.float32))],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 7, 14])], 9)
    gm = edgeslim.import_onnx(model)
    for batch in (1, 2):
        assert _max_diff(model, gm, _rand(batch, 2, 3, 3, seed=batch)) <= 1e-4


def test_a_batch_baked_into_a_reshape_imports_for_that_batch():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    model = _model(nodes, [_ints("shape", [1, 2, 8])], [helper.make_tensor_value_info("x", 1, ["N", 4, 2, 2])],
                   [helper.make_tensor_value_info("y", 1, [1, 2, 8])], 13)
    gm = edgeslim.import_onnx(model)
    assert not gm.meta["onnx_dynamic_batch"]
    assert _max_diff(model, gm, _rand(1, 4, 2, 2)) == 0


def _classifier() -> onnx.ModelProto:
    """Conv-BN-ReLU-GAP-Flatten-Gemm, as a foreign exporter writes it (BN not folded)."""
    rng = np.random.default_rng(5)
    inits = [_init("w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
             _init("g", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
             _init("b", rng.uniform(-0.2, 0.2, 8).astype(np.float32)),
             _init("m", rng.uniform(-0.5, 0.5, 8).astype(np.float32)),
             _init("v", rng.uniform(0.5, 2.0, 8).astype(np.float32)),
             _init("fw", rng.standard_normal((4, 8)).astype(np.float32)),
             _init("fb", rng.standard_normal(4).astype(np.float32) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="features.conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="features.bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="features.relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="pool"),
             helper.make_node("Flatten", ["gap"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="classifier")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], 13)


def test_imported_classifier_goes_through_the_quantization_pipeline(tmp_path):
    model = _classifier()
    gm = edgeslim.import_onnx(model)
    names = dict(gm.named_children())
    assert isinstance(names["features_conv"], nn.Conv2d) and isinstance(names["features_bn"], nn.BatchNorm2d)
    assert isinstance(names["classifier"], nn.Linear) and isinstance(names["pool"], nn.AdaptiveAvgPool2d)
    calib = torch.from_numpy(_rand(32, 3, 12, 12, seed=7))
    q = api.quantize(gm, calib)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.model.modules())  # fold_bn saw the module
    x = torch.from_numpy(_rand(16, 3, 12, 12, seed=8))
    with torch.no_grad():
        ref, got = gm(x), q.model(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum())
    assert sqnr > 20
    int8 = api.export_onnx(q, tmp_path / "int8.onnx")
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert (out.argmax(1) == ref.argmax(1).numpy()).mean() >= 0.75


def test_build_model_reads_onnx_files(tmp_path):
    path = tmp_path / "clf.ONNX"
    onnx.save(_classifier(), str(path))
    model, info = build_model(str(path))
    assert isinstance(model, fx.GraphModule)
    assert info.input_shape == (3, 12, 12) and info.num_classes == 4
    _, resized = build_model(str(path), input_shape=(3, 16, 16))
    assert resized.input_shape == (3, 16, 16)
    with pytest.raises(EdgeslimError, match="carries its own weights"):
        build_model(str(path), str(tmp_path / "w.pt"))


def test_imported_onnx_classifier_runs_through_mixed_and_qat_commands(tmp_path, capsys):
    from PIL import Image

    from edgeslim.cli import main

    path = tmp_path / "clf.onnx"
    onnx.save(_classifier(), str(path))
    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
    data = str(tmp_path / "img")
    assert main(["mixed", str(path), "--calib-data", data, "--data", data, "--calib-size", "8", "--holdout-size", "50",
                 "--max-drop", "0.5", "--out", str(tmp_path / "mixed")]) == 0
    assert main(["qat", str(path), "--train-data", data, "--data", data, "--max-steps", "2", "--batch-size", "8",
                 "--calib-size", "8", "--out", str(tmp_path / "qat")]) == 0
    s = json.loads((tmp_path / "qat" / "summary.json").read_text())
    assert s["training"]["steps"] == 2 and "top1" in s["onnx"]


# ---------------------------------------------------------------------------------------------- FastestDet

def test_fastestdet_matches_onnxruntime():
    if not FASTESTDET.is_file():
        pytest.skip(f"{FASTESTDET} is not present")
    gm = edgeslim.import_onnx(FASTESTDET)
    batch = 2 if gm.meta["onnx_dynamic_batch"] else 1
    c, h, w = gm.meta["onnx_input_shape"]
    assert _max_diff(FASTESTDET, gm, _rand(batch, c, h, w, seed=11)) <= 1e-4


# ---------------------------------------------------------------------------------------------- errors

def _one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(EdgeslimError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unsupported_ops_are_all_named_at_once():
    nodes = [helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=2),
             helper.make_node("FancyOp", ["y"], ["z"], domain="custom.domain"),
             helper.make_node("FancyOp", ["z"], ["out"], domain="custom.domain")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [_init("w", np.zeros((1, 8, 2), np.float32)),
                               _init("r", np.zeros((1, 8, 2), np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    msg = _one_line_error("unsupported ONNX op", edgeslim.import_onnx, model)
    assert "LSTM" in msg and "custom.domain.FancyOp" in msg and "(3 nodes)" in msg and "supported: " in msg


def test_missing_corrupt_and_dynamic_files_are_one_line_errors(tmp_path):
    _one_line_error("does not exist", edgeslim.import_onnx, tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _one_line_error("junk.onnx", edgeslim.import_onnx, junk)
    model = _classifier()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    _one_line_error("dynamic dimension 2", edgeslim.import_onnx, model)
    no_inputs = helper.make_model(helper.make_graph([helper.make_node("Constant", [], ["y"], value_float=1.0)],
                                                    "g", [], [helper.make_tensor_value_info("y", 1, [])]))
    _one_line_error("no inputs", edgeslim.import_onnx, no_inputs)


def test_resize_modes_torch_cannot_compute_are_refused():
    nodes = [helper.make_node("Resize", ["x", "roi", "s"], ["y"], mode="cubic")]
    model = _model(nodes, [_init("s", np.array([1, 1, 2, 2], np.float32)), _init("roi", np.zeros(0, np.float32))],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], 13)
    _one_line_error("mode=cubic", edgeslim.import_onnx, model)
