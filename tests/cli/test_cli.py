"""The CLI end to end on tiny data, and every bad input ending in one clear line (exit 2, no traceback)."""

import json

import numpy as np
import pytest
import torch

from edgeslim.cli import main

from helpers import expect_error as _expect_error, run_cli as _run


def _tiny_job(capsys, verb, out, image_folder, user_model):
    """Run ``verb`` (quantize / analyze) on the tiny user model; return (summary, stdout)."""
    code, stdout, _ = _run(capsys, verb, f"{user_model}:tiny", "--input-shape", "3,8,8",
                           "--calib-data", image_folder, "--data", image_folder, "--calib-size", "8", "--out", out)
    assert code == 0
    return json.loads((out / "summary.json").read_text()), stdout


def test_quantize_end_to_end(capsys, tmp_path, image_folder, user_model):
    out = tmp_path / "run"
    s, stdout = _tiny_job(capsys, "quantize", out, image_folder, user_model)
    for key in ("fp32", "quantized", "onnx_int8", "size_bytes", "latency_ms", "config"):
        assert key in s
    assert s["onnx_int8"]["integer_convs"] == s["onnx_int8"]["total_convs"] == 2
    assert s["images"] == {"calibration": 8, "test": 12}
    assert s["size_bytes"]["int8"] < s["size_bytes"]["fp32"]
    assert {"model_fp32.onnx", "model_int8.onnx", "encodings.json", "report.html", "summary.json"} <= \
        {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    enc = json.loads((out / "encodings.json").read_text())
    assert all({"scale", "zero_point", "bits"} <= set(v) for v in enc["activations"].values())
    assert "integer convs in onnxruntime: 2/2" in stdout
    # the weight grid follows this CPU (7-bit where onnxruntime's fast int8 kernels saturate) and is said
    from edgeslim.cpu import int8_weights_saturate

    reduced = int8_weights_saturate()
    assert s["config"]["weight_range"] == ("reduced" if reduced else "full")
    assert {v["bits"] for k, v in enc["parameters"].items() if k.endswith(".weight")} == {7 if reduced else 8}
    assert ("8-bit weights on the 7-bit grid" in stdout) == reduced
    assert set(s["onnx_int8"]["weight_containers"]) == {"int8"}  # 2 convs and the classifier, all fast and exact


def test_inspect(capsys):
    code, out, _ = _run(capsys, "inspect", "resnet20")
    assert code == 0 and "layer1.0.conv1" in out and "269,722" in out


def _quant_argv(tmp_path, image_folder, model="resnet20", *extra):
    return ["quantize", model, "--calib-data", image_folder, "--data", image_folder, "--out", tmp_path / "run",
            "--random-init", *extra]


def test_missing_checkpoint(capsys, tmp_path, image_folder):
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet20", "--weights", tmp_path / "nope.pt"),
                  "nope.pt")


def test_corrupt_checkpoint(capsys, tmp_path, image_folder):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet20", "--weights", bad), "bad.pt")


def test_checkpoint_for_another_model(capsys, tmp_path, image_folder):
    from edgeslim.models import build_model

    other = tmp_path / "r32.pt"
    torch.save(build_model("resnet32")[0].state_dict(), other)
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet20", "--weights", other),
                  "does not match")


def test_unknown_model(capsys, tmp_path, image_folder):
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet21"), "unknown model")


def test_empty_data_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, empty), "empty")


def test_non_image_data_folder(capsys, tmp_path):
    root = tmp_path / "texts"
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("hello")
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, root), "no images")


@pytest.mark.parametrize("flag,value", [("--w-bits", "1"), ("--a-bits", "17"), ("--calib-size", "0"),
                                        ("--calibrator", "magic"), ("--scale", "log")])
def test_invalid_options(capsys, tmp_path, image_folder, flag, value):
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet20", flag, value), flag)


def test_nan_activations_in_calibration(capsys, tmp_path, image_folder, user_model):
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, f"{user_model}:nan_model",
                                                "--input-shape", "3,8,8"), "NaN")


def test_untraceable_user_model(capsys, tmp_path, image_folder):
    path = tmp_path / "dyn.py"
    path.write_text("import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                    "        return x if x.sum() > 0 else -x\ndef make():\n    return M()\n")
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, f"{path}:make", "--input-shape", "3,8,8"),
                  "traced")


def test_analyze_engine_and_overflow(capsys, tmp_path, image_folder, user_model):
    out = tmp_path / "run"
    s, _ = _tiny_job(capsys, "analyze", out, image_folder, user_model)
    assert s["engine"]["top1"] == s["onnx_int8"]["top1"]
    assert s["engine_vs_onnx"]["max_abs_diff"] <= 1
    names = [r["name"] for r in s["overflow"]["layers"]]
    assert names == ["0", "3", "7"]  # the two convs and the linear layer, by module name
    for r in s["overflow"]["layers"]:
        assert 0.0 <= r["sum_int16"]["min"] <= r["sum_int16"]["avg"] <= r["sum_int16"]["max"] <= 1.0
    assert "Overflow statistics" in (out / "report.html").read_text()


def test_analyze_shift_requant_needs_pow2(capsys, tmp_path, image_folder, user_model):
    argv = ["analyze", f"{user_model}:tiny", "--input-shape", "3,8,8", "--calib-data", image_folder,
            "--data", image_folder, "--out", tmp_path / "run", "--requant", "shift"]
    _expect_error(capsys, tmp_path, argv, "pow2")


@pytest.fixture
def npz_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (240, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=(x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype(np.int64))
    return path


def _mixed_argv(verb, user_model, npz_data, out, *extra):
    return [verb, f"{user_model}:tiny", "--input-shape", "3,8,8", "--calib-data", npz_data, "--data", npz_data,
            "--calib-size", "64", "--holdout-size", "100", "--w-bits", "2", "--a-bits", "2", "--out", out, *extra]


def test_mixed_then_quantize_with_its_plan(capsys, tmp_path, npz_data, user_model):
    out = tmp_path / "mixed"
    code, stdout, _ = _run(capsys, *_mixed_argv("mixed", user_model, npz_data, out, "--max-drop", "0.0"))
    assert code == 0
    steps = [ln for ln in stdout.splitlines() if ln.rstrip().endswith(("kept", "not kept"))]
    assert steps and steps[0].split()[0] == "uniform"  # each search step printed as soon as it is scored
    s = json.loads((out / "summary.json").read_text())
    for key in ("score", "plan", "high_precision_mac_fraction", "size_bytes", "latency_ms"):
        assert key in s["mixed"]
    assert {"score"} <= set(s["fp32"]) and {"score"} <= set(s["uniform"]) and "score" in s["onnx_mixed"]
    assert s["task"] == "classify" and s["metric"]["key"] == "top1"
    assert s["frontier"] and s["search"]["steps"][0]["label"] == "uniform"
    assert s["high"] == "int8" and s["low"] == "int2"
    assert abs(s["onnx_mixed"]["score"] - s["mixed"]["score"]) <= 1 / 240  # onnxruntime runs what PyTorch simulated
    assert {"plan.json", "model_mixed.onnx", "model_fp32.onnx", "report.html"} <= {p.name for p in out.iterdir()}
    assert "<img" in (out / "report.html").read_text()
    # the plan file reproduces the mixed model through `quantize --plan` (same calibration images and seed)
    q = tmp_path / "q"
    code, _, _ = _run(capsys, "quantize", f"{user_model}:tiny", "--input-shape", "3,8,8", "--calib-data", npz_data,
                      "--data", npz_data, "--calib-size", "64", "--w-bits", "2", "--a-bits", "2",
                      "--plan", out / "plan.json", "--out", q)
    assert code == 0
    sq = json.loads((q / "summary.json").read_text())
    assert sq["onnx_int8"]["top1"] == s["onnx_mixed"]["score"] and sq["plan"] == s["mixed"]["plan"]


def test_sensitivity_sweeps_and_group_table(capsys, tmp_path, npz_data, user_model):
    out = tmp_path / "sens"
    code, stdout, _ = _run(capsys, *_mixed_argv("sensitivity", user_model, npz_data, out,
                                                "--group", "features=0|3", "--group", "classifier=7"))
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    rows = s["sensitivity"]["rows"]
    assert [r["name"] for r in rows if r["kind"] == "layer"] == ["0", "3", "7"]
    assert all({"keep_high", "only_quantized"} <= set(r) for r in rows)
    assert set(s["sensitivity"]["seconds"]) == {"keep_high", "only_quantized"}
    g = s["groups"]
    assert list(g["groups"]) == ["features", "classifier"] and len(g["rows"]) == 4
    all_high = next(r for r in g["rows"] if not r["quantized"])
    all_low = next(r for r in g["rows"] if len(r["quantized"]) == 2)
    assert all_high["weight_bytes"] > all_low["weight_bytes"] and all_high["precision"]["features"] == "fp32"
    assert g["fp32_latency_ms"] > 0  # the FP32 row of the group table has its own latency
    assert f"{g['fp32_latency_ms']:.4g}" in (out / "report.html").read_text()


def test_mixed_bad_input_is_one_line(capsys, tmp_path, npz_data, user_model):
    _expect_error(capsys, tmp_path, _mixed_argv("mixed", user_model, npz_data, tmp_path / "run"), "give a budget")
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, npz_data, f"{user_model}:tiny", "--input-shape", "3,8,8",
                                                "--plan", tmp_path / "nope.json"), "nope.json")
    bad = tmp_path / "bad_plan.json"
    bad.write_text(json.dumps({"layers": {"backbone.*": "fp32"}}))
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, npz_data, f"{user_model}:tiny", "--input-shape", "3,8,8",
                                                "--plan", bad), "matches no layer")
    _expect_error(capsys, tmp_path, _mixed_argv("mixed", user_model, npz_data, tmp_path / "run", "--max-drop", "0.01",
                                                "--high", "int99"), "int99")


def test_mixed_holdout_from_data_reports_on_the_other_images(capsys, tmp_path, npz_data, user_model):
    out = tmp_path / "mixed"
    code, stdout, _ = _run(capsys, *_mixed_argv("mixed", user_model, npz_data, out, "--max-size-kb", "2",
                                                "--holdout-from", "data"))
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["images"]["holdout_from"] == "data" and s["images"]["holdout"] == 100 and s["images"]["test"] == 140
    assert s["mixed"]["size_bytes"] <= 2048 or not s["met"]
    _expect_error(capsys, tmp_path, _mixed_argv("mixed", user_model, npz_data, tmp_path / "run", "--max-drop", "0.1",
                                                "--holdout-from", "test"), "--holdout-from")


def test_mixed_under_a_latency_budget_measures_every_step(capsys, tmp_path, npz_data, user_model):
    out = tmp_path / "mixed"
    code, _, _ = _run(capsys, *_mixed_argv("mixed", user_model, npz_data, out, "--max-latency-ms", "1000"))
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["met"] and all(c["latency_ms"] is not None and c["latency_ms"] > 0 for c in s["candidates"])
    accepted = [c for c in s["search"]["steps"] if c["accepted"]]
    assert all(b["score"] >= a["score"] for a, b in zip(accepted, accepted[1:]))  # promotions verified as gains


def test_quantize_with_brecq_writes_the_same_outputs_plus_units(capsys, tmp_path, image_folder, user_model):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "quantize", f"{user_model}:tiny", "--input-shape", "3,8,8", "--calib-data", image_folder,
                        "--data", image_folder, "--calib-size", "8", "--w-bits", "4", "--algorithm", "brecq",
                        "--iters", "20", "--out", out)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("fp32", "quantized", "onnx_int8", "size_bytes", "latency_ms", "config", "time_to_quantize_s"):
        assert key in s
    assert s["config"]["algorithms"] == ["brecq"] and s["config"]["iters"] == 20
    units = s["reconstruction"]["brecq"]
    assert sum(len(u["layers"]) for u in units) == 3
    assert all(u["mse"] <= u["mse_rtn"] for u in units)


@pytest.mark.parametrize("extra,needle", [(("--algorithm", "adaround,brecq"), "choose one"),
                                          (("--algorithm", "brecq", "--iters", "0"), "--iters"),
                                          (("--fisher",), "--fisher")])
def test_reconstruction_options_are_checked(capsys, tmp_path, image_folder, extra, needle):
    _expect_error(capsys, tmp_path, _quant_argv(tmp_path, image_folder, "resnet20", *extra), needle)


def test_mixed_refuses_per_plan_algorithms(capsys, tmp_path, npz_data, user_model):
    _expect_error(capsys, tmp_path, _mixed_argv("mixed", user_model, npz_data, tmp_path / "run", "--max-drop", "1",
                                                "--algorithm", "brecq"), "edgeslim quantize --plan")


def test_zoo_model_without_weights_is_refused_unless_random_init(capsys, tmp_path, image_folder):
    argv = ["quantize", "resnet20", "--calib-data", image_folder, "--data", image_folder, "--out", tmp_path / "run"]
    _expect_error(capsys, tmp_path, argv, "--random-init")


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("edgeslim ")
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "(default: 512)" in capsys.readouterr().out


def test_eval_size_scores_a_class_balanced_subset(capsys, tmp_path, npz_data, user_model):
    """--eval-size N: the test numbers come from N images, both classes alike; onnxruntime's top-1 on exactly those
    images (recomputed here from the file) is the reported one."""
    from edgeslim.data import Preprocess, open_dataset
    from edgeslim.eval import metrics, ort as ort_eval

    out = tmp_path / "q"
    code, _, _ = _run(capsys, "quantize", f"{user_model}:tiny", "--input-shape", "3,8,8", "--calib-data", npz_data,
                      "--data", npz_data, "--calib-size", "32", "--eval-size", "50", "--out", out)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["images"]["test"] == 50
    full = open_dataset(str(npz_data), Preprocess((3, 8, 8), (0.0,) * 3, (1.0,) * 3))
    sub = full.subset(50, 0)
    assert len(sub) == 50 and abs(int((sub.labels == 1).sum()) - 25) <= 1  # class-balanced
    logits = ort_eval.predict(ort_eval.session(out / "model_int8.onnx"), sub.load_all())
    assert s["onnx_int8"]["top1"] == metrics.top1(logits, sub.labels)
