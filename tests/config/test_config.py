"""Every option config (``edgeslim.config``): frozen, a JSON round trip through ``to_dict`` / ``from_dict`` (unknown
keys refused), and each kind of bad value refused on construction with one ``EdgeslimError`` naming the value."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from edgeslim import config as C
from edgeslim.errors import EdgeslimError

# one non-default instance per class (every field that has a non-default value worth round-tripping)
SAMPLES = {
    C.PTQConfig: dict(w_bits=6, a_bits=8, granularity="tensor", scheme="symmetric", calibrator="mse", fuse=True,
                      calib_size=64, seed=3, algorithms=("brecq", "cle"), iters=50, fisher=True, weight_range="full"),
    C.Reconstruction: dict(iters=20, batch_size=8, lr=1e-2, warmup=0.1, beta=(10.0, 3.0), learn_act=False, seed=1),
    C.QATConfig: dict(w_bits=3, a_bits=4, quantizer="pot", a_quantizer="uniform", method="ewgs", epochs=None,
                      max_steps=7, lr=0.01, kd=True, kd_weight=0.5, dsq_alpha=(0.3, 0.1), ewgs_every=2),
    C.FinetuneConfig: dict(epochs=0.5, lr=0.05, batch_size=16, kd=False, kd_weight=0.25, temperature=2.0, seed=4),
    C.Budget: dict(max_drop=0.5, max_size_bytes=4096),
    C.MeasureOptions: dict(threads=2, latency_batches=(1,), latency_seconds=None, batch_size=32,
                           simulation_images=None, formats=("onnx", "tflite")),
    C.AnalyzeOptions: dict(engine=False, accumulator_bits=16, overflow_mode="wrap", requant="fixed",
                           overflow_images=12),
    C.DetectOptions: dict(conf_thres=0.25, iou_thres=0.45, batch_size=4, simulation_images=None, decoded_output=True),
    C.Requirement: dict(max_drop=1.0, max_size_kb=64.5, max_ram_kb=128),
    C.PlanOptions: dict(steps=("G3", "G5"), budget_epochs=0.0, finetune=C.FinetuneConfig(epochs=2.0, lr=0.02),
                        holdout_size=30, sparsity=0.6, backbone="mobilenet_v2:1.0", lowbit_method="adaround"),
}

# (class, field, bad value[, what the message shows when it names one element]): one row per kind of mistake
# (wrong type, out of range, unknown name, bad shape)
BAD = [
    (C.PTQConfig, "w_bits", 1), (C.PTQConfig, "granularity", "layer"), (C.PTQConfig, "algorithms", ("gptq",)),
    (C.PTQConfig, "calib_size", 0), (C.PTQConfig, "fuse", "yes"), (C.PTQConfig, "seed", -1),
    (C.PTQConfig, "iters", 0),
    (C.Reconstruction, "iters", 2.5), (C.Reconstruction, "batch_size", 0), (C.Reconstruction, "lr", -1e-3),
    (C.Reconstruction, "warmup", 1.0), (C.Reconstruction, "beta", (2.0, 20.0)), (C.Reconstruction, "beta", (1.0,)),
    (C.Reconstruction, "learn_act", 1),
    (C.QATConfig, "w_bits", 9), (C.QATConfig, "quantizer", "log"), (C.QATConfig, "method", "pact"),
    (C.QATConfig, "batch_size", 0), (C.QATConfig, "lr", math.nan), (C.QATConfig, "kd_weight", 1.5),
    (C.QATConfig, "dsq_alpha", (0.01, 0.2)), (C.QATConfig, "dsq_alpha", (0.2,)), (C.QATConfig, "kd", "no"),
    (C.QATConfig, "kd_temperature", 0.0), (C.QATConfig, "weight_decay", -1.0),
    (C.FinetuneConfig, "epochs", 0), (C.FinetuneConfig, "lr", math.inf), (C.FinetuneConfig, "batch_size", 2.0),
    (C.FinetuneConfig, "kd_weight", -0.1), (C.FinetuneConfig, "temperature", -1.0), (C.FinetuneConfig, "augment", None),
    (C.Budget, "max_drop", -0.5), (C.Budget, "max_latency_ms", math.inf), (C.Budget, "min_score", math.nan),
    (C.Budget, "max_size_bytes", "1k"),
    (C.MeasureOptions, "threads", 0), (C.MeasureOptions, "latency_batches", ()),
    (C.MeasureOptions, "latency_seconds", 0), (C.MeasureOptions, "latency_seconds", -1.0),
    (C.MeasureOptions, "latency_batches", (1, 0), "latency batch 0"), (C.MeasureOptions, "simulation_images", -5),
    (C.MeasureOptions, "formats", ("onnx", "coreml"), "'coreml'"), (C.MeasureOptions, "formats", "onnx"),
    (C.AnalyzeOptions, "accumulator_bits", 24), (C.AnalyzeOptions, "overflow_mode", "clamp"),
    (C.AnalyzeOptions, "requant", "tflite"), (C.AnalyzeOptions, "overflow_images", 0),
    (C.AnalyzeOptions, "engine", "true"),
    (C.DetectOptions, "conf_thres", 1.5), (C.DetectOptions, "iou_thres", "0.5"), (C.DetectOptions, "batch_size", 0),
    (C.DetectOptions, "threads", 0), (C.DetectOptions, "simulation_images", 0),
    (C.DetectOptions, "decoded_output", "yes"),
    (C.Requirement, "max_drop", -1.0), (C.Requirement, "max_size_kb", math.nan),
    (C.Requirement, "max_latency_ms", "fast"),
    (C.PlanOptions, "steps", ("G3", "G9")), (C.PlanOptions, "steps", ()), (C.PlanOptions, "budget_epochs", -1.0),
    (C.PlanOptions, "holdout_size", 0), (C.PlanOptions, "sparsity", 1.0), (C.PlanOptions, "prune_macs", 0.0),
    (C.PlanOptions, "factor_reduction", 1.0), (C.PlanOptions, "lowbit_method", "gptq"),
    (C.PlanOptions, "finetune", {"epochs": 1.0}), (C.PlanOptions, "threads", 0),
]


def _make(cls, **kw):
    base = dict(SAMPLES[cls]) if cls in (C.Budget, C.Requirement) else {}  # these need at least one limit
    return cls(**{**base, **kw})


def test_every_config_class_is_tested():
    """The tables above cover every config class the package defines (a new one must be added here)."""
    defined = {v for v in vars(C).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and issubclass(v, C.Config)}
    assert defined == set(SAMPLES) == {row[0] for row in BAD}


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_round_trip_through_json(cls):
    cfg = cls(**SAMPLES[cls])
    for name, value in SAMPLES[cls].items():  # the sample really differs from the defaults where it says so
        assert getattr(cfg, name) == (tuple(sorted(value, key=C.ALGORITHMS.index)) if name == "algorithms" else value)
    d = json.loads(json.dumps(cfg.to_dict()))  # through JSON: tuples come back as lists
    back = cls.from_dict(d)
    assert back == cfg and hash(back) == hash(cfg)
    assert back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_frozen(cls):
    cfg = cls(**SAMPLES[cls])
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_from_dict_refuses_unknown_keys_and_non_objects(cls):
    d = cls(**SAMPLES[cls]).to_dict()
    with pytest.raises(EdgeslimError, match=r"unknown .* keys \['colour'\]: allowed keys are \[") as e:
        cls.from_dict({**d, "colour": "red"})
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeslimError, match="JSON object"):
        cls.from_dict([1, 2])


@pytest.mark.parametrize("cls, name, value, shown", [(*row, None)[:4] for row in BAD],
                         ids=lambda v: v.__name__ if isinstance(v, type) else repr(v))
def test_bad_value_is_refused_naming_it(cls, name, value, shown):
    with pytest.raises(EdgeslimError) as e:
        _make(cls, **{name: value})
    msg = str(e.value)
    assert "\n" not in msg and ": " in msg  # one line: the problem, then the fix
    if shown is not None:
        assert shown in msg
    else:
        assert repr(value) in msg or str(value) in msg or ",".join(map(str, value or ())) in msg


def test_bad_value_from_json_is_refused_too():
    with pytest.raises(EdgeslimError, match="invalid --requant 'tflite'"):
        C.AnalyzeOptions.from_dict({"requant": "tflite"})
    with pytest.raises(EdgeslimError, match="invalid fine-tuning epochs -1"):
        C.PlanOptions.from_dict({"finetune": {"epochs": -1}})


def test_defaults_construct_and_normalize():
    """Defaults are valid; lists given where tuples are held are stored as tuples (hashable, comparable)."""
    for cls in SAMPLES:
        if cls not in (C.Budget, C.Requirement):
            hash(cls())
    with pytest.raises(EdgeslimError, match="give a budget"):
        C.Budget()
    with pytest.raises(EdgeslimError, match="give a target"):
        C.Requirement()
    m = C.MeasureOptions(latency_batches=[1, 8], formats=["onnx"])
    assert m.latency_batches == (1, 8) and m.formats == ("onnx",)
    assert C.QATConfig(dsq_alpha=[0.2, 0.01]).dsq_alpha == (0.2, 0.01)
    assert C.QATConfig().to_dict()["dsq_alpha"] == [0.2, 0.01]  # the summary.json form, unchanged


def test_mixed_plan_round_trips_through_its_json_file(tmp_path):
    """``MixedPlan`` (the ``--plan`` file) keeps its rule order and precisions through ``save`` / ``load``; a bad
    entry or a non-object is one ``EdgeslimError``."""
    plan = C.MixedPlan((("conv1", "fp32"), ("layer3.*", {"w": "int4", "a": "int8"}), ("layer3.0.conv1", 16)))
    back = C.MixedPlan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan and C.MixedPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert [str(p.w) for _, p in back.rules] == ["fp32", "int4", "int16"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rules = ()
    with pytest.raises(EdgeslimError, match=r"plan entry 'x': precision 8.5 is not valid"):
        C.MixedPlan.from_dict({"layers": {"x": 8.5}})
    with pytest.raises(EdgeslimError, match="a plan is a JSON object"):
        C.MixedPlan.from_dict(["conv1"])
