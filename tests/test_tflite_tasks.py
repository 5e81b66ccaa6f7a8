"""``--formats tflite,tflm`` on the label-free ``fidelity`` task and on ``--task detect``, and what is refused.

The ``.tflite`` each run writes is read back (``edgeslim.import_tflite``) and run by the integer engine in its
``tflite`` mode: its outputs equal LiteRT's reference kernels and TFLM on the file exactly (LiteRT's reference
FULLY_CONNECTED aside: 1 step at double-rounding ties, see ``test_tflite._assert_exact``). The summary's own
``engine_vs_runtimes`` (the prepared graph against the same runtimes) says the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("tflite")
pytest.importorskip("tflite_micro.python.tflite_micro.runtime")

import families  # noqa: E402
from test_jobs_detect import _args, yolo_set  # noqa: E402,F401  (the tiny YOLO data set fixture)

from edgeslim.cli import main  # noqa: E402


def _file_runs_as_engine(fb: bytes, x: np.ndarray) -> None:
    """Engine (tflite mode) on the file read back == LiteRT reference == TFLM, per output, on ``x``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime as tflm

    import edgeslim
    from edgeslim.engine.run import run

    g = edgeslim.import_tflite(fb)
    want = run(g, x, requant="tflite")
    ref = Interpreter(model_content=fb, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    micro = tflm.Interpreter.from_bytes(fb, arena_size=max(1 << 20, 10 * len(fb)))
    fc = any(n.op == "QGemm" for n in g.nodes)
    for i in range(len(x)):
        xi = x[i:i + 1].transpose(0, 2, 3, 1)
        ref.set_tensor(ref.get_input_details()[0]["index"], xi)
        ref.invoke()
        micro.set_input(xi, 0)
        micro.invoke()
        for k, name in enumerate(g.output_names):
            w = want[name][i:i + 1]
            w = w.transpose(0, 2, 3, 1) if w.ndim == 4 else w
            got_ref = ref.get_tensor(ref.get_output_details()[k]["index"])
            assert np.array_equal(micro.get_output(k), w), name
            if not fc:
                assert np.array_equal(got_ref, w), name


def _exact(agreement: dict) -> None:
    for per in agreement["tflm"].values():
        assert per["identical_share"] == 1.0
    for per in agreement["litert_reference"].values():
        assert per["max_diff_steps"] <= 1.0


def test_fidelity_task_writes_a_tflite_scored_against_fp32(tmp_path, capsys):
    src = families.export("anchor_free", tmp_path / "af.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 3, 64, 64)).astype(np.float32))
    x = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    out = tmp_path / "run"
    assert main(["quantize", str(src), "--calib-data", str(tmp_path / "calib.npz"), "--data", str(tmp_path / "eval.npz"),
                 "--formats", "tflite,tflm", "--out", str(out)]) == 0
    assert "model_int8.tflite: worst SQNR vs FP32" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    t = s["tflite"]
    assert list(t["fidelity_vs_fp32"]) == list(s["onnx_int8"]["fidelity_vs_fp32"]) == s["outputs"]
    assert t["inputs"] == 4 and not t["float_ops"] and t["ops"]["CONV_2D"] == 5
    # as close to FP32 as the INT8 ONNX file (the same integer model; XNNPACK rounds a few codes differently)
    assert abs(t["fidelity_vs_fp32"]["out"]["sqnr_db"] - s["onnx_int8"]["fidelity_vs_fp32"]["out"]["sqnr_db"]) < 3
    _exact(t["engine_vs_runtimes"])
    assert 0 < s["mcu"]["ram_bytes"] and s["mcu"]["flash_bytes"] == t["size_bytes"]
    assert {"model_data.h", "model_data.cc", "op_resolver.txt", "model_int8.tflite"} <= {p.name for p in out.iterdir()}
    _file_runs_as_engine((out / "model_int8.tflite").read_bytes(), x[:2])


def test_fidelity_float_island_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = families.export("landmarks", tmp_path / "lm.onnx")  # PReLU: a float island
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 48, 48)).astype(np.float32))
    assert main(["quantize", str(src), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--formats", "tflite", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeslim: error: op FloatIsland") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "summary.json").exists()


GROUPED = '''
import torch
from torch import nn

def grouped():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
'''


@pytest.mark.parametrize("extra,needle", [([], "is grouped (2 groups of 4 channels)"),
                                          (["--groups", "backbone=fp32"], "")])
def test_grouped_conv_and_float_plans_are_refused_before_any_work(tmp_path, capsys, yolo_set, extra, needle):
    if extra:  # a plan leaving float layers: refused before calibration
        argv = _args("quantize", "yolov3-tiny", yolo_set, tmp_path / "run", "--formats", "tflite", *extra)
        needle = "the TFLite export is all-int8"
    else:
        (tmp_path / "m.py").write_text(GROUPED)
        np.savez(tmp_path / "x.npz", x=np.zeros((2, 3, 8, 8), np.float32))
        argv = ["quantize", f"{tmp_path / 'm.py'}:grouped", "--input-shape", "3,8,8", "--calib-data",
                str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"), "--formats", "tflite",
                "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeslim: error: --formats tflite") and needle in err[-1]
    assert not (tmp_path / "run").exists()


def test_detect_task_scores_the_tflite_in_litert(tmp_path, capsys, yolo_set):
    out = tmp_path / "d"
    assert main(_args("quantize", "yolov3-tiny", yolo_set, out, "--formats", "tflite")) == 0
    assert "model_int8.tflite: mAP@.5 " in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    t = s["tflite"]
    for metric in ("map50", "map50_95", "precision", "recall", "f1"):
        assert 0.0 <= t[metric] <= 1.0
    assert t["ops"]["CONV_2D"] == 13 and not t["float_ops"] and "mcu" not in s
    _exact(t["engine_vs_runtimes"])
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    _file_runs_as_engine((out / "model_int8.tflite").read_bytes(), x)
