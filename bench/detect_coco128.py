"""Detectors on COCO128 (calibrate on train2017, evaluate on val2017): seed 002's Tables 1 and 2, seed 000's
per-layer experiment and overflow statistics.

Sections of BENCHMARKS.md:
* ``detect-ptq``: yolov5n, FastestDet from its state_dict and FastestDet from its published ONNX file: FP32 vs
  INT8 PTQ (per-channel weights) mAP@0.5 and @0.5:0.95, confusion-matrix P / R / F1, size, onnxruntime latency, FPS;
* ``detect-groups``: every backbone / neck / head FP32 / INT8 combination (yolov5n, FastestDet);
* ``detect-layers``: yolov5n with one layer kept FP32 and the rest INT8 (seed 000's Table 3 form); ``layers``
  adds this sweep to yolov5n's ``sens-`` run, so ask for it the first time that run is made;
* ``detect-overflow``: yolov5n's INT8 products and INT16 sums out of range, per layer (seed 000's Tables 1, 2).

Each run writes its job folder under ``--work`` and is skipped when its ``summary.json`` exists; ``--report``
writes the sections from whatever has finished. Runs use one thread (the machine has 2 cores).

    python -m bench.detect_coco128 --runs ptq,groups,layers,overflow
    python -m bench.detect_coco128 --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench._report import COMMIT, ROOT, table, write_section
from edgeslim import api
from edgeslim.algorithms import ptq
from edgeslim.config import AnalyzeOptions, DetectOptions, MeasureOptions, PTQConfig, QATConfig
from edgeslim.data.detection import open_detection
from edgeslim.jobs.mixed import run_sensitivity
from edgeslim.jobs.quantize import run_quantize
from edgeslim.tasks import Detect
from edgeslim.jobs.qat import run_qat
from edgeslim.models import as_detector, build_model, model_groups
from edgeslim.quant.precision import LayerPrecision

CALIB = 128  # all of train2017
# QAT (yolov5n): W8A8 LSQ from the PTQ model, trained on the train2017 images to match the FP32 model's heads
QAT = QATConfig(w_bits=8, a_bits=8, method="lsq", epochs=4, lr=5e-4, batch_size=8)
QAT_TEXT = (f"QAT rows: `qat --task detect`, W8A8 LSQ starting from the PTQ model, {QAT.epochs} epochs of the "
            f"{CALIB} train2017 images (batch {QAT.batch_size}, SGD lr {QAT.lr:g} cosine, crop + flip), loss: "
            "MSE between sigmoid(raw head outputs) of the student and of the FP32 model (no labels, no detection "
            "loss); the val2017 images are only scored, the reported model is the last epoch's.")


def models(shared: Path) -> dict:
    fd = shared / "models/fastestdet"
    return {
        "yolov5n": lambda: build_model("yolov5n", shared / "models/yolov5n.pt"),
        "fastestdet": lambda: build_model("fastestdet", fd / "fastestdet_coco_ap05-0.2532.pth"),
        "fastestdet-onnx": lambda: _onnx_fastestdet(fd / "FastestDet.onnx"),
    }


def _onnx_fastestdet(path: Path):
    model, info = build_model(str(path))
    from edgeslim.models.yolo import COCO_NAMES

    return model, as_detector(info, "fastestdet-activated", COCO_NAMES, "BGR")


def _data(shared: Path, imgsz: int):
    z = shared / "data/coco128.zip"
    return open_detection(z, "train2017", imgsz=imgsz), open_detection(z, "val2017", imgsz=imgsz)


def _done(work: Path, key: str) -> bool:
    return (work / key / "summary.json").exists()


def _stamp(work: Path, key: str, t0: float) -> None:
    p = work / key / "summary.json"
    s = json.loads(p.read_text())
    s.update(wall_s=time.perf_counter() - t0, code_commit=COMMIT)
    p.write_text(json.dumps(s, indent=2))


def run(groups: list[str], shared: Path, work: Path) -> None:
    zoo = models(shared)
    cfg = PTQConfig(calib_size=CALIB)  # W8A8, per-channel symmetric weights, asymmetric activations, min-max
    opts = DetectOptions(batch_size=8, simulation_images=None)  # the tables score PyTorch on all images too
    for name, make in zoo.items():
        model, info = make()
        calib, test = _data(shared, info.input_shape[1])
        jobs = []
        if "ptq" in groups:
            jobs.append((f"ptq-{name}", lambda out: run_quantize(model, info, Detect(calib, test, opts), cfg, out)))
        if "overflow" in groups and name == "yolov5n":
            jobs.append((f"analyze-{name}", lambda out: run_quantize(
                model, info, Detect(calib, test, opts), cfg, out, analyze=AnalyzeOptions(overflow_images=16))))
        if ("groups" in groups or "layers" in groups) and name != "fastestdet-onnx":
            # the one sensitivity job: with `layers`, yolov5n's keep-FP32 sweep over its weighted layers; then the
            # group table; every plan's file scored on all val2017 images
            sweeps = ("keep_high",) if "layers" in groups and name == "yolov5n" else ()
            jobs.append((f"sens-{name}", lambda out, sweeps=sweeps: run_sensitivity(
                model, info, Detect(calib, test, opts, info=info), cfg, out, high=LayerPrecision.parse("fp32"),
                groups=model_groups(model, info), measure=MeasureOptions(threads=1), sweeps=sweeps,
                layers_only=True)))
        if "qat" in groups and name == "yolov5n":
            jobs.append((f"qat-{name}", lambda out: run_qat(model, info, Detect(calib, test, opts), QAT, cfg, out)))
        for key, job in jobs:
            if _done(work, key):
                continue
            print(f"[{key}]", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            job(work / key)
            _stamp(work, key, t0)


def relatency(shared: Path, work: Path, rounds: int = 30) -> None:
    """Measure every latency again, alone (``--runs latency``: run it when nothing else runs on the machine).

    The accuracy runs may share the cores with other jobs; this pass replaces their latency figures with paired
    measurements of the same ONNX files (Table 1) or of the same plans re-exported from the same calibration
    (Table 2), and records the load average it saw.
    """
    import os
    import tempfile

    from edgeslim.algorithms import layer_groups as lg
    from edgeslim.eval import ort as ort_eval
    from edgeslim.export.onnx_qdq import save_onnx, to_onnx
    from edgeslim.tasks.detect_parts import calibrated, fit_options
    from edgeslim.lower import lower

    def paired(paths: dict, shape) -> dict:
        lat = ort_eval.latency_samples(paths, shape, 1, threads=1, rounds=rounds, warmup=3)
        return {k: statistics.median(v) for k, v in lat.items()}, lat

    zoo = models(shared)
    cfg = PTQConfig(calib_size=CALIB)
    for name, make in zoo.items():
        model, info = make()
        for key in (f"ptq-{name}", f"qat-{name}"):
            s = _load(work, key)
            if not s:
                continue
            med, lat = paired({"fp32": work / key / "model_fp32.onnx", "int8": work / key / "model_int8.onnx"},
                              info.input_shape)
            s["latency_ms"].update(fp32=med["fp32"], int8=med["int8"], fps_fp32=1e3 / med["fp32"],
                                   fps_int8=1e3 / med["int8"], int8_over_fp32=ort_eval.paired_ratio(lat, "int8", "fp32"))
            s["latency_ms"]["remeasured"] = {"load_avg_1min": os.getloadavg()[0], "code_commit": COMMIT}
            (work / key / "summary.json").write_text(json.dumps(s, indent=2))
        s = _load(work, f"sens-{name}")
        if not s or "groups" not in s:
            continue
        calib, _ = _data(shared, info.input_shape[1])
        _, gm = calibrated(model, info, calib, cfg, fit_options(model, DetectOptions(batch_size=8)))
        groups = {g: tuple(p) for g, p in s["groups"]["groups"].items()}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = api.export_fp32_onnx(model, info.input_shape, Path(tmp) / "fp32.onnx")
            for i, r in enumerate(s["groups"]["rows"]):
                precisions = {g: LayerPrecision.parse(v) for g, v in r["precision"].items()}
                ptq.apply_plan(gm, cfg, lg.group_plan(groups, precisions))
                path = save_onnx(to_onnx(lower(gm, info.input_shape)), Path(tmp) / f"g{i}.onnx")
                med, lat = paired({"fp32": fp32, "m": path}, info.input_shape)
                r.update(latency_ms=med["m"], fps=1e3 / med["m"], latency_over_fp32=ort_eval.paired_ratio(lat, "m", "fp32"))
        s["groups"]["latency_remeasured"] = {"load_avg_1min": os.getloadavg()[0], "code_commit": COMMIT}
        (work / f"sens-{name}" / "summary.json").write_text(json.dumps(s, indent=2))


def _load(work: Path, key: str) -> dict | None:
    p = work / key / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def _commits(summaries) -> str:
    return "Runs made from commit(s) " + ", ".join(sorted({s.get("code_commit", "?") for s in summaries})) + "."


def _all_high_note(sens: dict) -> str:
    """The row with every group FP32 against the FP32 file: they differ when some plan units lie outside every
    group's patterns (those stay INT8 in every row)."""
    gaps = {}
    for k, s in sens.items():
        top = next(r for r in s["groups"]["rows"] if not r["quantized"])
        fp32 = s["groups"].get("fp32_scores")
        if fp32 and (top["scores"]["map50"], top["scores"]["map50_95"]) != (fp32["map50"], fp32["map50_95"]):
            gaps[k] = (f"{k} {top['scores']['map50']:.4f} / {top['scores']['map50_95']:.4f} against the FP32 file's "
                       f"{fp32['map50']:.4f} / {fp32['map50_95']:.4f}")
    if not gaps:
        return ""
    return ("Every group FP32 is not the FP32 model here (mAP@0.5 / @0.5:0.95): " + "; ".join(gaps.values())
            + ". Plan units outside every group's patterns stay INT8 in every row"
            + (": yolov5n's SiLU activations (`silu_model_*` in the traced graph) match none of its `model.N.*` "
               "patterns" if "yolov5n" in gaps else "") + ".\n\n")


def report(work: Path) -> None:
    ptq = {k: _load(work, f"ptq-{k}") for k in ("yolov5n", "fastestdet", "fastestdet-onnx")}
    ptq = {k: v for k, v in ptq.items() if v}
    if ptq:
        rows = []
        for k, s in ptq.items():
            lat = s["latency_ms"]
            for label, key, size, ms in (("FP32 (PyTorch)", "fp32", None, None),
                                         ("FP32 ONNX", "onnx_fp32", "fp32", lat["fp32"]),
                                         ("INT8 PTQ, fake-quant (PyTorch)", "quantized", None, None),
                                         ("INT8 PTQ ONNX (onnxruntime)", "onnx_int8", "int8", lat["int8"])):
                r = s[key]
                rows.append([k, label, r["map50"], r["map50_95"], r["precision"], r["recall"], r["f1"],
                             f"{s['size_bytes'][size] / 2**20:.2f}" if size else "-",
                             f"{ms:.1f}" if ms else "-", f"{1e3 / ms:.1f}" if ms else "-"])
            qs = _load(work, f"qat-{k}")
            if qs:
                lat_q = qs["latency_ms"]
                for label, key, size, ms in (("INT8 QAT, fake-quant (PyTorch)", "qat", None, None),
                                             ("INT8 QAT ONNX (onnxruntime)", "onnx_int8", "int8", lat_q["int8"])):
                    r = qs[key]
                    rows.append([k, label, r["map50"], r["map50_95"], r["precision"], r["recall"], r["f1"],
                                 f"{qs['size_bytes'][size] / 2**20:.2f}" if size else "-",
                                 f"{ms:.1f}" if ms else "-", f"{1e3 / ms:.1f}" if ms else "-"])
            else:
                rows.append([k, "QAT", "not run", "", "", "", "", "", "", ""])
        ratio = "; ".join(f"{k} {s['latency_ms']['int8_over_fp32']:.2f}x" for k, s in ptq.items())
        loads = [s["latency_ms"]["remeasured"]["load_avg_1min"] for s in ptq.values() if "remeasured" in s["latency_ms"]]
        ratio += (f" (re-measured by `--runs latency` with nothing else running: 1-min load average at most "
                  f"{max(loads):.1f})" if loads else " (measured while other benchmarks shared the cores)")
        body = ("## Detectors on COCO128: FP32 vs INT8 PTQ (seed 002's Table 1)\n\n"
                f"Calibration: the {CALIB} train2017 images; evaluation: the 128 val2017 images (898 boxes), letterboxed "
                "to the model's size (yolov5n 640, FastestDet 352, BGR). INT8: 8-bit per-channel symmetric weights, "
                "8-bit asymmetric min-max activations, BN folded, SiLU / sigmoid as activations between quantized "
                "tensors. mAP COCO-style (101-point, IoU 0.50:0.95; checked against pycocotools in the tests); "
                "P / R / F1 from the confusion matrix at IoU 0.5 and score 0.25 (seed 000). Size: the ONNX file. "
                "Latency: onnxruntime, batch 1, one thread, median of 30 interleaved runs. "
                f"INT8 / FP32 latency ratio measured in the same run: {ratio}. `fastestdet-onnx` is the published "
                "FastestDet.onnx imported by `edgeslim.import_onnx` (batch 1, its decoder reads the activated "
                "output); `fastestdet` is our definition loading the published state_dict. "
                + QAT_TEXT + "\n\n"
                + table(["model", "variant", "mAP@0.5", "mAP@0.5:0.95", "P", "R", "F1", "MiB", "ms", "FPS"], rows)
                + "\n\n" + _commits(ptq.values()))
        write_section("detect-ptq", body)
    sens = {k: _load(work, f"sens-{k}") for k in ("yolov5n", "fastestdet")}
    sens = {k: v for k, v in sens.items() if v}
    if sens:
        rows = []
        for k, s in sens.items():
            for r in s["groups"]["rows"]:
                rows.append([k] + [r["precision"][g] for g in ("backbone", "neck", "head")]
                            + [r["scores"]["map50"], r["scores"]["map50_95"], f"{r['weight_bytes'] / 2**20:.2f}",
                               f"{r['onnx_bytes'] / 2**20:.2f}", f"{r['latency_ms']:.1f}", f"{r['fps']:.1f}",
                               f"{r['latency_over_fp32']:.2f}"])
        body = ("## Partial quantization: every backbone / neck / head FP32 / INT8 combination (seed 002's Table 2)\n\n"
                "Calibrated once on train2017; each plan re-frozen from the same statistics, exported, scored in "
                "onnxruntime on val2017. FP32 groups run as float islands (DequantizeLinear in, QuantizeLinear out). "
                "Weights: stored parameter bytes at their bit widths; latency batch 1, one thread, paired with FP32"
                + ("; re-measured by `--runs latency` with nothing else running (1-min load average at most "
                   f"{max(s['groups']['latency_remeasured']['load_avg_1min'] for s in sens.values()):.1f})"
                   if all("latency_remeasured" in s["groups"] for s in sens.values())
                   else " (measured while other benchmarks shared the cores)") + ".\n\n"
                + table(["model", "backbone", "neck", "head", "mAP@0.5", "mAP@0.5:0.95", "weights MiB", "ONNX MiB",
                         "ms", "FPS", "vs FP32 latency"], rows) + "\n\n" + _all_high_note(sens) + _commits(sens.values()))
        write_section("detect-groups", body)
    s = sens.get("yolov5n")
    if s and any("keep_high" in r for r in s["sensitivity"]["rows"]):
        layers = [r["keep_high"] | {"name": r["name"]} for r in s["sensitivity"]["rows"]]
        ranked = sorted(layers, key=lambda r: -r["delta_map50_95"])
        rows = [[r["name"], r["map50"], r["delta_map50"] * 100, r["map50_95"], r["delta_map50_95"] * 100, r["f1"]]
                for r in ranked]
        fp32, uniform = s["sensitivity"]["fp32"], s["sensitivity"]["uniform"]
        body = ("## yolov5n: one layer FP32, the rest INT8 (seed 000's per-layer experiment)\n\n"
                f"FP32 mAP@0.5 {fp32['map50']:.4f} / @0.5:0.95 {fp32['map50_95']:.4f}; all INT8 "
                f"{uniform['map50']:.4f} / {uniform['map50_95']:.4f} (onnxruntime, val2017). Each row keeps "
                "one conv in FP32 (its input read in float, its output re-quantized), sorted by the mAP@0.5:0.95 it "
                "recovers (points vs all INT8).\n\n"
                + table(["layer kept FP32", "mAP@0.5", "gain (pts)", "mAP@0.5:0.95", "gain (pts)", "F1"], rows)
                + "\n\n" + _commits([s]))
        write_section("detect-layers", body)
    a = _load(work, "analyze-yolov5n")
    if a and "overflow" in a:
        o = a["overflow"]
        rows = [[r["name"], f"{r['product_int8']['avg']:.3%}", f"{r['product_int8']['max']:.3%}",
                 f"{r['sum_int16']['avg']:.3%}", f"{r['sum_int16']['max']:.3%}", r["accumulator_overflows"]]
                for r in o["layers"]]
        body = ("## yolov5n overflow statistics (seed 000's Tables 1 and 2)\n\n"
                f"Integer engine on {o['images']} val2017 images: per layer, the fraction of int8 x int8 products "
                "outside INT8 and of per-pixel accumulator sums outside INT16 (mean over filters, and the worst "
                f"filter). Engine mAP@0.5 {a['engine']['map50']:.4f} vs onnxruntime INT8 {a['onnx_int8']['map50']:.4f} "
                "on all 128 images.\n\n"
                + table(["layer", "products outside INT8 (mean over filters)", "worst filter",
                         "sums outside INT16 (mean over filters)", "worst filter", "INT32 overflows"], rows)
                + "\n\n" + _commits([a]))
        write_section("detect-overflow", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeslim-detect"))
    ap.add_argument("--runs", default="", help="comma-separated: ptq, groups, layers, overflow, qat, latency (re-measure alone)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.shared / "data/coco128.zip").exists():
        raise SystemExit(f"shared data not found under {args.shared}")
    args.work.mkdir(parents=True, exist_ok=True)
    if "latency" in args.runs.split(","):
        relatency(args.shared, args.work)
    if args.runs:
        run([g for g in args.runs.split(",") if g], args.shared, args.work)
    if args.report:
        report(args.work)


if __name__ == "__main__":
    main()
