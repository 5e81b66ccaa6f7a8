"""The ONNX importer against the ONNX backend node tests (tests/onnx_conformance.py), and the failures that suite
found, each checked on its own against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import edgeslim
from edgeslim.errors import EdgeslimError
from tests.onnx_conformance import STATUSES, run_suite


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(nodes, x_shape, y_shapes, inits=(), *, opset: int = 17, x_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info(name, TensorProto.BOOL if name == "mask" else TensorProto.FLOAT, shape)
         for name, shape in y_shapes],
        [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _torch(gm, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = gm(torch.from_numpy(x))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _same_as_ort(model: onnx.ModelProto, *xs: np.ndarray, atol: float = 1e-5) -> None:
    gm = edgeslim.import_onnx(model)
    for x in xs:
        for r, g in zip(_ort(model, x), _torch(gm, x), strict=True):
            assert g.shape == r.shape and g.dtype == r.dtype
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------- the suite
def test_node_suite_has_no_wrong_result_and_no_crash():
    results = run_suite()
    totals = {s: sum(r.status == s for r in results) for s in STATUSES}
    bad = [f"{r.status} {r.name}: {r.detail}" for r in results if r.status in ("wrong", "crash")]
    assert not bad, "\n".join(bad)
    assert totals["pass"] >= 450, totals  # the suite ran (about 480 of about 740 pass with onnx 1.23)
    for r in results:
        if r.status == "refused":  # a refusal names the node (or input / initializer) on one line
            assert "\n" not in r.detail and ("ONNX node '" in r.detail or "ONNX model: " in r.detail), r.detail


def test_node_suite_covers_the_fixed_ops():
    results = {r.name: r.status for r in run_suite(ops=["Gather", "Sum", "LRN", "Dropout", "ConvTranspose"])}
    for name in ("test_gather_0", "test_gather_1", "test_gather_2d_indices", "test_gather_negative_indices",
                 "test_sum_example", "test_sum_one_input", "test_lrn", "test_lrn_default",
                 "test_convtranspose_output_shape", "test_training_dropout_zero_ratio",
                 "test_training_dropout_zero_ratio_mask", "test_dropout_default_mask"):
        assert results.get(name) == "pass", (name, results.get(name))
    assert results["test_training_dropout"] == "refused"


# ---------------------------------------------------------------- the failures it found
def test_channel_flip_gather_with_a_constant_index_list():
    """``x[:, [2, 1, 0]]`` (BGR <-> RGB) and other constant index lists on a 4-D activation; dynamic batch kept."""
    for idx, axis in (([2, 1, 0], 1), ([0, 0, 2], 1), ([3, -1, 1], 3), ([[1, 0], [2, 2]], 1)):
        nodes = [helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)]
        model = _model(nodes, ["N", 3, 4, 5], [("y", None)], [("i", np.array(idx, np.int64))])
        gm = edgeslim.import_onnx(model)
        assert gm.meta["onnx_dynamic_batch"]
        _same_as_ort(model, _rand(1, 3, 4, 5), _rand(2, 3, 4, 5, seed=1))
    x = _rand(2, 3, 4, 5)
    flip = edgeslim.import_onnx(_model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], ["N", 3, 4, 5],
                                       [("y", None)], [("i", np.array([2, 1, 0], np.int64))]))
    np.testing.assert_array_equal(_torch(flip, x)[0], x[:, [2, 1, 0]])


def test_gather_index_out_of_range_is_refused():
    model = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [1, 3, 4, 4], [("y", None)],
                   [("i", np.array([0, 3], np.int64))])
    with pytest.raises(EdgeslimError, match=r"node 'y' \(Gather\).*out of range"):
        edgeslim.import_onnx(model)


def test_conv_transpose_output_shape_needing_output_padding():
    w = _rand(1, 2, 3, 3, seed=1)
    for at in ({"strides": [3, 2], "output_shape": [10, 8]}, {"strides": [3, 2], "output_shape": [8, 6]},
               {"strides": [2, 2], "output_shape": [6, 6], "auto_pad": "SAME_UPPER"}):
        model = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **at)], [1, 1, 3, 3], [("y", None)],
                       [("w", w)])
        _same_as_ort(model, _rand(1, 1, 3, 3))
        assert tuple(edgeslim.import_onnx(model)(torch.zeros(1, 1, 3, 3)).shape[2:]) == tuple(at["output_shape"][-2:])


def test_resize_pytorch_half_pixel_to_length_one():
    for sizes in ([1, 1, 3, 1], [1, 1, 1, 6], [1, 1, 1, 1]):
        nodes = [helper.make_node("Resize", ["x", "", "", "s"], ["y"], mode="linear",
                                  coordinate_transformation_mode="pytorch_half_pixel")]
        model = _model(nodes, [1, 1, 4, 4], [("y", None)], [("s", np.array(sizes, np.int64))])
        _same_as_ort(model, _rand(1, 1, 4, 4))
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear",
                              coordinate_transformation_mode="pytorch_half_pixel")]
    model = _model(nodes, [1, 2, 4, 8], [("y", None)], [("sc", np.array([1, 1, 0.25, 0.5], np.float32))])
    _same_as_ort(model, _rand(1, 2, 4, 8))


def test_resize_align_corners_with_fractional_scales_is_refused():
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear",
                              coordinate_transformation_mode="align_corners")]
    model = _model(nodes, [1, 1, 2, 4], [("y", None)], [("sc", np.array([1, 1, 0.6, 0.6], np.float32))])
    with pytest.raises(EdgeslimError, match=r"node 'y' \(Resize\).*align_corners.*sizes"):
        edgeslim.import_onnx(model)


def _dropout(training: bool, ratio: float) -> onnx.ModelProto:
    nodes = [helper.make_node("Dropout", ["x", "r", "t"], ["y", "mask"], name="drop")]
    return _model(nodes, [2, 3, 4, 4], [("y", None), ("mask", None)],
                  [("r", np.array(ratio, np.float32)), ("t", np.array(training))], opset=13)


def test_dropout_in_training_mode_is_refused_unless_its_ratio_is_zero():
    with pytest.raises(EdgeslimError, match=r"node 'drop' \(Dropout\) is in training mode"):
        edgeslim.import_onnx(_dropout(True, 0.5))
    x = _rand(2, 3, 4, 4)
    for training, ratio in ((True, 0.0), (False, 0.5)):
        y, mask = _torch(edgeslim.import_onnx(_dropout(training, ratio)), x)
        np.testing.assert_array_equal(y, x)
        assert mask.dtype == np.bool_ and mask.all() and mask.shape == x.shape
    _same_as_ort(_dropout(True, 0.0), x)


def test_sum():
    a, b = _rand(1, 3, 4, 4, seed=1), _rand(3, 1, 1, seed=2)
    nodes = [helper.make_node("Sum", ["x", "a", "b"], ["y"]), helper.make_node("Sum", ["y"], ["z"])]
    model = _model(nodes, ["N", 3, 4, 4], [("z", None)], [("a", a), ("b", b)])
    _same_as_ort(model, _rand(1, 3, 4, 4), _rand(2, 3, 4, 4, seed=3))


def _lrn_reference(x: np.ndarray, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0):
    """LRN as the ONNX specification writes it: the window is [c - floor((size-1)/2), c + ceil((size-1)/2)]."""
    c = x.shape[1]
    sq = np.zeros_like(x, dtype=np.float64)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + -(-(size - 1) // 2))
        sq[:, ch] = (x[:, lo:hi + 1].astype(np.float64) ** 2).sum(1)
    return (x / (bias + alpha / size * sq) ** beta).astype(np.float32)


def test_lrn_matches_onnxruntime_and_the_specification_for_even_sizes():
    x = _rand(2, 6, 5, 5) * 3
    for at in ({"size": 3}, {"size": 5, "alpha": 0.02, "beta": 0.5, "bias": 2.0}):
        model = _model([helper.make_node("LRN", ["x"], ["y"], **at)], ["N", 6, 5, 5], [("y", None)])
        _same_as_ort(model, x)
    for at in ({"size": 2}, {"size": 4, "alpha": 0.01, "beta": 0.5, "bias": 2.0}):  # onnxruntime takes odd only
        gm = edgeslim.import_onnx(_model([helper.make_node("LRN", ["x"], ["y"], **at)], ["N", 6, 5, 5], [("y", None)]))
        np.testing.assert_allclose(_torch(gm, x)[0], _lrn_reference(x, **at), rtol=1e-5, atol=1e-6)


def test_prelu_with_a_broadcast_slope():
    model = _model([helper.make_node("PRelu", ["x", "s"], ["y"])], [1, 3, 4, 5], [("y", None)],
                   [("s", _rand(5, seed=1))])
    _same_as_ort(model, _rand(1, 3, 4, 5))


def test_no_raw_exception_escapes_import_onnx():
    """Inputs, initializers and casts the importer cannot hold are EdgeslimErrors that name them."""
    bf16 = _model([helper.make_node("Relu", ["x"], ["y"])], [1, 3], [("y", None)], x_type=TensorProto.BFLOAT16)
    with pytest.raises(EdgeslimError, match="input 'x' has element type BFLOAT16"):
        edgeslim.import_onnx(bf16)
    fp8 = _model([helper.make_node("Add", ["x", "c"], ["y"])], [1, 3], [("y", None)])
    fp8.graph.initializer.append(helper.make_tensor("c", TensorProto.FLOAT8E4M3FN, [3], [1.0, 2.0, 3.0]))
    with pytest.raises(EdgeslimError, match="initializer 'c' has element type FLOAT8E4M3FN"):
        edgeslim.import_onnx(fp8)
    cast = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT4)], [1, 3], [("y", None)])
    with pytest.raises(EdgeslimError, match=r"node 'y' \(Cast\) casts to INT4"):
        edgeslim.import_onnx(cast)
    scalar = _model([helper.make_node("Relu", ["x"], ["y"])], [], [("y", None)])  # a rank-0 input
    gm = edgeslim.import_onnx(scalar)
    assert gm(torch.tensor(-2.0)).item() == 0.0
    seq = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_value_info("x", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))],
        [helper.make_value_info("y", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))]))
    with pytest.raises(EdgeslimError, match="input 'x' is not a tensor"):
        edgeslim.import_onnx(seq)
