"""``--task detect`` through the command line on a tiny YOLO-format set written here.

The detectors are randomly initialised (no weights in the fast suite), so the checks are about what the job
computes and writes: the same detections from PyTorch FP32 and its ONNX export, every figure the issue names in
``summary.json``, group plans that really leave float islands, and one-line errors. The metrics themselves are
checked against pycocotools in ``test_detection_metrics.py``; the real-data numbers are the slow tests and
``bench/detect_coco128.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeslim.cli import main
from edgeslim.models.yolo import COCO_NAMES

from helpers import SIZE, detect_args as _args


def test_quantize_detect_writes_map_and_confusion_figures(yolo_quantized):
    out, printed = yolo_quantized
    s = json.loads((out / "summary.json").read_text())
    for key in ("fp32", "quantized", "onnx_fp32", "onnx_int8"):
        for metric in ("map50", "map50_95", "precision", "recall", "f1"):
            assert 0.0 <= s[key][metric] <= 1.0
        assert set(s[key]["confusion"]) >= {"tp", "fp", "fn"}
    assert s["images"] == {"calibration": 4, "test": 6, "test_boxes": 6, "imgsz": SIZE}
    assert s["fp32"]["map50"] == pytest.approx(s["onnx_fp32"]["map50"], abs=1e-6)  # the same network twice
    assert s["onnx_fp32"]["confusion"] == s["fp32"]["confusion"]
    g = s["onnx_int8_graph"]
    assert g["integer_convs"] == g["total_convs"] == 13
    assert s["size_bytes"]["int8"] < s["size_bytes"]["fp32"] / 3
    assert (out / "model_int8.onnx").exists() and "mAP@.5" in printed
    import onnx

    fp32, int8 = (onnx.load(str(out / f)) for f in ("model_fp32.onnx", "model_int8.onnx"))
    assert [o.name for o in int8.graph.output] == [o.name for o in fp32.graph.output]  # the same interface
    meta = {p.key: json.loads(p.value) for p in int8.metadata_props if p.key != "edgeslim.task"}
    assert meta["edgeslim.decoder"]["name"] == "YoloV3Decoder" and len(meta["edgeslim.decoder"]["strides"]) == 2
    assert meta["edgeslim.preprocessing"]["resize"] == "letterbox" and meta["edgeslim.class_names"]


def test_groups_leave_float_islands(capsys, tmp_path, yolo_set):
    assert main(_args("quantize", "yolov3-tiny", yolo_set, tmp_path / "g", "--groups", "backbone=8,neck=32,head=32")) == 0
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    g = s["onnx_int8_graph"]
    assert 0 < g["integer_convs"] < g["total_convs"]  # the backbone's convs are integer, neck / head float
    assert g["optimized_ops"].get("Conv", 0) + g["optimized_ops"].get("FusedConv", 0) == \
        g["total_convs"] - g["integer_convs"]


@pytest.mark.slow  # ~5 s on an idle 2-core machine: over the fast suite's budget
def test_analyze_detect_runs_the_engine_and_counts_overflow(capsys, tmp_path, yolo_set):
    assert main(_args("analyze", "yolov3-tiny", yolo_set, tmp_path / "a", "--overflow-images", "2")) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert abs(s["engine"]["map50"] - s["onnx_int8"]["map50"]) <= 0.05
    assert s["overflow"]["images"] == 2 and len(s["overflow"]["layers"]) == 13


@pytest.mark.parametrize("extra, needle", [
    (("--groups", "trunk=8"), "no group 'trunk'"),
    (("--groups", "backbone"), "NAME=PRECISION"),
    (("--decoder", "ssd"), "unknown --decoder"),
    (("--channel-order", "GRB"), "RGB or BGR"),
])
def test_detect_option_errors_are_one_line(capsys, tmp_path, yolo_set, extra, needle):
    assert main(_args("quantize", "yolov3-tiny", yolo_set, tmp_path / "e", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_classifier_with_task_detect_is_refused(capsys, tmp_path, yolo_set):
    assert main(["quantize", "resnet20", "--random-init", "--task", "detect", "--data", str(yolo_set), "--data-split", "val",
                 "--calib-data", str(yolo_set), "--calib-split", "train", "--out", str(tmp_path / "c")]) == 2
    assert "--decoder" in capsys.readouterr().err


def test_unlabelled_test_data_is_refused(capsys, tmp_path, yolo_set):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in sorted((yolo_set / "images" / "val").iterdir())[:2]:
        (bare / p.name).write_bytes(p.read_bytes())
    args = _args("quantize", "yolov3-tiny", yolo_set, tmp_path / "u")
    args[args.index("--data") + 1], args[args.index("--data-split") + 1] = str(bare), "."
    args.remove("--data-split")
    args.remove(".")
    assert main(args) == 2
    assert "no labels" in capsys.readouterr().err


@pytest.mark.slow  # ~10-22 s on an idle 2-core machine: over the fast suite's budget
def test_sensitivity_detect_one_layer_high_and_group_table(capsys, tmp_path, yolo_set):
    """``sensitivity --task detect`` is the one sensitivity job: the sweep on every test image (mAP@0.5:0.95 as
    the score, mAP@0.5 and P / R / F1 beside it), then the backbone / neck / head table."""
    assert main(_args("sensitivity", "yolov3-tiny", yolo_set, tmp_path / "s", "--sweep", "keep_high",
                      "--layers-only")) == 0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    sens = s["sensitivity"]
    assert s["task"] == "detect" and sens["inputs"] == "test" and sens["images"] == 6
    assert list(sens["seconds"]) == ["keep_high"] and all("only_quantized" not in r for r in sens["rows"])
    assert len(sens["rows"]) == 13 and all(r["kind"] == "layer" and 0.0 <= r["keep_high"]["map50"] <= 1.0
                                           for r in sens["rows"])
    for r in sens["rows"]:
        kh = r["keep_high"]
        assert kh["score"] == kh["map50_95"]
        assert kh["delta_map50"] == pytest.approx(kh["map50"] - sens["uniform"]["map50"], abs=1e-12)
    printed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if "kept high" in ln and "mAP@.5" in ln]
    assert printed == [r["name"] for r in sens["rows"]]  # each row printed as soon as it was scored, in order
    rows = s["groups"]["rows"]
    assert len(rows) == 8 and set(s["groups"]["groups"]) == {"backbone", "neck", "head"}  # 2^3 combinations
    all_fp32 = next(r for r in rows if not r["quantized"])
    assert all_fp32["scores"]["map50"] == pytest.approx(sens["fp32"]["map50"], abs=1e-6)
    assert s["groups"]["fp32_scores"] == sens["fp32"]
    sizes = {tuple(r["quantized"]): r["weight_bytes"] for r in rows}
    assert sizes[("backbone", "neck", "head")] < sizes[()] / 3
    assert (tmp_path / "s" / "report.html").exists()


@pytest.mark.slow  # ~10 s on an idle 2-core machine: over the fast suite's budget
def test_sensitivity_job_detect_rows_are_the_map_of_each_plans_file(tmp_path, yolo_set):
    """The job's per-layer rows with ``tasks.Detect``: each row's figures are those of its plan's file (re-exported
    here from the same calibration) run image by image in onnxruntime and scored by ``tasks.detect_parts.scores``."""
    import onnxruntime as ort

    from edgeslim.algorithms import mixed_precision as mp, ptq
    from edgeslim.config import PTQConfig
    from edgeslim.data.detection import open_detection
    from edgeslim.config import DetectOptions
    from edgeslim.tasks.detect_parts import detect, scores
    from edgeslim.export.onnx_qdq import save_onnx, to_onnx
    from edgeslim.jobs.mixed import calibrated, run_sensitivity
    from edgeslim.lower import lower
    from edgeslim.models import build_model
    from edgeslim.quant.precision import LayerPrecision
    from edgeslim.tasks import Detect

    model, info = build_model("yolov3-tiny", None, input_shape=(3, SIZE, SIZE))
    calib, test = (open_detection(yolo_set, split, imgsz=SIZE) for split in ("train", "val"))
    opts, config, high = DetectOptions(batch_size=4), PTQConfig(calib_size=4), LayerPrecision.parse("fp32")
    task = Detect(calib, test, opts, info=info)
    s = run_sensitivity(model, info, task, config, tmp_path / "s", high=high, sweeps=("keep_high",),
                        layers_only=True, group_table=False)
    sens = s["sensitivity"]
    assert [r["name"] for r in sens["rows"]] == ptq.layer_names(ptq.prepare(model, info.input_shape, config))

    def file_scores(path: Path) -> dict:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dets, targets = [], []
        for i in range(len(test)):
            x, t, _ = test[i]
            dets += detect(sess.run(None, {sess.get_inputs()[0].name: x[None]}), info.decoder, opts)
            targets.append(t)
        return scores(dets, targets, len(COCO_NAMES), opts)

    gm = calibrated(model, info, task.calibration(config, info), config, opts.batch_size)
    for row in (None, *sens["rows"][::6]):  # the uniform file, then every sixth layer kept FP32
        ptq.apply_plan(gm, config, None if row is None else mp.keep_high_plan(row["name"], high))
        want = file_scores(save_onnx(to_onnx(lower(gm, info.input_shape)), tmp_path / "plan.onnx"))
        got = sens["uniform"] if row is None else row["keep_high"]
        for k in ("map50", "map50_95", "precision", "recall", "f1"):
            assert got[k] == pytest.approx(want[k], abs=1e-12), (row and row["name"], k)
        assert got["score"] == got["map50_95"]


@pytest.mark.slow  # ~10-22 s on an idle 2-core machine: over the fast suite's budget
def test_mixed_detect_searches_under_a_map_budget_on_held_out_images(capsys, tmp_path, yolo_set):
    """``mixed --task detect`` is the one mixed job: budget in mAP@0.5:0.95 points, plans scored on the calibration
    images not used to calibrate, the final numbers on --data; the scores are the files' mAP, recomputed here."""
    import onnxruntime as ort

    from edgeslim.data.detection import open_detection
    from edgeslim.config import DetectOptions
    from edgeslim.tasks.detect_parts import detect, scores
    from edgeslim.models import build_model

    assert main(_args("mixed", "yolov3-tiny", yolo_set, tmp_path / "m", "--max-drop", "0")) == 0
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["task"] == "detect" and s["metric"]["key"] == "map50_95" and s["metric"]["unit"] == "points"
    assert s["images"] == {"calibration": 4, "holdout": 2, "holdout_from": "calib", "test": 6, "simulation": 6}
    assert s["met"] == (s["mixed"]["holdout_score"] >= s["fp32"]["holdout_score"] - 1e-12)  # --max-drop 0
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    assert sorted(plan["layers"]) == sorted(s["mixed"]["high_precision_layers"])

    _, info = build_model("yolov3-tiny", None, input_shape=(3, SIZE, SIZE))
    opts = DetectOptions()

    def file_map(path: Path, split: str, idx) -> float:  # the file in onnxruntime, one image at a time
        ds = open_detection(yolo_set, split, imgsz=SIZE)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dets, targets = [], []
        for i in idx:
            x, t, _ = ds[int(i)]
            dets += detect(sess.run(None, {sess.get_inputs()[0].name: x[None]}), info.decoder, opts)
            targets.append(t)
        return scores(dets, targets, len(COCO_NAMES), opts)["map50_95"]

    mixed = tmp_path / "m" / "model_mixed.onnx"
    assert s["onnx_mixed"]["score"] == pytest.approx(file_map(mixed, "val", range(6)), abs=1e-12)
    calibrated = np.sort(np.random.default_rng(0).choice(6, 4, replace=False))  # --calib-size 4, --seed 0
    held_out = np.setdiff1d(np.arange(6), calibrated)
    assert s["mixed"]["holdout_score"] == pytest.approx(file_map(mixed, "train", held_out), abs=1e-12)


@pytest.mark.slow  # ~10-22 s on an idle 2-core machine: over the fast suite's budget
def test_qat_detect_distils_heads_and_exports(capsys, tmp_path, yolo_set):
    import onnxruntime as ort
    import torch

    out = tmp_path / "q"
    assert main(["qat", "yolov3-tiny", "--random-init", "--input-shape", f"3,{SIZE},{SIZE}", "--task", "detect",
                 "--train-data", str(yolo_set), "--train-split", "train", "--data", str(yolo_set), "--data-split",
                 "val", "--w-bits", "8", "--a-bits", "8", "--epochs", "2", "--batch-size", "3", "--calib-size", "4",
                 "--lr", "0.0005", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in s["history"]] == [1, 2] and s["training"]["steps"] == 4
    assert all(np.isfinite(h["loss"]) and h["train_top1"] == 0 for h in s["history"])
    for key in ("fp32", "ptq", "qat", "onnx_int8"):
        assert 0.0 <= s[key]["map50"] <= 1.0 and "confusion" in s[key]
    assert s["images"]["train"] == 6 and s["size_bytes"]["int8"] < s["size_bytes"]["fp32"] / 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4  # resumable (train.checkpoint)
    # the exported INT8 file is the trained model: onnxruntime reproduces both head outputs to 1 LSB
    from edgeslim.algorithms import qat
    from edgeslim.config import QATConfig
    from edgeslim.train.data import TrainData
    from edgeslim.train.losses import head_distillation

    sess = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    lsb = s["export_check"]["max_diff_lsb"]
    assert len(sess.get_outputs()) == len(lsb) == 2 and all(v is not None and v <= 1.001 for v in lsb)
    assert "mAP@.5" in capsys.readouterr().out
    assert main(["qat", "yolov3-tiny", "--random-init", "--input-shape", f"3,{SIZE},{SIZE}", "--task", "detect",
                 "--train-data", str(yolo_set), "--train-split", "train", "--data", str(yolo_set), "--data-split",
                 "val", "--epochs", "2", "--out", str(out)]) == 2
    assert "exists from an earlier run: add --resume" in capsys.readouterr().err
    with pytest.raises(Exception):
        qat.train(None, None, TrainData(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.int64)),
                  QATConfig(method="ewgs"), evaluate=lambda m: 0.0, objective=head_distillation)


def test_head_distillation_by_hand():
    import torch

    from edgeslim.train.losses import head_distillation

    a, b = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-1.0]])], [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0]])]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    want = (((sig(2.0) - 0.5) ** 2) / 2 + (sig(-1.0) - sig(1.0)) ** 2) / 2
    assert float(head_distillation(a, b)) == pytest.approx(want, rel=1e-6)
    assert float(head_distillation(b, b)) == 0.0


def test_decoded_output_files_decode_like_the_numpy_decoder(capsys, tmp_path, yolo_set, yolo_quantized):
    """--decoded-output: both files end in the box decoding; their one output, converted by from_decoded, equals the
    numpy decoder applied to the raw files' outputs, and the mAP through it equals the raw files' mAP."""
    import onnx

    from edgeslim.eval import ort as ort_eval
    from edgeslim.eval.detection import from_decoded
    from edgeslim.models import build_model

    out = yolo_quantized[0]  # quantize ... --decoded-output
    s = json.loads((out / "summary.json").read_text())
    d = s["decoded_output"]
    assert d["files"] == {"fp32": "model_fp32_decoded.onnx", "int8": "model_int8_decoded.onnx"}
    assert d["int8"]["map50_95"] == pytest.approx(s["onnx_int8"]["map50_95"], abs=1e-9)
    assert d["fp32"]["map50"] == pytest.approx(s["onnx_fp32"]["map50"], abs=1e-9)
    _, info = build_model("yolov3-tiny", None, input_shape=(3, SIZE, SIZE))
    x = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
    for kind in ("fp32", "int8"):
        raw = ort_eval.session(out / f"model_{kind}.onnx").run(None, {"input": x})
        (dec,) = ort_eval.session(out / f"model_{kind}_decoded.onnx").run(None, {"input": x})
        ref = info.decoder(raw)
        assert dec.shape == (2, ref.shape[1], 85)
        assert d["shape"] == ["N", ref.shape[1], 85]
        np.testing.assert_allclose(from_decoded(dec), ref, rtol=1e-5, atol=1e-3)
        m = onnx.load(str(out / f"model_{kind}_decoded.onnx"))
        assert [o.name for o in m.graph.output] == ["detections"]
        assert {"edgeslim.decoder", "edgeslim.output_layout"} <= {p.key for p in m.metadata_props}
    assert main(["quantize", "resnet20", "--random-init", "--calib-data", str(yolo_set), "--data", str(yolo_set),
                 "--decoded-output", "--out", str(tmp_path / "x")]) == 2
    assert "--task detect" in capsys.readouterr().err


def test_eval_size_takes_a_seeded_subset_of_the_detection_data(tmp_path, yolo_set):
    from edgeslim import cli
    from edgeslim.cli.common import detect_data
    from edgeslim.models import build_model

    args = cli.build_parser().parse_args(_args("quantize", "yolov3-tiny", yolo_set, tmp_path / "e", "--eval-size", "4"))
    _, info = build_model("yolov3-tiny", None, input_shape=(3, SIZE, SIZE))
    _, test, _ = detect_data(args, info)
    _, again, _ = detect_data(args, info)
    assert len(test) == 4 and test.images == again.images  # seeded: the same four images every run
