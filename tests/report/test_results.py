"""Typed results (``report.results``) against the ``summary.json`` files real CLI runs write.

Oracle: the file itself. ``to_summary(from_summary(s))`` must be ``s`` (same keys, same order, same values), the typed
fields must be the file's values under their keys, and the printers must print from the file what the run printed.
A summary missing what the printers read (another command's, an older one, a hand-edited one) is one
``EdgeslimError`` naming the file and the key. The fast runs are tiny (a user model on 8 x 8 inputs); detect, the
QAT classify / detect runs and the ResNet-20 lightweighting jobs (``plan``, ``prune``, ``factorize``) are ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeslim.cli import main
from edgeslim.errors import EdgeslimError
from edgeslim.report.results import (ClassifyResult, DetectResult, FidelityResult, LightenResult, MixedResult,
                                     PlanResult, QATResult, QuantizeResult, SensitivityResult, read_result)
from edgeslim.tasks import TASKS

from helpers import USER_MODEL  # noqa: E402  (the tiny user model file the CLI tests write)



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("results")
    (root / "usermodels.py").write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    images = root / "images"
    for cls in ("cats", "dogs"):
        (images / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    x = rng.integers(0, 255, (240, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "d.npz", x=x, y=(x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype(np.int64))
    np.savez(root / "x.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    np.savez(root / "x2.npz", x=rng.standard_normal((240, 3, 8, 8)).astype(np.float32))
    return {"root": root, "model": root / "usermodels.py", "images": images, "npz": root / "d.npz",
            "arrays": root / "x.npz", "arrays240": root / "x2.npz"}


def _argv(name: str, d: dict[str, Path]) -> list[str]:
    tiny = [f"{d['model']}:tiny", "--input-shape", "3,8,8"]
    small = ["--calib-size", "64", "--holdout-size", "100"]
    return {
        "quantize": ["quantize", *tiny, "--calib-data", d["images"], "--data", d["images"], "--calib-size", "8"],
        "analyze_fidelity": ["analyze", *tiny, "--calib-data", d["arrays"], "--data", d["arrays"]],
        "sensitivity": ["sensitivity", *tiny, "--calib-data", d["npz"], "--data", d["npz"], *small, "--w-bits", "4",
                        "--a-bits", "4"],
        "mixed": ["mixed", *tiny, "--calib-data", d["npz"], "--data", d["npz"], *small, "--w-bits", "2", "--a-bits",
                  "2", "--max-drop", "0.0"],
        "mixed_fidelity": ["mixed", *tiny, "--calib-data", d["arrays240"], "--data", d["arrays240"], *small,
                           "--w-bits", "4", "--a-bits", "4", "--min-sqnr", "25"],
        "qat_fidelity": ["qat", *tiny, "--train-data", d["arrays240"], "--data", d["arrays"], "--max-steps", "2",
                         "--batch-size", "16", "--calib-size", "16"],
    }[name]


def _run(argv: list, out: Path) -> str:
    """Run the CLI; return what it printed on stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(a) for a in argv] + ["--out", str(out)]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def runs(data) -> dict[str, tuple[Path, str]]:
    """The tiny runs, once per module: name -> (out folder, stdout)."""
    out = {}
    for name in ("quantize", "analyze_fidelity", "mixed", "sensitivity"):
        folder = data["root"] / name
        out[name] = folder, _run(_argv(name, data), folder)
    return out


TYPES = {"quantize": ClassifyResult, "analyze_fidelity": FidelityResult, "mixed": MixedResult,
         "sensitivity": SensitivityResult}


def _printed(r) -> str:
    """What the CLI's printer prints for the typed result ``r``."""
    from edgeslim.cli import lighten, mixed, plan, sensitivity
    from edgeslim.cli.tasks import CLI_TASKS

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if isinstance(r, QuantizeResult):
            CLI_TASKS[r.task].print_quantize(r, Path("OUT"))
        elif isinstance(r, MixedResult):
            mixed.print_mixed_summary(r, Path("OUT"))
        elif isinstance(r, SensitivityResult):
            sensitivity.print_sensitivity(r, TASKS[r.task].metric_key, Path("OUT"))
        elif isinstance(r, QATResult):
            CLI_TASKS[r.task].print_qat(r, "OUT")
        elif isinstance(r, PlanResult):
            plan.print_plan(r)
            print(r.statement)
        else:
            lighten.print_pair(r, *(("dense", "pruned") if r.pruned is not None else ("original", "factorized")))
    return buf.getvalue()


def _check_round_trip(folder: Path, stdout: str, cls) -> None:
    text = (folder / "summary.json").read_text()
    s = json.loads(text)
    r = read_result(folder)
    assert type(r) is cls
    back = r.to_summary()
    assert back == s and json.dumps(back, indent=2) == text  # the file, byte for byte (key order included)
    assert cls.from_summary(back) == r and cls.from_summary(json.loads(json.dumps(back))) == r
    printed = _printed(r).replace("OUT", str(folder))
    assert printed.strip() and printed.strip() in stdout  # the run printed this from the same content


@pytest.mark.parametrize("name", list(TYPES))
def test_round_trip_of_real_summaries(runs, name):
    folder, stdout = runs[name]
    _check_round_trip(folder, stdout, TYPES[name])


def test_typed_fields_are_the_files_values(runs):
    s = json.loads((runs["quantize"][0] / "summary.json").read_text())
    r = read_result(runs["quantize"][0])
    assert (r.onnx_int8.top1, r.onnx_int8.flips_vs_fp32, r.onnx_int8.integer_convs) == \
        (s["onnx_int8"]["top1"], s["onnx_int8"]["flips_vs_fp32"], s["onnx_int8"]["integer_convs"])
    assert (r.size_bytes.fp32, r.size_bytes.int8) == (s["size_bytes"]["fp32"], s["size_bytes"]["int8"])
    assert r.latency_ms.int8_over_fp32 == s["latency_ms"]["int8_over_fp32"] and r.command == "quantize"
    assert r.layers == s["layers"] and r.provenance == s["provenance"] and r.extra == {}
    f = read_result(runs["analyze_fidelity"][0])
    sf = json.loads((runs["analyze_fidelity"][0] / "summary.json").read_text())
    assert f.command == "analyze" and f.onnx_int8.fidelity_vs_fp32 == sf["onnx_int8"]["fidelity_vs_fp32"]
    assert f.latency_ms.batch == sf["latency_ms"]["batch"] and f.overflow == sf["overflow"]
    m = read_result(runs["mixed"][0])
    sm = json.loads((runs["mixed"][0] / "summary.json").read_text())
    assert m.mixed.batch1_ms == sm["mixed"]["latency_ms"]["batch1"] and m.fp32.batch1_ms == sm["fp32"]["latency_ms"]
    assert m.mixed.high_precision_layers == sm["mixed"]["high_precision_layers"] and m.met is sm["met"]


def test_printers_take_the_summary_dict_too(runs):
    from edgeslim.cli.tasks.classify import print_quantize as print_summary

    folder = runs["quantize"][0]
    s = json.loads((folder / "summary.json").read_text())
    typed, plain = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(typed):
        print_summary(ClassifyResult.from_summary(s), folder)
    with contextlib.redirect_stdout(plain):
        print_summary(s, folder)
    assert typed.getvalue() == plain.getvalue()


@pytest.mark.parametrize("name, drop, where", [
    ("quantize", ("latency_ms",), "latency_ms"),
    ("quantize", ("onnx_int8", "top1"), "onnx_int8.top1"),
    ("mixed", ("mixed", "size_bytes"), "mixed.size_bytes"),
    ("analyze_fidelity", ("onnx_int8", "fidelity_vs_fp32"), "onnx_int8.fidelity_vs_fp32"),
])
def test_a_summary_missing_a_key_is_one_clear_error(runs, tmp_path, name, drop, where):
    s = json.loads((runs[name][0] / "summary.json").read_text())
    part = s
    for k in drop[:-1]:
        part = part[k]
    del part[drop[-1]]
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps(s))
    with pytest.raises(EdgeslimError) as e:
        read_result(tmp_path)
    assert str(bad) in str(e.value) and repr(where) in str(e.value)
    from edgeslim.cli import mixed
    from edgeslim.cli.tasks import CLI_TASKS

    printer = {"quantize": lambda: CLI_TASKS["classify"].print_quantize(s, tmp_path), "mixed": lambda: mixed.print_mixed_summary(
        s, tmp_path), "analyze_fidelity": lambda: CLI_TASKS["fidelity"].print_quantize(s, tmp_path)}[name]
    with pytest.raises(EdgeslimError, match=repr(where)):  # a printer handed the dict says the same, no KeyError
        printer()


def test_other_files_are_refused_with_their_name(runs, tmp_path):
    s = json.loads((runs["quantize"][0] / "summary.json").read_text())
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "summary.json").write_text(json.dumps({**s, "task": "segment"}))
    with pytest.raises(EdgeslimError, match="'task' of classify, detect or fidelity"):
        read_result(tmp_path / "task")
    with pytest.raises(EdgeslimError, match="does not exist"):
        read_result(tmp_path / "nowhere")
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(EdgeslimError, match="broken.json is not a readable JSON file"):
        read_result(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text('{"model": "m"}')
    with pytest.raises(EdgeslimError, match="other.json is not the summary.json of an edgeslim"):
        read_result(tmp_path / "other.json")
    with pytest.raises(EdgeslimError, match="'onnx_int8' is not a JSON object"):
        ClassifyResult.from_summary({**s, "onnx_int8": [1, 2]}, "x.json")
    with pytest.raises(EdgeslimError, match="x.json has no 'fp32.score': it is not the summary.json of an edgeslim mixed"):
        MixedResult.from_summary({**s, "metric": {}, "budget": {}}, "x.json")  # a quantize summary is not a mixed one


# ----------------------------------------------------------------------------- slow: detect, QAT, ResNet-20 jobs

@pytest.mark.slow
@pytest.mark.parametrize("verb, cls", [("quantize", DetectResult), ("qat", QATResult)])
def test_round_trip_detect(tmp_path, yolo_set, verb, cls):
    det = ["yolov3-tiny", "--random-init", "--input-shape", "3,64,64", "--task", "detect", "--data", yolo_set,
           "--data-split", "val", "--calib-size", "4"]
    extra = (["--calib-data", yolo_set, "--calib-split", "train"] if verb == "quantize" else
             ["--train-data", yolo_set, "--train-split", "train", "--max-steps", "2", "--batch-size", "2"])
    out = tmp_path / "run"
    _check_round_trip(out, _run([verb, *det, *extra], out), cls)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed_fidelity", "qat_fidelity", "qat_classify"])
def test_round_trip_tiny_slow(tmp_path, data, name):
    argv = {"qat_classify": ["qat", f"{data['model']}:tiny", "--input-shape", "3,8,8", "--train-data", data["npz"],
                             "--data", data["npz"], "--max-steps", "5", "--batch-size", "16", "--calib-size", "16"]
            }.get(name) or _argv(name, data)
    out = tmp_path / "run"
    _check_round_trip(out, _run(argv, out), MixedResult if name.startswith("mixed") else QATResult)
    r, s = read_result(out), json.loads((out / "summary.json").read_text())
    if name == "qat_fidelity":
        assert r.file is r.onnx_int8 and r.file.headline_sqnr_db == s["onnx_int8"]["headline_sqnr_db"]
        assert r.qat.sqnr_db == s["qat"]["sqnr_db"] and r.fp32 is None and "fp32" not in r.to_summary()
    if name == "qat_classify":
        assert r.file is r.onnx and (r.file.top1, r.qat.top1) == (s["onnx"]["top1"], s["qat"]["top1"])
        del s["qat"]
        with pytest.raises(EdgeslimError, match="x.json has no 'qat'"):
            QATResult.from_summary(s, "x.json")


@pytest.mark.slow
@pytest.mark.parametrize("verb, extra, cls", [
    ("plan", ["--max-size-kb", str(4 * 269_722 / 3 / 1024), "--steps", "G1,G3,G4", "--calib-size", "16"], PlanResult),
    ("prune", ["--method", "magnitude"], LightenResult),
    ("factorize", ["--share", "0.3"], LightenResult),
])
def test_round_trip_lightweighting(tmp_path, three_colours, verb, extra, cls):
    argv = [verb, "resnet20", "--random-init", "--train-data", three_colours, "--data", three_colours, "--epochs", "1",
            "--batch-size", "8", *extra]
    out = tmp_path / "run"
    _check_round_trip(out, _run(argv, out), cls)
