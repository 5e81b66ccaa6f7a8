"""What a newcomer needs to see (issue 21, items 8-11): the preprocessing in every output, plain help, progress bars
with a total, reports that answer the obvious questions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeslim.cli import main


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """``quantize digits_cnn --random-init`` on 40 of scikit-learn's digits: (out folder, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("zoo") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["quantize", "digits_cnn", "--random-init", "--calib-data", "sklearn-digits", "--data",
                     "sklearn-digits", "--calib-size", "16", "--eval-size", "40", "--simulate-size", "8",
                     "--out", str(out)])
    assert code == 0
    return out, buf.getvalue()


def test_preprocessing_in_console_summary_onnx_and_report(zoo_run):
    from edgeslim.models import ZOO

    out, stdout = zoo_run
    info = ZOO["digits_cnn"].info
    s = json.loads((out / "summary.json").read_text())
    p = s["preprocessing"]
    assert p["mean"] == list(info.mean) and p["std"] == list(info.std)
    assert p["size"] == [8, 8] and p["channel_order"] == "GRAY" and p["resize"] == "stretch"
    assert "pixel / 16" in p["units"]  # scikit-learn's digits are 0..16
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        meta = {m.key: m.value for m in onnx.load(str(out / name)).metadata_props}
        assert json.loads(meta["edgeslim.preprocessing"]) == p
    assert json.loads((out / "encodings.json").read_text())["preprocessing"] == p
    line = next(x for x in stdout.splitlines() if x.startswith("preprocessing:"))
    assert "8x8 GRAY" in line and f"mean ({info.mean[0]:g})" in line and f"std ({info.std[0]:g})" in line
    page = (out / "report.html").read_text()
    assert "Preprocessing" in page and f"{info.mean[0]:g}" in page and "stretch" in page


def test_quantize_report_answers_the_obvious_questions(zoo_run):
    out, _ = zoo_run
    s = json.loads((out / "summary.json").read_text())
    page = (out / "report.html").read_text()
    assert "<h1>edgeslim quantize: digits_cnn</h1>" in page
    assert "FP32 ONNX (onnxruntime)" in page and "change vs FP32 (points)" in page and "speed-up vs FP32" in page
    assert "\u00a0KiB</td>" in page and "ONNX bytes" not in page
    assert "Flips</b>: test images whose predicted class differs" in page
    # worst layers first, highlighted, weight error next to the activation error
    assert 'class="worst"' in page and "weight SQNR dB" in page
    worst = min(s["layers"], key=lambda r: r["sqnr_db"])["tensor"]
    first_row = page.split('<tr class="worst">')[1]
    assert first_row.startswith(f"<td>{worst}</td>")
    assert any("weight_sqnr_db" in r for r in s["layers"])
    # provenance: weights none (random init), data, calibration size, versions, CPU flags, command line
    prov = s["provenance"]
    assert prov["model"] == "digits_cnn" and prov["calib_size"] == 16 and "torch" in prov["versions"]
    assert "VNNI" in prov["cpu"]["int8_flags"] or "AVX2" in prov["cpu"]["int8_flags"] \
        or prov["cpu"]["int8_flags"] in ("flags unknown",)
    assert prov["command"].startswith("edgeslim quantize digits_cnn --random-init")
    assert "Provenance" in page and "onnxruntime" in page
    # random weights on 10 classes: near chance, said in the report
    assert s["chance_top1"] == 0.1 and "near chance" in page


def test_weights_sha256_in_provenance(tmp_path):
    import argparse
    import hashlib

    from edgeslim.report.provenance import provenance

    w = tmp_path / "w.pt"
    w.write_bytes(b"abc")
    p = provenance(argparse.Namespace(model="m", weights=str(w), calib_data=str(w), data="sklearn-digits",
                                      calib_size=4, seed=0), ["quantize", "m"])
    assert p["weights_sha256"] == hashlib.sha256(b"abc").hexdigest() and p["data"]["calib_data_sha256"]
    assert p["command"] == "edgeslim quantize m"


def test_near_chance_and_sizes():
    from edgeslim.report.html import near_chance, size

    assert near_chance(0.11, 0.1) and not near_chance(0.5, 0.1) and not near_chance(0.5, None)
    assert size(2048) == "2.0\u00a0KiB" and size(3 * 1024 * 1024) == "3.00\u00a0MiB"


def _subcommands() -> dict:
    import argparse

    from edgeslim.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_is_plain_and_consistent(capsys, command):
    import re

    from edgeslim.cli.args import THREADS_HELP

    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for jargon in ("seed 0", "Table 1", "Table 2", "(default: None)", "(default: False)", "G1-G5"):
        assert jargon not in flat, (command, jargon)
    assert not re.search(r"\bG[1-5]:", flat), command  # steps are named in words ("backbone swap", "factorization")
    if command is None:
        return
    parser = _subcommands()[command]
    for action in parser._actions:
        if "--threads" in action.option_strings:
            assert action.help == THREADS_HELP and action.default == 1, command
        elif action.option_strings and action.default not in (None, False) and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has a default but no help"
    if any(a.dest == "model" for a in parser._actions):
        for form in ("zoo name", "package.module:factory", "file.py:factory", ".onnx"):
            assert form in flat, (command, form)


def _capture_bars(monkeypatch, module):
    """Replace ``module.tqdm`` with one that records each bar's keyword arguments (and still iterates)."""
    from tqdm import tqdm as real

    bars = []

    def fake(*args, **kw):
        bars.append(kw)
        kw = dict(kw, disable=True)
        return real(*args, **kw)

    monkeypatch.setattr(module, "tqdm", fake)
    return bars


def test_calibration_bar_has_a_total(monkeypatch, tiny_model, tiny_calib):
    import edgeslim
    from edgeslim.algorithms import ptq

    bars = _capture_bars(monkeypatch, ptq)
    edgeslim.quantize(tiny_model, tiny_calib, edgeslim.PTQConfig(calibrator="entropy"), batch_size=16, progress=True)
    cal = [b for b in bars if str(b.get("desc", "")).startswith("calibrating")]
    assert [b["total"] for b in cal] == [4, 4]  # 64 images in batches of 16: observe pass, histogram pass
    # a generator of unknown length: the first pass has none, the histogram pass knows the count of the first
    bars.clear()
    edgeslim.quantize(tiny_model, lambda: (tiny_calib[i:i + 32] for i in range(0, 64, 32)),
                      edgeslim.PTQConfig(calibrator="entropy"), input_shape=(3, 16, 16), progress=True)
    assert [b["total"] for b in bars if str(b.get("desc", "")).startswith("calibrating")] == [None, 2]


def test_sensitivity_bar_counts_candidate_plans(monkeypatch, tiny_model, tiny_calib):
    import torch

    from edgeslim.algorithms import mixed_precision as mp
    from edgeslim.algorithms import ptq
    from edgeslim.config import MixedPlan, PTQConfig

    bars = _capture_bars(monkeypatch, mp)
    config = PTQConfig(w_bits=4, a_bits=4)
    gm = ptq.prepare(tiny_model, (3, 16, 16), config, None)
    ptq.calibrate(gm, lambda: iter([tiny_calib]))
    ptq.freeze(gm, config)
    plans = [MixedPlan((("c1", "int8"),)), MixedPlan((("c2", "int8"),)), MixedPlan((("fc", "int8"),))]
    with torch.no_grad():
        ref = [tiny_model(tiny_calib)]
    mp.evaluate_plans(gm, config, None, plans, tiny_calib, np.zeros(64, dtype=np.int64), ref, desc="sensitivity")
    assert bars and bars[-1]["total"] == 3 and bars[-1]["unit"] == "plan"


def test_detect_report_has_per_class_ap_and_confusion_matrix(yolo_quantized):
    detect_run = yolo_quantized[0]  # quantize yolov3-tiny --task detect (random weights) on six tiny images
    s = json.loads((detect_run / "summary.json").read_text())
    pc = s["onnx_int8"]["per_class"]
    assert len(pc["ap50"]) == 80 and sum(pc["num_gt"]) == 6 and pc["num_gt"][:3] == [2, 2, 2]
    assert np.asarray(s["onnx_int8"]["confusion_matrix"]).shape == (81, 81)
    assert s["preprocessing"]["resize"] == "letterbox" and s["provenance"]["model"] == "yolov3-tiny"
    page = (detect_run / "report.html").read_text()
    assert "edgeslim quantize (detect): yolov3-tiny" in page
    for needle in ("Per class", "AP@.5:.95 INT8", "person", "bicycle", "car", "Confusion matrix per class",
                   "background", "FP32 ONNX (onnxruntime)", "speed-up vs FP32", "Preprocessing", "Provenance"):
        assert needle in page, needle
    assert page.count("<img") == 1
