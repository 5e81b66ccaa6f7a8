"""Models of the families users bring (tests/families.py), exported to ONNX as public files are, go through
import -> quantize -> INT8 ONNX with every conv integer, float islands where no integer form exists, the
simulation, the integer engine and onnxruntime in agreement, and the FP32 file's interface kept."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

import edgeslim
from edgeslim import api
from edgeslim.algorithms import ptq
from edgeslim.cli import main
from edgeslim.engine import run as engine_run
from edgeslim.eval import ort as ort_eval
from edgeslim.eval.fidelity import output_fidelity

import families

# the ops each family must keep in float (no integer kernel in onnxruntime), by what the island computes
EXPECTED_ISLANDS = {
    "face_detector": {"Softmax", "mul", "add", "exp", "div", "sub"},
    "landmarks": {"PReLU"},
    "anchor_free": set(),  # x * sigmoid(x) is recognized as SiLU: a table on codes
    "shufflenet": set(),  # channel shuffle on codes, x * hardsigmoid(x) as hard-swish
    "pixel_shuffle": {"interpolate", "pixel_shuffle"},
    "seg_two_outputs": {"interpolate", "add", "Clip"},
}


def _kinds(islands: list[dict]) -> set[str]:
    return {i["fn"] for i in islands}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every family at a dynamic batch and at a fixed batch of 1 (reshapes folded), FP32 ONNX."""
    root = tmp_path_factory.mktemp("families")
    return {(name, batch): families.export(name, root / f"{name}_{batch}.onnx", batch=batch)
            for name in families.FAMILIES for batch in (None, 1)}


def _outputs(path, x, batch):
    return list(ort_eval.predict_all(ort_eval.session(path, threads=1), x, batch).values())


@pytest.mark.parametrize("batch", [None, 1])
@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_family_quantizes_all_integer(exported, tmp_path, name, batch):
    path = exported[(name, batch)]
    shape = families.FAMILIES[name][1]
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, *shape)).astype(np.float32)
    x = rng.standard_normal((4, *shape)).astype(np.float32)
    gm = edgeslim.import_onnx(path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        q = api.quantize(gm, calib, input_shape=shape)
    int8 = api.export_onnx(q, tmp_path / "int8.onnx")
    integer, total = ort_eval.integer_convs(int8)
    assert integer == total > 0, f"{name}: {integer}/{total} convs integer"
    assert _kinds(q.intgraph.float_islands()) == EXPECTED_ISLANDS[name]
    step = 1 if batch else len(x)
    fp32, deployed = _outputs(path, x, step), _outputs(int8, x, step)
    engine = engine_run.run(q.intgraph, x, batch_size=step)
    ptq.set_mode(q.model, "quant")
    with torch.no_grad():
        sims = [q.model(torch.from_numpy(x[i:i + step])) for i in range(0, len(x), step)]
    sims = [s if isinstance(s, tuple) else (s,) for s in sims]
    for k, (ref, y) in enumerate(zip(fp32, deployed)):
        assert output_fidelity(ref, y)["sqnr_db"] > 25, f"{name} output {k}"
        # the integer engine computes what onnxruntime computes (float islands to float32 rounding)
        np.testing.assert_allclose(engine[q.intgraph.output_names[k]], y, rtol=0, atol=1e-5)
        # the PyTorch simulation agrees with the deployed file to one output step (rounding ties)
        sim = torch.cat([s[k] for s in sims]).numpy()
        lsb = _output_lsb(q, k)
        assert np.abs(sim - y).max() <= (lsb or 0) + 1e-5


def _output_lsb(q, k):
    from edgeslim.tasks.fidelity import output_lsbs

    return list(output_lsbs(q.intgraph).values())[k]


def test_sigmoid_times_input_becomes_silu():
    from edgeslim.graph.capture import capture
    from edgeslim.graph.passes import fuse_gated_activations

    gm = fuse_gated_activations(capture(families.build("anchor_free"), (3, 64, 64)))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.nn.functional.silu) == 4 and torch.mul not in targets
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(gm(x), families.build("anchor_free")(x), rtol=1e-5, atol=1e-5)


def test_fidelity_cli_on_arrays_keeps_interface_and_records_metadata(exported, tmp_path):
    src = exported[("face_detector", 1)]
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 3, 64, 64)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((8, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "out"
    code = main(["quantize", str(src), "--calib-data", str(tmp_path / "calib.npz"), "--data",
                 str(tmp_path / "eval.npz"), "--out", str(out)])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "fidelity" and s["inputs"]["fixed_batch"] is True
    assert s["onnx_int8"]["integer_convs"] == s["onnx_int8"]["total_convs"] == 9
    assert {i["fn"] for i in s["onnx_int8"]["float_islands"]} >= {"exp", "Softmax"}
    original = onnx.load(str(src))
    for f in ("model_fp32.onnx", "model_int8.onnx"):
        m = onnx.load(str(out / f))
        assert [i.name for i in m.graph.input] == [i.name for i in original.graph.input]
        assert [o.name for o in m.graph.output] == [o.name for o in original.graph.output]
        assert "edgeslim.quantization" in {p.key for p in m.metadata_props}
    # the reported SQNR is what numpy computes from the two files' outputs in onnxruntime
    x = np.load(tmp_path / "eval.npz")["x"]
    ref, y = _outputs(out / "model_fp32.onnx", x, 1), _outputs(out / "model_int8.onnx", x, 1)
    for (name, r), a, b in zip(s["onnx_int8"]["fidelity_vs_fp32"].items(), ref, y):
        err = ((a.astype(np.float64) - b) ** 2).sum()
        assert r["sqnr_db"] == pytest.approx(10 * np.log10((a.astype(np.float64) ** 2).sum() / err), abs=1e-3)


def test_fidelity_cli_on_images_with_preprocessing(exported, tmp_path):
    from PIL import Image

    src = exported[("landmarks", None)]
    folder = tmp_path / "faces" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (60 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    code = main(["quantize", str(src), "--calib-data", str(tmp_path / "faces"), "--data", str(tmp_path / "faces"),
                 "--out", str(out), "--mean", "0.5", "--std", "0.5", "--channel-order", "BGR", "--resize", "letterbox"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    pre = s["preprocessing"]
    assert pre["channel_order"] == "BGR" and pre["mean"] == [0.5] * 3 and pre["resize"] == "letterbox"
    meta = {p.key: p.value for p in onnx.load(str(out / "model_int8.onnx")).metadata_props}
    assert json.loads(meta["edgeslim.preprocessing"])["channel_order"] == "BGR"
    assert s["inputs"]["test"] == 6


def test_input_spec_matches_a_hand_computed_pixel():
    from PIL import Image

    from edgeslim.data.inputs import InputSpec

    arr = np.zeros((4, 4, 3), np.uint8)
    arr[..., 0], arr[..., 2] = 200, 10
    x = InputSpec(size=(4, 4), channel_order="BGR", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)).image(
        Image.fromarray(arr))
    np.testing.assert_allclose(x[:, 0, 0], [(10 / 255 - 0.1) / 0.5, (0 - 0.2) / 0.5, (200 / 255 - 0.3) / 0.5],
                               rtol=1e-6)


@pytest.mark.parametrize("argv_tail, message", [
    (["--data", "{calib}"], "does not exist"),
    (["--mean", "a,b"], "invalid --mean"),
    (["--input-size", "10,10"], "differs from the model's input"),
    (["--channel-order", "GRAY"], "does not fit"),
])
def test_fidelity_cli_errors_are_one_line(exported, tmp_path, capsys, argv_tail, message):
    src = exported[("landmarks", None)]
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 48, 48), np.float32))
    argv = ["quantize", str(src), "--calib-data", str(tmp_path / "calib.npz"), "--data", str(tmp_path / "calib.npz"),
            "--out", str(tmp_path / "out")]
    tail = [a.replace("{calib}", str(tmp_path / "missing.npz")) for a in argv_tail]
    if tail[0] == "--data":
        argv[argv.index("--data") + 1] = tail[1]
        tail = []
    assert main(argv + tail) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeslim: error:") and message in err[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_out_holding_the_model_is_refused(exported, tmp_path, capsys):
    import shutil

    model = tmp_path / "model_fp32.onnx"
    shutil.copy(exported[("landmarks", None)], model)
    before = model.read_bytes()
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 3, 48, 48), np.float32))
    assert main(["quantize", str(model), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path)]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert model.read_bytes() == before
    assert main(["quantize", str(model), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--out", ""]) == 2


@pytest.mark.parametrize("activations", ["uint8", "int8"])
@pytest.mark.parametrize("name", ["face_detector", "landmarks", "anchor_free", "shufflenet", "pixel_shuffle",
                                  "seg_two_outputs"])
def test_import_qdq_reads_onnxruntime_quantized_families(exported, tmp_path, monkeypatch, name, activations):
    """onnxruntime's own quantize_static output of every family runs in the integer engine as onnxruntime runs it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeslim.export.onnx_qdq import exact_on_host
    from edgeslim.io.onnx_qdq_import import import_qdq

    monkeypatch.chdir(tmp_path)  # quantize_static leaves temporary files in the working directory
    shape = families.FAMILIES[name][1]
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((8, *shape)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    src, out = exported[(name, 1)], tmp_path / "ort_int8.onnx"
    atype = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=atype, weight_type=QuantType.QInt8)
    g = import_qdq(out)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    engine = engine_run.run(g, x, batch_size=1)
    # on x86 CPUs with AVX2 and no VNNI onnxruntime's int8-weight kernels saturate pair sums at int16, so its own
    # file is not what it means there: the oracle runs the same real weights in uint8 containers (exact)
    exact, _ = exact_on_host(onnx.load(str(out)))
    ort_out = ort_eval.predict_all(ort_eval.session(exact.SerializeToString()), x, 1)
    from edgeslim.tasks.fidelity import output_lsbs

    lsbs = output_lsbs(g)
    for k, y in ort_out.items():
        # onnxruntime fuses DQ -> Softmax / Sigmoid / ... -> Q into table kernels with their own rounding: 1 LSB
        np.testing.assert_allclose(engine[k], y, rtol=0, atol=(lsbs[k] or 0) * 1.001 + 1e-5)


def test_silu_runs_as_onnxruntime_integer_kernels(exported, tmp_path):
    """A SiLU (here spelled x * sigmoid(x)) exports as Q(sigmoid) times x, which onnxruntime fuses into
    QLinearSigmoid + QLinearMul: no float Sigmoid or Mul is left in its optimized graph."""
    gm = edgeslim.import_onnx(exported[("anchor_free", None)])
    calib = np.random.default_rng(4).standard_normal((16, 3, 64, 64)).astype(np.float32)
    q = api.quantize(gm, calib, input_shape=(3, 64, 64))
    counts = ort_eval.optimized_op_counts(api.export_onnx(q, tmp_path / "int8.onnx"))
    assert counts["QLinearSigmoid"] == 5 and counts["QLinearMul"] == 4  # 4 SiLUs + the head's sigmoid
    assert counts["Sigmoid"] == 0 and counts["Mul"] == 0


def test_gated_silu_table_is_the_simulation():
    """The engine's table for a gated SiLU equals the simulation on every input code."""
    from edgeslim.engine.ops import DequantizeLinear

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU()).eval()
    calib = torch.randn(32, 3, 8, 8) * 3
    q = api.quantize(model, calib)
    lut = next(n for n in q.intgraph.nodes if n.op == "LUT")
    assert "gate_scale" in lut.attrs
    x = torch.randn(8, 3, 8, 8) * 3
    out = engine_run.run(q.intgraph, x.numpy(), return_codes=True)
    ptq.set_mode(q.model, "quant")
    with torch.no_grad():
        sim = q.model(x).numpy()
    qo = q.intgraph.qparams[lut.outputs[0]]
    np.testing.assert_array_equal(DequantizeLinear(out[lut.outputs[0]], qo.scale, qo.zero_point), sim)


class _SqueezeExcite(torch.nn.Module):
    """MobileNetV3-style: x * hardsigmoid(fc(pool(x))), an elementwise product of two tensors (broadcast)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Conv2d(8, 8, 1)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        gate = torch.nn.functional.hardsigmoid(self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1)))
        return self.out(x * gate)


def test_elementwise_mul_of_two_tensors_is_qlinearmul_exact_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _SqueezeExcite().eval()
    calib = torch.randn(32, 3, 12, 12)
    q = api.quantize(model, calib)
    assert [n.op for n in q.intgraph.nodes].count("QLinearMul") == 1 and not q.intgraph.float_islands()
    path = api.export_onnx(q, tmp_path / "se.onnx")
    counts = ort_eval.optimized_op_counts(path)
    assert counts["QLinearMul"] == 1 and counts["Mul"] == 0
    x = torch.randn(8, 3, 12, 12).numpy()
    codes = engine_run.run(q.intgraph, x, return_codes=True)
    name = next(n for n in q.intgraph.nodes if n.op == "QLinearMul").outputs[0]
    # the product's codes as onnxruntime computes them: expose the tensor as an output of the exported file
    m = onnx.load(str(path))
    stored = next(n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0].startswith(name))
    m.graph.output.append(onnx.helper.make_tensor_value_info(stored, onnx.TensorProto.UINT8, None))
    onnx.save(m, str(tmp_path / "se_probe.onnx"))
    sess = ort_eval.session(tmp_path / "se_probe.onnx")
    got = sess.run([stored], {sess.get_inputs()[0].name: x})[0].astype(np.int64)
    qy = q.intgraph.qparams[name]
    np.testing.assert_array_equal(codes[name] + (128 if qy.signed else 0), got)


def test_analyze_any_model_engine_matches_onnxruntime_per_output(exported, tmp_path):
    src = exported[("seg_two_outputs", None)]
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((12, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["analyze", str(src), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(out), "--overflow-images", "4"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["engine_vs_onnx"]) == {"out0", "out1"}
    for r in s["engine_vs_onnx"].values():  # the bilinear island runs in float32 in both: at most one step
        assert r.get("max_diff_steps", 0) <= 1 and r["max_abs_diff"] < 0.1
    assert s["overflow"]["images"] == 4 and len(s["overflow"]["layers"]) == 4  # 3 convs and the linear layer


def test_dynamic_height_width_onnx_quantizes_at_the_given_input_shape(tmp_path):
    model = families.build("landmarks")
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 48, 48),), str(path), dynamo=False, input_names=["img"],
                          output_names=["pts"], opset_version=17,
                          dynamic_axes={"img": {0: "n", 2: "h", 3: "w"}, "pts": {0: "n"}})
    with pytest.raises(edgeslim.EdgeslimError, match="--input-shape"):
        edgeslim.import_onnx(path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(6).standard_normal((8, 3, 40, 40)).astype(np.float32))
    assert main(["quantize", str(path), "--input-shape", "3,40,40", "--calib-data", str(tmp_path / "x.npz"),
                 "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["inputs"]["shape"] == [3, 40, 40] and s["onnx_int8"]["integer_convs"] == 4


def test_whole_pickled_model_needs_allow_pickle_and_a_pickle_is_named_as_such(tmp_path, capsys):
    import pickle

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.save(model, tmp_path / "whole.pt")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(7).standard_normal((8, 3, 8, 8)).astype(np.float32))
    base = ["quantize", str(tmp_path / "whole.pt"), "--input-shape", "3,8,8", "--calib-data", str(tmp_path / "x.npz"),
            "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out")]
    assert main(base) == 2
    assert "pickled Python objects" in capsys.readouterr().err and not (tmp_path / "out" / "summary.json").exists()
    assert main(base + ["--allow-pickle"]) == 0
    capsys.readouterr()  # that run's lines (its notes may contain the letters "ran")

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Payload(), f)
    assert main(["quantize", "resnet20", "--weights", str(tmp_path / "evil.pt"), "--calib-data", str(tmp_path / "x.npz"),
                 "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out2")]) == 2
    captured = capsys.readouterr()
    assert "pickled Python objects" in captured.err and "--allow-pickle" in captured.err
    assert "ran" not in captured.out.split()  # the payload's print never ran


@pytest.mark.parametrize("extra, message", [
    (["--out", "/proc/edgeslim-x"], "pass a writable folder"),
    (["--seed", "-1"], "invalid --seed"),
    (["--eval-size", "0"], "invalid --eval-size"),
])
def test_bad_options_end_in_one_line(exported, tmp_path, capsys, extra, message):
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 3, 48, 48), np.float32))
    argv = ["quantize", str(exported[("landmarks", None)]), "--calib-data", str(tmp_path / "x.npz"), "--data",
            str(tmp_path / "x.npz")]
    argv += extra if extra[0] == "--out" else ["--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]


def test_label_free_sensitivity_and_mixed_score_by_sqnr_against_fp32(exported, tmp_path, capsys):
    """sensitivity / mixed on a two-output, batch-1 face detector with unlabelled arrays: the fidelity task scores
    plans by the worst output's SQNR vs FP32, and the reported ONNX score is numpy's SQNR of the two files'
    onnxruntime outputs."""
    src = exported[("face_detector", 1)]
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((24, 3, 64, 64)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((6, 3, 64, 64)).astype(np.float32))
    common = [str(src), "--calib-data", str(tmp_path / "calib.npz"), "--data", str(tmp_path / "eval.npz"),
              "--calib-size", "16", "--holdout-size", "8", "--w-bits", "4", "--a-bits", "4"]
    assert main(["sensitivity", *common, "--no-groups", "--out", str(tmp_path / "sens")]) == 0
    sens = json.loads((tmp_path / "sens" / "summary.json").read_text())
    assert sens["task"] == "fidelity" and sens["sensitivity"]["metric"]["unit"] == "dB"
    assert sens["sensitivity"]["fp32_score"] is None  # FP32 vs itself: infinite, written as null
    assert sens["images"] == {"calibration": 16, "holdout": 8, "holdout_from": "calib", "test": 6}
    rows = [r for r in sens["sensitivity"]["rows"] if r["kind"] == "layer"]
    assert len(rows) == 9 and all(r["keep_high"]["score"] is not None for r in rows)

    floor = sens["sensitivity"]["uniform"]["score"] + 3.0
    assert main(["mixed", *common, "--min-sqnr", f"{floor:.3f}", "--out", str(tmp_path / "mixed")]) == 0
    s = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    assert s["task"] == "fidelity" and s["met"] and s["mixed"]["high_precision_layers"]
    assert s["mixed"]["holdout_score"] >= floor
    x = np.load(tmp_path / "eval.npz")["x"]
    ref = _outputs(tmp_path / "mixed" / "model_fp32.onnx", x, 1)
    got = _outputs(tmp_path / "mixed" / "model_mixed.onnx", x, 1)
    worst = min(10 * np.log10((a.astype(np.float64) ** 2).sum() / ((a.astype(np.float64) - b) ** 2).sum())
                for a, b in zip(ref, got))
    assert s["onnx_mixed"]["score"] == pytest.approx(worst, abs=1e-6)
    capsys.readouterr()
    assert main(["mixed", *common, "--max-drop", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--min-sqnr" in err.strip().splitlines()[-1] and "Traceback" not in err and not (tmp_path / "bad").exists()


def test_label_free_qat_distils_every_output_and_beats_its_ptq_start(exported, tmp_path, capsys):
    """qat on unlabelled arrays (auto -> fidelity): output distillation raises the held-out SQNR over the PTQ start,
    and the reported ONNX SQNR is numpy's SQNR of the two files' onnxruntime outputs."""
    src = exported[("landmarks", None)]
    shape = families.FAMILIES["landmarks"][1]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tr.npz", x=rng.standard_normal((96, *shape)).astype(np.float32))
    np.savez(tmp_path / "te.npz", x=rng.standard_normal((16, *shape)).astype(np.float32))
    common = ["qat", str(src), "--train-data", str(tmp_path / "tr.npz"), "--data", str(tmp_path / "te.npz"),
              "--w-bits", "4", "--a-bits", "4", "--calib-size", "32", "--batch-size", "16", "--no-augment"]
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "q")]) == 0
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["task"] == "fidelity" and s["qat"]["sqnr_db"] > s["ptq"]["sqnr_db"] + 1.0
    x = np.load(tmp_path / "te.npz")["x"]
    ref, got = _outputs(tmp_path / "q" / "model_fp32.onnx", x, 16), _outputs(tmp_path / "q" / "model_int8.onnx", x, 16)
    worst = min(10 * np.log10((a.astype(np.float64) ** 2).sum() / ((a.astype(np.float64) - b) ** 2).sum())
                for a, b in zip(ref, got))
    assert s["onnx_int8"]["headline_sqnr_db"] == pytest.approx(worst, abs=1e-3)
    capsys.readouterr()
    assert main([*common, "--method", "ewgs", "--out", str(tmp_path / "e")]) == 2
    assert "--method lsq" in capsys.readouterr().err


def test_fidelity_run_writes_a_report_with_every_output_and_provenance(exported, tmp_path):
    src = exported[("face_detector", None)]
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((8, 3, 64, 64)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["analyze", str(src), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--overflow-images", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    page = (out / "report.html").read_text()
    assert "edgeslim analyze" in page and "Integer engine" in page and "Provenance" in page
    for name, r in s["onnx_int8"]["fidelity_vs_fp32"].items():
        assert f"<td>{name}</td>" in page and (f"{r['sqnr_db']:.2f}" in page or r["identical"])
    assert s["provenance"]["model"] == str(src) and s["provenance"]["cpu"]["int8_flags"]
