"""``--formats tflite,tflm`` on the label-free ``fidelity`` task and on ``--task detect``, and what is refused.

The ``.tflite`` each run writes is read back (``edgeslim.import_tflite``) and run by the integer engine in its
``tflite`` mode: its outputs equal LiteRT's reference kernels and TFLM on the file exactly (LiteRT's reference
FULLY_CONNECTED aside: 1 step at double-rounding ties, see ``test_tflite._assert_exact``). The summary's own
``engine_vs_runtimes`` (the prepared graph against the same runtimes) says the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("tflite")
pytest.importorskip("tflite_micro.python.tflite_micro.runtime")

import families  # noqa: E402
from helpers import detect_args as _args  # noqa: E402

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


def test_fidelity_float_islands_are_float_prelu(tmp_path, capsys):
    """A model whose PReLUs stay float islands (landmarks): each is DEQUANTIZE -> float PRELU -> QUANTIZE in the file,
    named on the console line and in ``tflite.float_nodes``; engine (its islands in numpy float32) vs LiteRT
    reference / TFLM within 1 output step (a float value at a rounding boundary of the QUANTIZE after an island may
    round the other way; 0 measured)."""
    src = families.export("landmarks", tmp_path / "lm.onnx")  # PReLU: a float island
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 48, 48)).astype(np.float32))
    assert main(["quantize", str(src), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--formats", "tflite", "--out", str(tmp_path / "run")]) == 0
    assert "(PReLU)" in capsys.readouterr().out.split("model_int8.tflite:")[1].splitlines()[0]
    t = json.loads((tmp_path / "run" / "summary.json").read_text())["tflite"]
    assert len(t["float_nodes"]) == t["ops"]["PRELU"] == 4 and t["float_ops"] == ["PRELU"] * 4
    for key in ("litert_reference", "tflm"):
        for per in t["engine_vs_runtimes"][key].values():
            assert per["max_diff_steps"] <= 1.0


GROUPED = '''
import torch
from torch import nn

def grouped():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
'''


@pytest.mark.parametrize("extra,needle", [([], "is grouped (2 groups of 4 channels)"),
                                          (["--groups", "backbone=fp16"], "not FP16")])
def test_grouped_conv_and_fp16_plans_are_refused_before_any_work(tmp_path, capsys, yolo_set, extra, needle):
    if extra:  # a plan leaving FP16 layers (TFLite has no FP16 activations): refused before calibration
        argv = _args("quantize", "yolov3-tiny", yolo_set, tmp_path / "run", "--formats", "tflite", *extra)
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


@pytest.mark.slow
def test_fp32_groups_are_written_as_float_ops(tmp_path, capsys, yolo_set):
    """``--groups head=fp32 --formats tflite``: the FP32 head convolutions are float32 CONV_2D between DEQUANTIZE /
    QUANTIZE, named in ``tflite.float_nodes``; the runtimes agree with the engine (its float islands in numpy) within
    1 step of the outputs (a float value near a rounding boundary of the final QUANTIZE / the float outputs)."""
    out = tmp_path / "d"
    assert main(_args("quantize", "yolov3-tiny", yolo_set, out, "--formats", "tflite", "--groups", "head=fp32")) == 0
    t = json.loads((out / "summary.json").read_text())["tflite"]
    assert sum(n.endswith("(Conv)") for n in t["float_nodes"]) == 2 and "CONV_2D" in t["float_ops"]
    assert 0.0 <= t["map50"] <= 1.0
    for key in ("litert_reference", "tflm"):
        for per in t["engine_vs_runtimes"][key].values():
            assert per["max_diff_steps"] <= 1.0


def test_detect_task_scores_the_tflite_in_litert(tmp_path, capsys, yolo_quantized):
    import shutil

    run, printed = yolo_quantized  # quantize ... --formats tflite
    assert "model_int8.tflite: mAP@.5 " in printed
    out = tmp_path / "d"
    shutil.copytree(run, out)  # edgeslim export below rewrites the run's files: the shared run stays as written
    s = json.loads((out / "summary.json").read_text())
    t = s["tflite"]
    for metric in ("map50", "map50_95", "precision", "recall", "f1"):
        assert 0.0 <= t[metric] <= 1.0
    assert t["ops"]["CONV_2D"] == 13 and not t["float_ops"] and "mcu" not in s
    _exact(t["engine_vs_runtimes"])
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    _file_runs_as_engine((out / "model_int8.tflite").read_bytes(), x)
    # edgeslim export from the detect run: its ONNX leaky ReLUs (DQ -> LeakyRelu -> Q, read back as float islands)
    # become int8 tables (what onnxruntime computes) instead of LEAKY_RELU, so it is another model: mAP not carried
    assert main(["export", str(out), "--format", "tflite"]) == 0
    again = json.loads((out / "summary.json").read_text())["tflite"]
    assert again["logits_range"].startswith("recorded") and again["ops"]["CONV_2D"] == 13
    assert "LEAKY_RELU" not in again["ops"] and again["ops"]["GATHER"] == t["ops"]["LEAKY_RELU"]
    assert again["content_sha256"] != t["content_sha256"] and "map50" not in again
    _exact(again["engine_vs_runtimes"])
    _file_runs_as_engine((out / "model_int8.tflite").read_bytes(), x)


# ----------------------------------------------------------------------------- edgeslim export RUN_DIR



def test_export_from_a_run_rebuilds_the_file_quantize_wrote(tmp_path, capsys, tiny_job):
    """The run's model_int8.onnx read back and written again: the same model (tensor names aside: ONNX renamed them),
    output-equal in LiteRT, so the summary keeps quantize's LiteRT top-1; TFLM files and arena rewritten."""
    from edgeslim.export.tflm import litert_runner

    run = tmp_path / "run"
    assert main([*tiny_job, "--formats", "tflm"]) == 0
    wrote = (run / "model_int8.tflite").read_bytes()
    before = json.loads((run / "summary.json").read_text())
    for f in ("model_int8.tflite", "model_data.cc", "model_data.h", "op_resolver.txt"):
        (run / f).unlink()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "tflm"]) == 0
    assert "model_int8.tflite: top-1" in capsys.readouterr().out
    fb = (run / "model_int8.tflite").read_bytes()
    after = json.loads((run / "summary.json").read_text())
    t = after["tflite"]
    assert t["content_sha256"] == before["tflite"]["content_sha256"] and t["top1"] == before["tflite"]["top1"]
    assert t["logits_range"].startswith("recorded") and t["ops"] == before["tflite"]["ops"]
    assert after["mcu"]["flash_bytes"] == len(fb) and after["mcu"]["ram_bytes"] == before["mcu"]["ram_bytes"]
    assert (run / "model_data.cc").read_text().count("0x") == len(fb)
    _exact(t["engine_vs_runtimes"])
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    for reference in (True, False):
        for a, b in zip(litert_runner(wrote, reference)(x), litert_runner(fb, reference)(x)):
            assert np.array_equal(a, b)
    # again over the file: the same bytes, the score kept; a tflite-only export drops the TFLM build it replaces
    assert main(["export", str(run), "--format", "tflite"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert (run / "model_int8.tflite").read_bytes() == fb and s["tflite"]["top1"] == before["tflite"]["top1"]
    assert "mcu" not in s and not (run / "model_data.cc").exists()


def test_export_from_an_onnx_only_run_bounds_the_logits(tmp_path, capsys, tiny_job):
    run = tmp_path / "run"
    assert main(tiny_job) == 0
    assert main(["export", str(run), "--format", "tflite"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["tflite"]["logits_range"].startswith("bounded") and "mcu" not in s
    _exact(s["tflite"]["engine_vs_runtimes"])
    _file_runs_as_engine((run / "model_int8.tflite").read_bytes(),
                         np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32))


TINY_SILU = """
import torch
from torch import nn

def tiny_silu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))
"""


def test_export_reads_back_edgeslims_gated_silu(tmp_path, capsys, tiny_job):
    """SiLU is written to ONNX as DQ -> Sigmoid -> Q -> DQ -> Mul -> Identity -> Q (QLinearSigmoid + QLinearMul in
    onnxruntime); export reads it back as one gated silu per SiLU: the very file quantize --formats tflite wrote
    (LOGISTIC + MUL by default; equal content digest, its LiteRT score kept), engine == LiteRT reference == TFLM;
    with activations="table" one GATHER table per SiLU, exact too."""
    (tmp_path / "usermodels.py").write_text(TINY_SILU)
    argv = [a.replace(":tiny", ":tiny_silu") for a in tiny_job]
    run = tmp_path / "run"
    assert main([*argv, "--formats", "tflite"]) == 0
    before = json.loads((run / "summary.json").read_text())["tflite"]
    assert before["ops"]["LOGISTIC"] == 2 and not before["lut_as_gather"]
    assert main(["export", str(run), "--format", "tflite"]) == 0
    t = json.loads((run / "summary.json").read_text())["tflite"]
    assert t["content_sha256"] == before["content_sha256"] and t["top1"] == before["top1"]
    assert t["ops"]["LOGISTIC"] == 2 and t["ops"]["MUL"] == 2 and not t["float_ops"]
    _exact(t["engine_vs_runtimes"])
    _file_runs_as_engine((run / "model_int8.tflite").read_bytes(),
                         np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32))
    # activations="table": the read-back silu as one int8 table each
    import onnx

    from edgeslim.export.tflite import prepare_graph, to_tflite
    from edgeslim.export.tflm import agreement
    from edgeslim.io.onnx_qdq_import import import_qdq
    from edgeslim.jobs.export import without_identities

    tg = prepare_graph(import_qdq(without_identities(onnx.load(str(run / "model_int8.onnx")))), activations="table")
    fb, info = to_tflite(tg)
    assert [x.split(" ")[1] for x in info["lut_as_gather"]] == ["(silu)", "(silu)"] and "LOGISTIC" not in info["ops"]
    _exact(agreement(tg, fb, np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)))

def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeslim: error: ") and "is not a finished quantize run" in err[0]
    assert main(["export", str(tmp_path / "nowhere"), "--format", "tflite"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # a run whose INT8 ONNX the importer cannot read back (landmarks' float head reshape): one line
    src = families.export("landmarks", tmp_path / "lm.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 48, 48)).astype(np.float32))
    assert main(["quantize", str(src), "--calib-data", str(tmp_path / "x.npz"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path / "lm")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "lm"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeslim: error: ") and "Traceback" not in err[0]
    assert "cannot be read back" in err[0] or "FloatIsland" in err[0]
    assert not (tmp_path / "lm" / "model_int8.tflite").exists()
    monkeypatch.setitem(sys.modules, "tflite_micro", None)
    assert main(["export", str(tmp_path / "lm"), "--format", "tflm"]) == 2
    assert capsys.readouterr().err.strip().endswith("needs the tflite extra: pip install -e '.[tflite]'")


# ----------------------------------------------------------------------------- --formats on mixed / qat / plan

def _tiny_many(tmp_path, n=60):
    """tiny_job's classifier with 2 x ``n`` images (mixed / plan hold out 50 + 50)."""
    from PIL import Image

    from helpers import TINY

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "big" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "big" / cls / f"{i}.png")
    (tmp_path / "usermodels.py").write_text(TINY)
    return [f"{tmp_path / 'usermodels.py'}:tiny", "--input-shape", "3,8,8", "--data", str(tmp_path / "big"),
            "--calib-size", "8"]


@pytest.mark.parametrize("argv,needle", [
    (["mixed", "--calib-data", "{big}", "--max-drop", "1", "--high", "fp32"], "--high fp32 leaves layers"),
    (["plan", "--train-data", "{big}", "--max-drop", "1", "--target", "fp16-gpu"], "the fp16-gpu target ends in FP16"),
    (["qat", "--train-data", "{big}", "--a-bits", "16"], "needs --w-bits / --a-bits of 8 or fewer")])
def test_final_model_formats_refused_before_any_work(tmp_path, capsys, argv, needle):
    common = _tiny_many(tmp_path, n=1)
    argv = [a.replace("{big}", str(tmp_path / "big")) for a in argv]
    assert main([argv[0], *common, *argv[1:], "--formats", "tflite", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeslim: error: ") and needle in err[-1], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv,model_file", [
    (["mixed", "--calib-data", "{big}", "--w-bits", "4", "--high", "int8", "--max-drop", "100"], "model_mixed.onnx"),
    (["qat", "--train-data", "{big}", "--epochs", "1", "--train-size", "16"], "model_int8.onnx"),
    (["plan", "--train-data", "{big}", "--max-drop", "100", "--max-size-kb", "1.5", "--target", "mcu-int8"],
     "model_final.onnx")])
def test_final_model_is_written_as_tflite(tmp_path, capsys, argv, model_file):
    """mixed / qat / plan --formats tflm: the run's final INT8 model as .tflite + TFLM build; engine == LiteRT / TFLM."""
    common = _tiny_many(tmp_path)
    argv = [a.replace("{big}", str(tmp_path / "big")) for a in argv]
    out = tmp_path / "run"
    assert main([argv[0], *common, *argv[1:], "--formats", "tflm", "--out", str(out)]) == 0
    assert "model_int8.tflite: " in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["tflite"]["exported_from"].startswith(model_file) and s["tflite"]["ops"]["CONV_2D"] == 2
    assert s["tflite"]["logits_range"].startswith("observed on 120 calibration inputs")  # --calib-data / --train-data
    assert s["mcu"]["ram_bytes"] > 0 and (out / "model_data.cc").exists()
    _exact(s["tflite"]["engine_vs_runtimes"])
    if argv[0] != "qat":  # import_tflite cannot yet read QAT's MINIMUM clamp after a two-consumer op back
        _file_runs_as_engine((out / "model_int8.tflite").read_bytes(),
                             np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32))


def test_max_ram_kb_needs_an_mcu_target(tmp_path, capsys):
    common = _tiny_many(tmp_path, n=1)
    assert main(["plan", *common, "--train-data", str(tmp_path / "big"), "--max-ram-kb", "8",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("use --target mcu-int8 or mcu-w4 (not cpu-int8)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_plan_max_ram_kb_judges_every_row_by_the_tflm_arena(tmp_path, capsys):
    """plan --max-ram-kb on mcu-int8: FP32 has no int8 arena (unmet), W8A8's arena is measured and meets 8 KiB; the
    final .tflite's arena is the one the plan judged. A budget below every arena ends NOT met."""
    common = _tiny_many(tmp_path)
    base = ["plan", *common, "--train-data", str(tmp_path / "big"), "--target", "mcu-int8"]
    assert main([*base, "--max-ram-kb", "8", "--formats", "tflm", "--out", str(tmp_path / "ok")]) == 0
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    rams = [r["ram_bytes"] for r in s["steps"]]
    assert rams[0] is None and s["met"] and s["mcu"]["ram_bytes"] == rams[-1] <= 8 * 1024
    assert main([*base, "--max-ram-kb", "0.5", "--out", str(tmp_path / "tight")]) == 0
    s = json.loads((tmp_path / "tight" / "summary.json").read_text())
    assert not s["met"] and "TFLM arena" in json.dumps(s)


FASTESTDET_ONNX = Path(__file__).resolve().parents[3] / "shared" / "models" / "fastestdet" / "FastestDet.onnx"
COCO128 = FASTESTDET_ONNX.parents[2] / "data" / "coco128.zip"


@pytest.mark.slow
@pytest.mark.skipif(not (FASTESTDET_ONNX.exists() and COCO128.exists()), reason="../shared absent")
def test_published_fastestdet_onnx_exports_with_its_softmax_in_float(tmp_path, capsys):
    """The published FastestDet.onnx (channel shuffles as batch-folding reshapes + scalar Gathers, a softmax over a
    transposed axis): int8 GATHERs, the softmax a float SOFTMAX between DEQUANTIZE / QUANTIZE; engine == LiteRT
    reference == TFLM on the head output (the softmax's float value requantized: 1 step allowed, 0 measured)."""
    out = tmp_path / "fd"
    assert main(["quantize", str(FASTESTDET_ONNX), "--task", "detect", "--decoder", "fastestdet-activated",
                 "--channel-order", "BGR", "--calib-data", str(COCO128), "--calib-split", "train2017",
                 "--data", str(COCO128), "--data-split", "val2017", "--calib-size", "4", "--eval-size", "2",
                 "--formats", "tflite", "--out", str(out)]) == 0
    assert "float ops: softmax" in capsys.readouterr().out
    t = json.loads((out / "summary.json").read_text())["tflite"]
    assert [n.split(" ")[1] for n in t["float_nodes"]] == ["(Softmax)"] and "SOFTMAX" in t["float_ops"]
    assert t["ops"]["GATHER"] >= 16 and t["ops"]["CONV_2D"] + t["ops"]["DEPTHWISE_CONV_2D"] == 70
    for key in ("litert_reference", "tflm"):
        for per in t["engine_vs_runtimes"][key].values():
            assert per["max_diff_steps"] <= 1.0
