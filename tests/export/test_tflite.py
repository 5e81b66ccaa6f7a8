"""LiteRT (TFLite) export: the engine's ``tflite`` mode against LiteRT's reference kernels and TFLM, exactly.

Each model is quantized with ``edgeslim.api``, prepared (``export.tflite.prepare_graph``), written as a
``.tflite`` flatbuffer and run in three places: the numpy engine (``requant="tflite"``), LiteRT with its
reference kernels (``OpResolverType.BUILTIN_REF``) and TensorFlow Lite for Microcontrollers. The int8 outputs
must be identical. The fixed-point helpers are checked against values worked out by hand from gemmlowp's
definitions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.engine import tflite_ops as T
from edgeslim.errors import EdgeslimError

litert = pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("tflite")
tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")

from edgeslim.engine.run import run  # noqa: E402
from edgeslim.export.tflite import prepare_graph, to_tflite  # noqa: E402


# ----------------------------------------------------------------------------- fixed point, by hand

def test_quantize_multiplier_matches_frexp_by_hand():
    assert T.quantize_multiplier(0.5) == (1 << 30, 0)
    assert T.quantize_multiplier(1.0) == (1 << 30, 1)
    assert T.quantize_multiplier(0.1) == (round(0.8 * 2 ** 31), -3)  # 0.1 = 0.8 * 2**-3
    assert T.quantize_multiplier(3.0) == (3 << 29, 2)  # 0.75 * 2**2
    assert T.quantize_multiplier(2.0 ** -40) == (0, 0)  # shift < -31 flushes to zero
    m, s = T.quantize_multiplier(1 - 2 ** -33)  # the fraction rounds up to 2**31: renormalized
    assert (m, s) == (1 << 30, 1)


def test_saturating_rounding_doubling_high_mul_by_hand():
    # 2ab / 2**32 with nudge 2**30 (ab >= 0) or 1 - 2**30 (ab < 0), then C division (toward zero):
    # 3 * 2**30 -> 1.5 -> 2; -1.5 -> (-2**32 + 1) / 2**31 = -1.99.. -> -1 (a negative tie goes up)
    assert T.saturating_rounding_doubling_high_mul(3, 1 << 30) == 2
    assert T.saturating_rounding_doubling_high_mul(-3, 1 << 30) == -1
    assert T.saturating_rounding_doubling_high_mul(-5, 1 << 30) == -2  # -2.5 -> -2
    assert T.saturating_rounding_doubling_high_mul(5, 1 << 30) == 3  # 2.5 -> 3
    assert T.saturating_rounding_doubling_high_mul(T.INT32_MIN, T.INT32_MIN) == T.INT32_MAX
    assert T.saturating_rounding_doubling_high_mul(1000, (1 << 31) - 1) == 1000


def test_rounding_divide_by_pot_rounds_half_away_from_zero():
    assert list(T.rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 2)) == [1, -1, 2, -2, 2, -2]
    assert list(T.rounding_divide_by_pot(np.array([3, -3, 2]), 0)) == [3, -3, 2]


def test_multiply_by_quantized_multiplier_rounds_twice():
    # real 0.3 ~ m * 2**(s - 31); 10 * 0.3 = 3; with double rounding 5 * 0.3 = 1.5 -> 2
    m, s = T.quantize_multiplier(0.3)
    assert T.multiply_by_quantized_multiplier(10, m, s) == 3
    assert T.multiply_by_quantized_multiplier(-10, m, s) == -3
    # multiplier 0.5 as m = 2**30, shift 0: SRDHM(x, 2**30) = x / 2 rounded; 3 -> 2, -3 -> -1 (see above)
    assert T.multiply_by_quantized_multiplier(np.array([3, -3, 4]), 1 << 30, 0).tolist() == [2, -1, 2]
    # multiplier 0.25 = 2**30 * 2**-1: SRDHM(3) = 2, then RoundingDivideByPOT(2, 1) = 1 (one rounding: 0.75 -> 1)
    assert T.multiply_by_quantized_multiplier(3, 1 << 30, -1) == 1
    # 0.375 * 4 = 1.5: double rounding, SRDHM(4, 0.75 * 2**31) = 3, then 3 / 2 = 1.5 -> 2
    assert T.multiply_by_quantized_multiplier(4, 3 << 29, -1) == 2
    assert T.multiply_by_quantized_multiplier(5, 1 << 30, 2) == 10  # left shift: 5 * 2


def test_average_pool_rounds_half_away_from_zero():
    x = np.array([1, 2, -1, -2], np.int64).reshape(1, 1, 2, 2)
    assert T.average_pool(x, (1, 2), (1, 2)).ravel().tolist() == [2, -2]  # 1.5 -> 2, -1.5 -> -2


def test_quantize_rounds_half_away_from_zero():
    assert T.quantize(np.array([0.5, -0.5, 1.5, 2.5]), 1.0, 0).tolist() == [1, -1, 2, 3]


# ----------------------------------------------------------------------------- models, one per op group

class Seq(nn.Module):
    def __init__(self, *mods, fn=None):
        super().__init__()
        self.body = nn.Sequential(*mods)
        self.fn = fn

    def forward(self, x):
        x = self.body(x)
        return self.fn(x) if self.fn else x


class ConvPair(nn.Module):
    """Two 3x3 branches combined by ``op``."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.a(x), F.relu(self.b(x)))


class Head(nn.Module):
    """conv -> global mean -> linear (float logits): the classifier tail."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


class Silu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.c(x)
        return x * torch.sigmoid(x)


class OptionA(nn.Module):
    """ResNet-20's option-A shortcut: strided slicing + channel zero padding, added to a stride-2 conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        return F.relu(self.c2(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(pool(x))) + x: a broadcast MUL of (N, C, H, W) by (N, C, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.c, self.f1, self.f2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        x = F.relu(self.c(x))
        return x * torch.sigmoid(self.f2(F.relu(self.f1(F.adaptive_avg_pool2d(x, 1))))) + x


def _conv(*a, **k):
    return nn.Conv2d(*a, **k)


MODELS = {
    "conv_relu": lambda: Seq(_conv(3, 8, 3, padding=1), nn.ReLU(), _conv(8, 8, 3, stride=2, padding=1), nn.ReLU6()),
    "depthwise": lambda: Seq(_conv(3, 6, 1), _conv(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                             _conv(6, 12, 3, stride=2, padding=1, groups=6)),
    "depthwise_no_bias": lambda: Seq(_conv(3, 6, 1), _conv(6, 12, 3, padding=1, groups=6, bias=False)),
    "linear": lambda: Seq(_conv(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)),
    "add": lambda: ConvPair(torch.add),
    "mul": lambda: ConvPair(torch.mul),
    "concat": lambda: ConvPair(lambda a, b: torch.cat([a, b], 1)),
    "avgpool": lambda: Seq(_conv(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)),
    "maxpool": lambda: Seq(_conv(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, padding=1)),
    "global_mean": Head,
    "reshape": lambda: Seq(_conv(3, 8, 3, padding=1), fn=lambda x: x.reshape(x.shape[0], 8, 64).transpose(1, 2)),
    "pad": lambda: Seq(_conv(3, 8, 3), fn=lambda x: F.pad(x, (1, 2, 0, 1))),
    "resize": lambda: Seq(_conv(3, 8, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")),
    "sigmoid": lambda: Seq(_conv(3, 8, 3, padding=1), nn.Sigmoid()),
    "hardswish": lambda: Seq(_conv(3, 8, 3, padding=1), nn.Hardswish()),
    "leaky_relu": lambda: Seq(_conv(3, 8, 3, padding=1), nn.LeakyReLU(0.1), _conv(8, 4, 1)),
    "silu": Silu,
    "option_a": OptionA,
    "squeeze_excite": SqueezeExcite,
}


def _quantized(name: str, seed: int = 0, shape=(3, 8, 8), **cfg):
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    calib = torch.randn(24, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(model, calib, PTQConfig(**cfg), batch_size=24)
    return q, calib.numpy()


def _runtimes(fb: bytes):
    ref = litert.Interpreter(model_content=fb, experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    return ref, tflm.Interpreter.from_bytes(fb, arena_size=max(1 << 20, 10 * len(fb)))


def _nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _int8(tg, name: str, codes: dict) -> np.ndarray:
    """Engine codes of ``name`` as TFLite stores them (int8, NHWC)."""
    q = tg.qparams[name]
    return _nhwc(codes[name] - (0 if q.signed else 128))


def _compare(tg, fb: bytes, x: np.ndarray, io: str) -> dict:
    """The largest |difference| over all outputs, in output LSBs: engine vs LiteRT reference, engine vs TFLM
    (int8 codes; float outputs for float IO, divided by their scale)."""
    codes = run(tg, x, requant="tflite", return_codes=True)
    ref, micro = _runtimes(fb)
    q_in = tg.nodes[0].outputs[0]
    diffs = {"ref": 0.0, "tflm": 0.0}
    for i in range(len(x)):
        feed = _int8(tg, q_in, codes)[i:i + 1].astype(np.int8) if io == "int8" else _nhwc(x[i:i + 1])
        ref.set_tensor(ref.get_input_details()[0]["index"], feed)
        ref.invoke()
        micro.set_input(feed, 0)
        micro.invoke()
        for k, out in enumerate(tg.output_names):
            src = next(n for n in tg.nodes if n.outputs[0] == out).inputs[0]
            want, lsb = (_int8(tg, src, codes)[i:i + 1], 1.0) if io == "int8" else \
                (_nhwc(codes[out][i:i + 1]), float(np.float32(tg.qparams[src].scale)))
            for key, got in (("ref", ref.get_tensor(ref.get_output_details()[k]["index"])), ("tflm", micro.get_output(k))):
                assert got.shape == want.shape
                diffs[key] = max(diffs[key], round(float(np.abs(got.astype(np.float64) - want).max()) / lsb, 3))
    return diffs


def _assert_exact(d: dict, info: dict) -> None:
    """TFLM exact everywhere. LiteRT's reference FULLY_CONNECTED (2.3.0) rounds once where TFLite's
    MultiplyByQuantizedMultiplier (and TFLM, and LiteRT's CONV_2D) round twice: 1 LSB at double-rounding ties
    (``test_kernels_on_random_scales`` measures it), so a model ending in FULLY_CONNECTED may differ by 1 LSB there."""
    assert d["tflm"] == 0
    assert d["ref"] <= (1 if "FULLY_CONNECTED" in info["ops"] else 0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_equals_litert_reference_and_tflm(name):
    q, calib = _quantized(name)
    tg = prepare_graph(q.intgraph, calib)
    fb, info = to_tflite(tg, io="int8")
    assert not info["float_ops"]
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32) * 1.5
    _assert_exact(_compare(tg, fb, x, "int8"), info)


@pytest.mark.parametrize("name", ["global_mean", "concat", "sigmoid"])
def test_float_io_is_exact_too(name):
    """Float in, float out: QUANTIZE (round half away from zero) and DEQUANTIZE match the engine exactly."""
    q, calib = _quantized(name)
    tg = prepare_graph(q.intgraph, calib)
    fb, info = to_tflite(tg)
    assert info["ops"]["QUANTIZE"] >= 1 and info["ops"]["DEQUANTIZE"] == 1
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    _assert_exact(_compare(tg, fb, x, "float"), info)


def test_builtins_are_the_int8_ones():
    q, calib = _quantized("depthwise")
    _, info = to_tflite(prepare_graph(q.intgraph, calib), io="int8")
    assert info["ops"]["DEPTHWISE_CONV_2D"] == 2 and info["ops"]["CONV_2D"] == 1
    q, calib = _quantized("leaky_relu")
    _, info = to_tflite(prepare_graph(q.intgraph, calib), io="int8")
    assert "LEAKY_RELU" in info["ops"] and not info["lut_as_gather"]


def test_export_tflite_writes_the_file_the_engine_predicts(tmp_path):
    import edgeslim

    q, calib = _quantized("global_mean")
    info = edgeslim.export_tflite(q, tmp_path / "m.tflite", calib=calib)
    fb = (tmp_path / "m.tflite").read_bytes()
    assert info["size_bytes"] == len(fb) and info["ops"]["DEPTHWISE_CONV_2D"] == 1 and "MEAN" not in info["ops"]
    x = np.random.default_rng(6).standard_normal((3, 3, 8, 8)).astype(np.float32)
    _assert_exact(_compare(info["graph"], fb, x, "float"), info)


def test_writing_without_the_extra_names_it(monkeypatch):
    import sys

    q, calib = _quantized("conv_relu")
    monkeypatch.setitem(sys.modules, "flatbuffers", None)
    with pytest.raises(EdgeslimError, match=r"pip install -e '\.\[tflite\]'"):
        to_tflite(prepare_graph(q.intgraph, calib))


SOFTMAX_MODELS = {
    "output": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10), nn.Softmax(dim=1)),
    "inside": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(dim=1), nn.Conv2d(4, 4, 1)),
}


@pytest.mark.parametrize("where", sorted(SOFTMAX_MODELS))
def test_softmax_runs_in_float_and_is_recorded(where):
    """A softmax has no integer form in the IntGraph: it becomes DEQUANTIZE, float SOFTMAX (and QUANTIZE where an
    integer op reads it). Float exp differs between numpy and the runtimes by an ulp: 1e-6 at the output, and
    at most 1 LSB where the result is quantized again."""
    torch.manual_seed(0)
    model = SOFTMAX_MODELS[where]().eval()
    calib = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(model, calib, PTQConfig(), batch_size=16)
    tg = prepare_graph(q.intgraph, calib.numpy())
    fb, info = to_tflite(tg)
    assert info["float_ops"] == ["SOFTMAX"]
    x = np.random.default_rng(9).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = run(tg, x, requant="tflite")[tg.output_names[0]]
    tol = 1e-6 if where == "output" else 1.001 * float(np.float32(tg.qparams[tg.nodes[-1].inputs[0]].scale))
    for rt in _runtimes(fb):
        for i in range(len(x)):
            if hasattr(rt, "set_tensor"):
                rt.set_tensor(rt.get_input_details()[0]["index"], _nhwc(x[i:i + 1]))
                rt.invoke()
                got = rt.get_tensor(rt.get_output_details()[0]["index"])
            else:
                rt.set_input(_nhwc(x[i:i + 1]), 0)
                rt.invoke()
                got = rt.get_output(0)
            assert np.abs(got - _nhwc(want[i:i + 1])).max() <= tol


class Normalize(nn.Module):
    """exp(x) / sum(exp(x)) - 0.1 over channels: float islands (Exp, ReduceSum, Div, Sub) up to a float output;
    ``requantized``: concatenated with an integer tensor, so the islands end in a QuantizeLinear."""

    def __init__(self, requantized: bool):
        super().__init__()
        self.a, self.requantized = nn.Conv2d(3, 8, 3, padding=1), requantized

    def forward(self, x):
        x = self.a(x)
        e = x.exp()
        y = e / e.sum(1, keepdim=True)
        return torch.cat([y, x], 1) if self.requantized else y - 0.1


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle as FastestDet.onnx writes it: a reshape folding the batch (a float island: its
    shape is computed), a 5-D reshape and scalar-index Gathers (int8 GATHER)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.reshape(n * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
        return torch.cat([x[0], F.relu(self.b(x[1]))], 1)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.a(x))
        y = torch.sigmoid(self.c(F.relu(self.b(x)) + x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


ISLAND_MODELS = {  # name: (model, mixed-precision plan or None, float output)
    "normalize_float_out": (lambda: Normalize(False), None, True),
    "normalize_requantized": (lambda: Normalize(True), None, False),
    "channel_shuffle": (Shuffle, None, False),
    "fp32_layers_float_out": (Branches, (("b", "fp32"), ("fc", "fp32")), True),
    "fp32_layer_requantized": (Branches, (("c", "fp32"),), False),
    "fp32_activations": (lambda: Seq(_conv(3, 8, 3, padding=1), nn.Hardsigmoid(), _conv(8, 8, 1), nn.SiLU(),
                                     _conv(8, 8, 1), nn.Tanh(), _conv(8, 4, 1)),
                         (("body.1", "fp32"), ("body.3", "fp32"), ("body.5", "fp32")), False),
}


def _float_io_outputs(rt, x: np.ndarray) -> np.ndarray:
    """The first output of a float-IO file for each image of ``x`` (NCHW), in the IntGraph's layout."""
    rows = []
    for i in range(len(x)):
        if hasattr(rt, "set_tensor"):
            rt.set_tensor(rt.get_input_details()[0]["index"], _nhwc(x[i:i + 1]))
            rt.invoke()
            y = rt.get_tensor(rt.get_output_details()[0]["index"])
        else:
            rt.set_input(_nhwc(x[i:i + 1]), 0)
            rt.invoke()
            y = rt.get_output(0)
        rows.append(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)
    return np.concatenate(rows)


@pytest.mark.parametrize("name", sorted(ISLAND_MODELS))
def test_float_islands_run_as_float_builtins(name):
    """Ops edgeslim keeps in float (FloatIsland ONNX graphs, FP32 layers of a mixed plan) are DEQUANTIZE, float32
    builtins, QUANTIZE, named in ``float_nodes``. Oracle: the engine (its float islands in numpy float32) against
    LiteRT's reference kernels and TFLM. Tolerance: a float output within 1e-5 of its largest magnitude (float32
    sums taken in another order: n eps sum|terms|, measured <= 1e-7 here); a requantized output within 1 LSB
    (a float value a few ulp from a rounding boundary may round the other way; 0 measured here); the integer
    parts are exact."""
    from edgeslim import MixedPlan
    from edgeslim.export.tflm import resolver_calls

    make, rules, float_out = ISLAND_MODELS[name]
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(make().eval(), calib, PTQConfig(), batch_size=16,
                         plan=MixedPlan(rules) if rules else None)
    tg = prepare_graph(q.intgraph, calib.numpy())
    fb, info = to_tflite(tg)
    assert info["float_nodes"] and info["float_ops"]
    assert resolver_calls(info["op_codes"])  # every float builtin has its TFLM resolver call
    if rules:
        assert any(n.endswith("(Conv)") for n in info["float_nodes"]) and "CONV_2D" in info["float_ops"]
    x = np.random.default_rng(12).standard_normal((6, 3, 8, 8)).astype(np.float32)
    out = tg.output_names[0]
    want = np.concatenate([run(tg, x[i:i + 1], requant="tflite")[out] for i in range(len(x))])
    src = next(n for n in tg.nodes if n.outputs[0] == out)
    assert float_out == (src.op != "DequantizeLinear")
    tol = 1e-5 * float(np.abs(want).max()) if float_out else 1.001 * float(np.float32(tg.qparams[src.inputs[0]].scale))
    for rt in _runtimes(fb):
        got = _float_io_outputs(rt, x)
        assert got.shape == want.shape and np.abs(got - want).max() <= tol


def test_asymmetric_weights_are_refused_with_the_option():
    q, calib = _quantized("conv_relu", w_scheme="asymmetric", granularity="tensor")
    with pytest.raises(EdgeslimError, match="--w-scheme symmetric"):
        prepare_graph(q.intgraph, calib)


def test_wide_activations_are_refused_with_the_option():
    q, calib = _quantized("conv_relu", w_bits=8, a_bits=12)
    with pytest.raises(EdgeslimError, match="--a-bits 8"):
        prepare_graph(q.intgraph, calib)


@pytest.mark.parametrize("name,cfg", [("conv_relu", dict(fuse=False)), ("add", dict(fuse=False)),
                                      ("conv_relu", dict(granularity="tensor")), ("global_mean", dict(scheme="symmetric")),
                                      ("conv_relu", dict(w_bits=4))])
def test_other_configs_export_exactly(name, cfg):
    """Unfused ReLUs (RELU ops), per-tensor weights, signed symmetric activations, 4-bit weights in int8 containers."""
    q, calib = _quantized(name, **cfg)
    tg = prepare_graph(q.intgraph, calib)
    fb, info = to_tflite(tg, io="int8")
    assert cfg.get("fuse", True) or "RELU" in info["ops"]
    x = np.random.default_rng(8).standard_normal((4, 3, 8, 8)).astype(np.float32)
    _assert_exact(_compare(tg, fb, x, "int8"), info)


@pytest.mark.parametrize("name", ["concat", "hardswish", "avgpool", "global_mean"])
@pytest.mark.parametrize("activations", ["table", "builtin"])
def test_low_bit_activations_export_in_int8_containers(name, activations):
    """W4A4: 4-bit codes in int8 tensors, the narrower range kept by MAXIMUM / MINIMUM (or the table)."""
    q, calib = _quantized(name, w_bits=4, a_bits=4)
    tg = prepare_graph(q.intgraph, calib, activations=activations)
    fb, info = to_tflite(tg, io="int8")
    assert info["ops"].get("MINIMUM", 0) >= 1
    x = np.random.default_rng(10).standard_normal((4, 3, 8, 8)).astype(np.float32)
    _assert_exact(_compare(tg, fb, x, "int8"), info)


def test_overflow_statistics_in_tflite_mode_equal_the_float_mode():
    """The accumulator statistics do not depend on the requantization: ``analyze --overflow`` works in tflite mode
    (the first layer reads the same codes in both modes; later layers read differently rounded ones)."""
    from edgeslim.engine.overflow import OverflowStats

    q, calib = _quantized("conv_relu")
    tg = prepare_graph(q.intgraph, calib)
    x = np.random.default_rng(11).standard_normal((4, 3, 8, 8)).astype(np.float32) * 4
    stats = {mode: OverflowStats() for mode in ("tflite", "float")}
    for mode, st in stats.items():
        run(tg, x, requant=mode, stats=st, accumulator_bits=16)
    assert stats["tflite"].layers()[0] == stats["float"].layers()[0] and len(stats["tflite"].layers()) == 2
    assert stats["tflite"].layers()[0]["accumulator_overflows"] > 0


def test_pow2_scales_export_exactly():
    """The VTA-style power-of-two setting reaches TFLite: multipliers are powers of two there too."""
    q, calib = _quantized("add", scale="pow2")
    tg = prepare_graph(q.intgraph, calib)
    fb, info = to_tflite(tg, io="int8")
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    _assert_exact(_compare(tg, fb, x, "int8"), info)


@pytest.mark.parametrize("name", ["sigmoid", "hardswish", "silu"])
def test_builtin_activations_are_exact(name):
    """``activations="builtin"``: LOGISTIC / HARD_SWISH / LOGISTIC + MUL instead of table lookups."""
    q, calib = _quantized(name)
    tg = prepare_graph(q.intgraph, calib, activations="builtin")
    fb, info = to_tflite(tg, io="int8")
    want = {"sigmoid": "LOGISTIC", "hardswish": "HARD_SWISH", "silu": "MUL"}[name]
    assert want in info["ops"] and "GATHER" not in info["ops"]
    x = np.random.default_rng(5).standard_normal((6, 3, 8, 8)).astype(np.float32) * 2
    _assert_exact(_compare(tg, fb, x, "int8"), info)


def _single_op(code: str, sx: float, zx: int, sy: float, zy: int) -> bytes:
    from edgeslim.export.tflite_fb import FlatModel, Tensor, to_bytes

    m = FlatModel()
    x = m.add_tensor(Tensor("x", [1, 256], np.int8, scale=[sx], zero_point=[zx]))
    y = m.add_tensor(Tensor("y", [1, 256], np.int8, scale=[sy], zero_point=[zy]))
    m.add_op(code, [x], [y])
    m.inputs, m.outputs = [x], [y]
    return to_bytes(m)


def _scale(rng, lo=-3.0, hi=0.0) -> float:
    return float(np.float32(10 ** rng.uniform(lo, hi)))


def _kernel_case(code: str, rng):
    """(flatbuffer, int8 inputs, engine output) of one op on random data, scales and zero points."""
    from edgeslim.export.tflite_fb import FlatModel, Tensor, to_bytes

    m = FlatModel()
    sa, za, sb, zb = _scale(rng), int(rng.integers(-128, 128)), _scale(rng), int(rng.integers(-128, 128))
    sy, zy = _scale(rng), int(rng.integers(-100, 100))
    shape, oshape = [1, 8, 8, 16], [1, 8, 8, 16]
    xa = rng.integers(-128, 128, shape)
    xb = rng.integers(-128, 128, shape)
    a = m.add_tensor(Tensor("a", shape, np.int8, scale=[sa], zero_point=[za]))
    ins, opts = [a], None
    if code in ("ADD", "MUL"):
        ins.append(m.add_tensor(Tensor("b", shape, np.int8, scale=[sb], zero_point=[zb])))
        sy = float(np.float32((sa * sb if code == "MUL" else max(sa, sb)) * 10 ** rng.uniform(0, 1.5)))
        opts = (f"{code.capitalize()}Options", {})
        want = (T.add if code == "ADD" else T.mul)(xa, sa, za, xb, sb, zb, sy, zy, -128, 127)
    elif code == "QUANTIZE":
        sy = float(np.float32(sa * 10 ** rng.uniform(-1, 1)))
        want = T.requantize(xa, sa, za, sy, zy)
    elif code == "LEAKY_RELU":
        alpha = float(np.float32(rng.uniform(0.01, 0.5)))
        opts = ("LeakyReluOptions", {"Alpha": alpha})
        want = T.leaky_relu(xa, sa, za, sy, zy, alpha)
    elif code == "AVERAGE_POOL_2D":
        sy, zy, oshape = sa, za, [1, 4, 3, 16]
        opts = ("Pool2DOptions", {"Padding": 1, "StrideW": 2, "StrideH": 2, "FilterWidth": 3, "FilterHeight": 2})
        want = T.average_pool(xa.transpose(0, 3, 1, 2), (2, 3), (2, 2)).transpose(0, 2, 3, 1)
    elif code == "MEAN":
        oshape = [1, 1, 1, 16]
        ins.append(m.const("axes", np.array([1, 2], np.int32)))
        opts = ("ReducerOptions", {"KeepDims": True})
        want = T.mean(xa.transpose(0, 3, 1, 2), sa, za, sy, zy).transpose(0, 2, 3, 1)
    else:  # CONV_2D (1x1, per-channel) / FULLY_CONNECTED (per-channel) on 16 inputs
        w = rng.integers(-127, 128, (16, 16))
        ws = (10 ** rng.uniform(-3, -2, 16)).astype(np.float32)
        bias = rng.integers(-3000, 3000, 16)
        sy = float(np.float32(sa * ws.max() * 10 ** rng.uniform(0.5, 2)))
        fc = code == "FULLY_CONNECTED"
        quant = dict(scale=[float(v) for v in ws], zero_point=[0] * 16)
        ins.append(m.const("w", w.astype(np.int8) if fc else w.reshape(16, 1, 1, 16).astype(np.int8), **quant))
        ins.append(m.const("b", bias.astype(np.int32), scale=[float(np.float32(sa) * v) for v in ws],
                           zero_point=[0] * 16))
        if fc:
            shape = oshape = [64, 16]
            m.tensors[a].shape = shape
            xa = xa.reshape(shape)
        opts = ("FullyConnectedOptions", {}) if fc else ("Conv2DOptions", {"Padding": 1, "StrideW": 1, "StrideH": 1})
        mult, shift = T.conv_multipliers(sa, ws, sy)
        acc = (xa.reshape(-1, 16) - za) @ w.T + bias
        want = T.requantize_acc(acc, mult, shift, zy, -128, 127).reshape(oshape)
    y = m.add_tensor(Tensor("y", oshape, np.int8, scale=[sy], zero_point=[zy]))
    m.add_op(code, ins, [y], opts)
    m.inputs, m.outputs = [i for i in ins if m.tensors[i].data is None], [y]
    feeds = [xa.astype(np.int8)] + ([xb.astype(np.int8)] if code in ("ADD", "MUL") else [])
    return to_bytes(m), feeds, want


@pytest.mark.parametrize("code", ["ADD", "MUL", "QUANTIZE", "LEAKY_RELU", "AVERAGE_POOL_2D", "MEAN", "CONV_2D",
                                  "FULLY_CONNECTED"])
def test_kernels_on_random_scales(code):
    """Each int8 kernel of the engine against LiteRT's reference kernel and TFLM: random codes, 8 random scale /
    zero point sets (a local run of 25 sets x 100k outputs per kernel found no difference either).
    LiteRT 2.3.0's reference FULLY_CONNECTED rounds once (``x m + 2**(30 - shift)) >> (31 - shift)``) where TFLM and
    LiteRT's own CONV_2D round twice (``MultiplyByQuantizedMultiplier``): 1 LSB at ties there, measured 11-14 of
    19,200 outputs."""
    rng = np.random.default_rng(["ADD", "MUL", "QUANTIZE"].count(code) + len(code))
    worst = {"ref": 0, "tflm": 0}
    for _ in range(8):
        fb, feeds, want = _kernel_case(code, rng)
        ref, micro = _runtimes(fb)
        for k, v in enumerate(feeds):
            ref.set_tensor(ref.get_input_details()[k]["index"], v)
            micro.set_input(v, k)
        ref.invoke()
        micro.invoke()
        for key, got in (("ref", ref.get_tensor(ref.get_output_details()[0]["index"])), ("tflm", micro.get_output(0))):
            worst[key] = max(worst[key], int(np.abs(got.astype(np.int64) - want).max()))
    assert worst == {"ref": 1 if code == "FULLY_CONNECTED" else 0, "tflm": 0} or \
        (code == "FULLY_CONNECTED" and worst == {"ref": 0, "tflm": 0})


def test_logistic_and_hard_swish_kernels_on_every_code():
    """The engine's LOGISTIC and HARD_SWISH against LiteRT's reference kernels and TFLM: all 256 input codes,
    20 random scale / zero point sets each."""
    rng = np.random.default_rng(0)
    codes = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    for _ in range(20):
        sx, zx = float(np.float32(10 ** rng.uniform(-3, 0))), int(rng.integers(-128, 128))
        sy, zy = float(np.float32(sx * 10 ** rng.uniform(-1.5, 0.5))), int(rng.integers(-128, 128))
        cases = [("LOGISTIC", 1 / 256, -128, T.logistic(codes, sx, zx))]
        if T.hard_swish_params(sx, sy) is not None:
            cases.append(("HARD_SWISH", sy, zy, T.hard_swish(codes, sx, zx, sy, zy)))
        for code, s_out, z_out, want in cases:
            ref, micro = _runtimes(_single_op(code, sx, zx, s_out, z_out))
            ref.set_tensor(ref.get_input_details()[0]["index"], codes)
            ref.invoke()
            micro.set_input(codes, 0)
            micro.invoke()
            assert np.array_equal(ref.get_tensor(ref.get_output_details()[0]["index"]), want), (code, sx, zx)
            assert np.array_equal(micro.get_output(0), want), (code, sx, zx)


@pytest.mark.parametrize("name", ["tiny_resnet", "mobilenet_v2", "yolov5n"])
def test_whole_networks_are_exact(name):
    """A residual network with an option-A shortcut, max pool and global pool; MobileNetV2 (depthwise, ReLU6,
    inverted residuals); YOLOv5n's three raw heads (57 gated SiLUs as LOGISTIC + MUL, concatenations, SPPF max
    pools, nearest upsampling; random weights): float in, float out, identical in the three runtimes."""
    from conftest import make_tiny_resnet

    from edgeslim.models import build_model

    shape = {"tiny_resnet": (3, 16, 16), "mobilenet_v2": (3, 32, 32), "yolov5n": (3, 64, 64)}[name]
    model = make_tiny_resnet() if name == "tiny_resnet" else build_model(name)[0]
    torch.manual_seed(0)
    calib = torch.randn(8, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(model.eval(), calib, PTQConfig(), input_shape=shape, batch_size=8)
    tg = prepare_graph(q.intgraph, calib.numpy(), activations="builtin" if name == "yolov5n" else "table")
    fb, info = to_tflite(tg)
    assert "TRANSPOSE" not in info["ops"]  # flattening (N, C, 1, 1) is a plain RESHAPE
    x = np.random.default_rng(4).standard_normal((2, *shape)).astype(np.float32)
    _assert_exact(_compare(tg, fb, x, "float"), info)


# ----------------------------------------------------------------------------- the CLI (--formats)

def test_cli_formats_tflm_writes_the_microcontroller_build(capsys, tmp_path, tiny_job):
    import json

    from edgeslim.cli import main

    assert main([*tiny_job, "--formats", "onnx,tflm"]) == 0
    assert "model_int8.tflite: top-1 " in capsys.readouterr().out
    run_dir = tmp_path / "run"
    s = json.loads((run_dir / "summary.json").read_text())
    fb = (run_dir / "model_int8.tflite").read_bytes()
    assert s["tflite"]["size_bytes"] == len(fb) == s["mcu"]["flash_bytes"]
    assert s["tflite"]["ops"]["CONV_2D"] == 2 and s["tflite"]["float_ops"] == []
    assert s["tflite"]["images"] == 12 and 0 <= s["tflite"]["top1"] <= 1
    assert 0 < s["mcu"]["ram_bytes"] < 64 * 1024
    assert "resolver.AddConv2D();" in (run_dir / "op_resolver.txt").read_text()
    cc = (run_dir / "model_data.cc").read_text()
    assert f"g_model_len = {len(fb)};" in cc and cc.count("0x") == len(fb)
    assert "model_data.h" in {p.name for p in run_dir.iterdir()}
    ref, _ = _runtimes(fb)  # the file runs in LiteRT
    ref.set_tensor(ref.get_input_details()[0]["index"], np.zeros((1, 8, 8, 3), np.float32))
    ref.invoke()
    assert ref.get_tensor(ref.get_output_details()[0]["index"]).shape == (1, 2)


def test_cli_formats_without_the_extra_is_one_line(capsys, monkeypatch, tmp_path, tiny_job):
    import sys

    from edgeslim.cli import main

    monkeypatch.setitem(sys.modules, "tflite_micro", None)  # import tflite_micro -> ImportError
    assert main([*tiny_job, "--formats", "tflm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "edgeslim: error: --formats tflm needs the tflite extra: pip install -e '.[tflite]'"
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_formats_refuses_asymmetric_weights_before_any_work(capsys, tmp_path, tiny_job):
    from edgeslim.cli import main

    assert main([*tiny_job, "--formats", "tflite", "--w-scheme", "asymmetric"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("use --w-scheme symmetric")
    assert not (tmp_path / "run").exists()


def test_cli_unknown_format_is_refused(capsys, tiny_job):
    from edgeslim.cli import main

    assert main([*tiny_job, "--formats", "onnx,coreml"]) == 2
    assert "unknown format(s) coreml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- import (edgeslim.import_tflite)

@pytest.mark.parametrize("name,activations", [(n, "table") for n in sorted(MODELS)] +
                         [(n, "builtin") for n in ("sigmoid", "hardswish", "silu")])
def test_import_round_trip_runs_as_tflm(name, activations):
    """Our files read back into an IntGraph compute, in the engine's tflite mode, what TFLM computes on the file."""
    import edgeslim

    q, calib = _quantized(name)
    tg = prepare_graph(q.intgraph, calib, activations=activations)
    fb, _ = to_tflite(tg)
    g = edgeslim.import_tflite(fb)
    x = np.random.default_rng(7).standard_normal((4, 3, 8, 8)).astype(np.float32) * 1.5
    got = run(g, x, requant="tflite")
    fb2, info2 = to_tflite(g)  # written again from the imported graph: no stray ops, the same results
    assert "CONCATENATION" not in info2["ops"] or name == "concat"
    again = run(edgeslim.import_tflite(fb2), x, requant="tflite")
    assert all(np.array_equal(a, b) for a, b in zip(got.values(), again.values()))
    _, micro = _runtimes(fb)
    for i in range(len(x)):
        micro.set_input(_nhwc(x[i:i + 1]), 0)
        micro.invoke()
        for k, out in enumerate(g.output_names):
            assert np.array_equal(_nhwc(got[out][i:i + 1]), micro.get_output(k)), (name, out)


@pytest.mark.parametrize("name", ["channel_shuffle", "softmax_inside", "softmax_output"])
def test_import_reads_float_islands_and_gathers(name):
    """Files with float islands (DEQUANTIZE, float RESHAPE folding the batch / TRANSPOSE / SOFTMAX, QUANTIZE) and
    int8 GATHER at constant positions (FastestDet's channel shuffle) read back into an IntGraph whose ``tflite`` mode
    computes what LiteRT's reference kernels and TFLM compute on the file: integer outputs within 1 LSB (a float
    softmax value a few ulp from a rounding boundary), float outputs within 1e-6 of their largest magnitude."""
    import edgeslim

    make = ISLAND_MODELS[name][0] if name in ISLAND_MODELS else SOFTMAX_MODELS[name.split("_")[1]]
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(make().eval(), calib, PTQConfig(), batch_size=16)
    fb, info = to_tflite(prepare_graph(q.intgraph, calib.numpy()))
    assert info["float_ops"] and (name != "channel_shuffle" or "GATHER" in info["ops"])
    g = edgeslim.import_tflite(fb)
    x = np.random.default_rng(13).standard_normal((4, 3, 8, 8)).astype(np.float32)
    out = g.output_names[0]
    want = np.concatenate([run(g, x[i:i + 1], requant="tflite")[out] for i in range(len(x))])
    src = next(n for n in g.nodes if n.outputs[0] == out)
    tol = 1.001 * float(np.float32(g.qparams[src.inputs[0]].scale)) if src.op == "DequantizeLinear" else \
        1e-6 * float(np.abs(want).max())
    for rt in _runtimes(fb):
        got = _float_io_outputs(rt, x)
        assert got.shape == want.shape and np.abs(got - want).max() <= tol


def test_import_refuses_unknown_ops_by_name():
    from edgeslim.export.tflite_fb import FlatModel, Tensor, to_bytes
    from edgeslim.io.tflite_import import import_tflite

    m = FlatModel()
    x = m.add_tensor(Tensor("x", [1, 10], np.int8, scale=[0.1], zero_point=[0]))
    y = m.add_tensor(Tensor("y", [1, 10], np.int8, scale=[1 / 256], zero_point=[-128]))
    m.add_op("SOFTMAX", [x], [y], ("SoftmaxOptions", {"Beta": 1.0}))
    m.inputs, m.outputs = [x], [y]
    with pytest.raises(EdgeslimError, match="SOFTMAX"):
        import_tflite(to_bytes(m))
    with pytest.raises(EdgeslimError, match="not a TFLite flatbuffer"):
        import_tflite(b"not a model at all")


# ----------------------------------------------------------------------------- real data (opt-in: pytest -m slow)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


ONE_LAYER = {"conv": lambda: Seq(_conv(3, 32, 3, padding=1), nn.ReLU()),
             "avgpool": lambda: Seq(nn.AvgPool2d(2)),
             "global_mean": lambda: Seq(nn.AdaptiveAvgPool2d(1))}


@pytest.mark.parametrize("name", sorted(ONE_LAYER))
def test_onnx_int8_and_tflite_differ_only_where_their_roundings_do(tmp_path, name):
    """One layer (default config: this CPU's weight grid) as the INT8 ONNX file in onnxruntime and as the .tflite
    in LiteRT's reference kernels, on the same inputs: the files hold the same codes and scales, so the outputs
    differ only where onnxruntime's one float rounding and TFLite's fixed-point roundings part: by one step, at
    exactly the outputs where the engine's ``float`` and ``tflite`` forms part (each the oracle-checked twin of one
    runtime), as many as ``isolated_differences`` counts. Average pools are unit-weight depthwise convolutions in
    the file (one rounding; AVERAGE_POOL_2D + QUANTIZE parted on about half the outputs)."""
    from edgeslim.analysis import output_steps
    from edgeslim.eval import ort as ort_eval
    from edgeslim.export.onnx_qdq import save_onnx, to_onnx
    from edgeslim.export.tflite_gap import isolated_differences, output_agreement
    from edgeslim.export.tflm import litert_runner

    torch.manual_seed(0)
    model = ONE_LAYER[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(model, torch.randn(24, 3, 16, 16), PTQConfig(), batch_size=24)
    g = q.intgraph
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    sess = ort_eval.session(save_onnx(to_onnx(g), tmp_path / "m.onnx"), threads=1)
    ort = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    tg = prepare_graph(g)
    fb, _ = to_tflite(tg)
    lite = litert_runner(fb, reference=True)(x)[0]
    step = float(np.float32(output_steps(g)[g.output_names[0]]))
    steps = np.rint(np.abs(ort.astype(np.float64) - lite) / step)
    assert steps.max() <= 1
    last = next(n for n in g.nodes if n.outputs[0] == g.output_names[0]).inputs[0]  # the DequantizeLinear's input
    apart = run(g, x, return_codes=True)[last] != run(tg, x, requant="tflite", return_codes=True)[last]
    assert np.array_equal((steps > 0).reshape(apart.shape), apart)
    assert sum(r["different"] for r in isolated_differences(g, tg, x).values()) == int(apart.sum())
    agree = output_agreement(ort, lite, step)
    assert agree["identical_share"] == float(np.mean(~apart)) >= 0.99



@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models/resnet20_cifar10jpeg.pt").exists(), reason="../shared absent")
def test_resnet20_tflite_keeps_onnx_accuracy_and_is_exact(tmp_path):
    """The trained ResNet-20 as .tflite: every conv an int8 CONV_2D, LiteRT (XNNPACK) top-1 within 0.5 points of
    onnxruntime INT8 on 2,000 test images, and engine == TFLM on 50 images."""
    from edgeslim.data import Preprocess, calibration_indices, open_dataset
    from edgeslim.eval import metrics
    from edgeslim.eval import ort as ort_eval
    from edgeslim.export.onnx_qdq import save_onnx, to_onnx
    from edgeslim.export.tflm import score_litert
    from edgeslim.models import build_model

    model, info = build_model("resnet20", SHARED / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(SHARED / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(SHARED / "data/cifar10-jpeg-test.zip", pre)
    calib = train.batch(calibration_indices(len(train), 256, 0, train.labels))
    idx = calibration_indices(len(test), 2000, 0, test.labels)
    x, y = test.batch(idx), test.labels[idx]
    q = api.quantize(model, calib, PTQConfig())
    onnx_top1 = metrics.top1(ort_eval.predict(ort_eval.session(save_onnx(to_onnx(q.intgraph), tmp_path / "m.onnx"),
                                                               threads=0), x), y)
    tg = prepare_graph(q.intgraph, calib)
    fb, info_t = to_tflite(tg)
    assert info_t["ops"]["CONV_2D"] == 19 and not info_t["float_ops"]
    lite = score_litert(fb, [(x, y)])
    assert abs(lite["top1"] - onnx_top1) <= 0.005
    _, micro = _runtimes(fb)
    want = run(tg, x[:50], requant="tflite")[tg.output_names[0]]
    for i in range(50):
        micro.set_input(_nhwc(x[i:i + 1]), 0)
        micro.invoke()
        assert np.array_equal(micro.get_output(0), want[i:i + 1])
