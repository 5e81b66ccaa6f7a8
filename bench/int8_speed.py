"""INT8 speed on onnxruntime: edgeslim next to onnxruntime's own ``quantize_static`` (same FP32 file, same
calibration images), one thread and all threads, batch 1 and 8, interleaved in one process per model.

Per model: INT8 / FP32 latency ratio of each quantizer (paired: the median over rounds of the per-round ratio),
the accuracy of each INT8 file in onnxruntime (top-1 on CIFAR-10 test images for ResNet-20, mAP on COCO128
val2017 for the detectors, SQNR vs FP32 for random-weight models), and the integer / float compute ops in
onnxruntime's optimized graph. The CPU's VNNI / AVX2 flags are in the machine line.

    python -m bench.int8_speed [--rounds 30] [--models yolov5n,fastestdet,resnet20,mobilenet_v2,anchor_free]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import edgeslim
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.cpu import int8_weights_saturate
from edgeslim.data.inputs import InputSpec, open_inputs
from edgeslim.eval import ort as ort_eval
from edgeslim.eval.fidelity import fidelity, headline_db

from ._report import table, write_section
from .peers import nncf_quantize, ort_quantize_static

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _ops(path: Path) -> tuple[int, int, str]:
    counts = ort_eval.optimized_op_counts(path)
    integer = sum(n for op, n in counts.items() if ort_eval.op_category(op) == "integer")
    floats = {op: n for op, n in counts.items() if ort_eval.op_category(op) == "float"}
    return integer, sum(floats.values()), ", ".join(f"{op} {n}" for op, n in sorted(floats.items())) or "-"


def _detector_accuracy(shared: Path, name: str, paths: dict[str, Path], batch: int) -> dict[str, str]:
    from edgeslim.data.detection import open_detection
    from edgeslim.config import DetectOptions
    from edgeslim.tasks.detect_parts import evaluate_models, ort_runner
    from edgeslim.models import as_detector, build_model

    spec = {"yolov5n": ("yolov5n", shared / "models/yolov5n.pt", None, None),
            "fastestdet": (str(shared / "models/fastestdet/FastestDet.onnx"), None, "fastestdet-activated", "BGR")}[name]
    model, info = build_model(spec[0], spec[1])
    test = open_detection(shared / "data/coco128.zip", "val2017", imgsz=info.input_shape[1])
    info = as_detector(info, spec[2], test.names, spec[3])
    res = evaluate_models({k: ort_runner(p, threads=2) for k, p in paths.items()}, test, info.decoder,
                          DetectOptions(batch_size=batch), info=info)
    return {k: f"mAP@.5 {r['map50']:.4f} / @.5:.95 {r['map50_95']:.4f}" for k, r in res.items()}


def _models(shared: Path, tmp: Path, wanted: list[str]):
    from edgeslim.models import build_model

    coco, cifar = shared / "data/coco128.zip", shared / "data/cifar10-jpeg-test.zip"
    if "yolov5n" in wanted and (shared / "models/yolov5n.pt").exists():
        model, info = build_model("yolov5n", shared / "models/yolov5n.pt")
        path = api.export_fp32_onnx(model, info.input_shape, tmp / "yolov5n.onnx")
        x = open_inputs(coco, info.input_shape, InputSpec(size=info.input_shape[1:], resize="letterbox"), limit=64)
        yield "yolov5n", path, x, "detect"
    if "fastestdet" in wanted and (shared / "models/fastestdet/FastestDet.onnx").exists():
        from onnx import version_converter
        import onnx

        path = tmp / "FastestDet_opset13.onnx"  # per-axis DequantizeLinear (onnxruntime's quantizer) needs 13
        onnx.save(version_converter.convert_version(onnx.load(str(shared / "models/fastestdet/FastestDet.onnx")), 13),
                  str(path))
        x = open_inputs(coco, (3, 352, 352), InputSpec(size=(352, 352), channel_order="BGR", resize="letterbox"),
                        limit=64)
        yield "fastestdet", path, x, "detect"
    if "resnet20" in wanted and (shared / "models/resnet20_cifar10jpeg.pt").exists():
        model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
        path = api.export_fp32_onnx(model, info.input_shape, tmp / "resnet20.onnx")
        spec = InputSpec(size=(32, 32), mean=info.mean, std=info.std)
        yield "resnet20", path, open_inputs(cifar, info.input_shape, spec, limit=256), "classify"
    if "mobilenet_v2" in wanted:
        import torch

        import families

        torch.manual_seed(0)
        model, info = build_model("mobilenet_v2")
        families.randomize_bn(model)
        path = api.export_fp32_onnx(model, info.input_shape, tmp / "mobilenet_v2.onnx")
        x = np.random.default_rng(0).standard_normal((48, *info.input_shape)).astype(np.float32)
        yield "mobilenet_v2 (random weights)", path, x, "fidelity"
    if "anchor_free" in wanted:
        import families

        path = families.export("anchor_free", tmp / "anchor_free.onnx")
        x = np.random.default_rng(0).standard_normal((96, 3, 64, 64)).astype(np.float32)
        yield "anchor_free (synthetic, SiLU)", path, x, "fidelity"


VARIANTS = {"edgeslim": "edgeslim INT8", "edgeslim-full": "edgeslim, 8-bit grid (uint8 containers)",
            "ort": "ORT INT8", "ort-rr": "ORT INT8 reduce_range", "nncf": "NNCF INT8"}


def nncf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def variants(saturating: bool) -> list[str]:
    """The INT8 files compared: on CPUs whose int8 kernels saturate (AVX2, no VNNI) also the full 8-bit grid and
    onnxruntime's ``reduce_range`` (its advice for such CPUs); NNCF (preset performance) where it installs."""
    keys = list(VARIANTS)[:4] if saturating else ["edgeslim", "ort"]
    return keys + (["nncf"] if nncf_installed() else [])


def _top1(shared: Path, paths: dict[str, Path]) -> dict[str, str]:
    from edgeslim.models import build_model

    _, info = build_model("resnet20")
    from edgeslim.data import Preprocess, open_dataset

    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", Preprocess(info.input_shape, info.mean, info.std))
    x = test.load_all()
    out = {}
    for k, p in paths.items():
        logits = ort_eval.predict(ort_eval.session(p, threads=2), x, 500)
        out[k] = f"top-1 {float((logits.argmax(1) == test.labels).mean()):.4f}"
    return out


def measure(name: str, path: Path, x: np.ndarray, task: str, tmp: Path, shared: Path, rounds: int,
            saturating: bool) -> list[list]:
    gm = edgeslim.import_onnx(path)
    fixed = gm.meta.get("onnx_dynamic_batch") is False
    calib = x[: len(x) // 2]
    step = 1 if fixed else 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(gm, calib, input_shape=tuple(x.shape[1:]), batch_size=step)  # weight_range auto
        paths = {"fp32": path, "edgeslim": api.export_onnx(q, tmp / f"{path.stem}_es.onnx")}
        if saturating:  # the 8-bit grid, exact here only in uint8 containers
            full = api.quantize(gm, calib, PTQConfig(weight_range="full"), input_shape=tuple(x.shape[1:]),
                                batch_size=step)
            paths["edgeslim-full"] = api.export_onnx(full, tmp / f"{path.stem}_es_full.onnx")
    for key, kw in (("ort", {}), ("ort-rr", {"reduce_range": True})) if saturating else (("ort", {}),):
        paths[key] = tmp / f"{path.stem}_{key}.onnx"
        peer = ort_quantize_static(path, calib, paths[key], calib_batch=step, **kw)
        if not peer.ok:
            peer = ort_quantize_static(path, calib, paths[key], calib_batch=step, preprocess=False, **kw)
        if not peer.ok:
            print(f"{name}: quantize_static {kw} failed: {peer.error}", flush=True)
            del paths[key]
    if nncf_installed():
        paths["nncf"] = tmp / f"{path.stem}_nncf.onnx"
        peer = nncf_quantize(path, calib, paths["nncf"])
        if not peer.ok:
            print(f"{name}: NNCF failed: {peer.error}", flush=True)
            del paths["nncf"]
    if task == "detect":
        acc = _detector_accuracy(shared, name, paths, 1 if fixed else 8)
    elif task == "classify":
        acc = _top1(shared, paths)
    else:
        test = x[len(x) // 2:]
        ref = ort_eval.predict_all(ort_eval.session(path, threads=2), test, step)
        acc = {k: f"SQNR {headline_db(fidelity(ref, ort_eval.predict_all(ort_eval.session(p, threads=2), test, step))):.1f} dB"
               for k, p in paths.items() if k != "fp32"}
        acc["fp32"] = "-"
    rows = []
    batches = (1,) if fixed else (1, 8)
    for threads in (1, os.cpu_count() or 1):
        for b in batches:
            lat = ort_eval.latency_samples(paths, tuple(x.shape[1:]), b, threads=threads, rounds=rounds)
            ratios = {k: ort_eval.paired_ratio(lat, k, "fp32") for k in paths if k != "fp32"}
            fp32_ms = float(np.median(lat["fp32"]))
            rows.append([name, threads, b, f"{fp32_ms:.2f}"]
                        + [f"{ratios[k]:.2f}x" if k in ratios else "failed" for k in variants(saturating)])
            print(" | ".join(map(str, rows[-1])), flush=True)
    es_ops, ort_ops = _ops(paths["edgeslim"]), _ops(paths["ort"]) if "ort" in paths else None
    acc_row = [name, acc["fp32"]] + [acc.get(k, "failed") for k in variants(saturating)] \
        + [f"{es_ops[0]} / {es_ops[1]} ({es_ops[2]})", f"{ort_ops[0]} / {ort_ops[1]} ({ort_ops[2]})" if ort_ops else "-"]
    print(" | ".join(map(str, acc_row)), flush=True)
    return rows, acc_row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--models", default="yolov5n,fastestdet,resnet20,mobilenet_v2,anchor_free")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", help="BENCHMARKS.md section (default: int8-speed, or int8-speed-avx2 on x86 CPUs "
                    "with AVX2 and no VNNI)")
    args = ap.parse_args()
    saturating = int8_weights_saturate()
    lat_rows, acc_rows = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.chdir(tmp)  # quantize_static leaves temporary files in the working directory
        for name, path, x, task in _models(args.shared, tmp, args.models.split(",")):
            rows, acc = measure(name, Path(path), x, task, tmp, args.shared, args.rounds, saturating)
            lat_rows += rows
            acc_rows.append(acc)
    names = [VARIANTS[k] for k in variants(saturating)]
    cpu_note = ("This CPU has AVX2 and no VNNI: onnxruntime's int8-weight kernels add pairs of u8 x s8 products in "
                "saturating int16. edgeslim's default (`--weight-range auto`) quantizes 8-bit weights on the 7-bit grid "
                "here, which cannot saturate (fast and exact); the 8-bit grid is exact here only in uint8 containers "
                "(slower). onnxruntime's `quantize_static` writes int8 weights that saturate here unless "
                "`reduce_range=True` (its advice for such CPUs). " if saturating else "")
    if nncf_installed():
        import nncf

        cpu_note += (f"NNCF {nncf.__version__}: `nncf.quantize` with its ONNX backend, preset performance (symmetric "
                     "weights and activations), fast bias correction, the same calibration inputs. ")
    body = (("## INT8 speed on a CPU without VNNI (AVX2 only): edgeslim vs onnxruntime `quantize_static`\n\n"
             if saturating else
             "## INT8 speed: edgeslim vs onnxruntime `quantize_static`, one thread and all threads, batch 1 and 8\n\n")
            + cpu_note +
            "Same FP32 ONNX file and calibration inputs for all (W8A8 per-channel, MinMax; half of the listed inputs "
            "calibrate). Latency: the FP32 and INT8 sessions interleaved in one process, "
            f"{args.rounds} rounds after warm-up; the ratio is the median of per-round INT8 / FP32 ratios. Files folded "
            "at batch 1 (FastestDet.onnx) run batch 1 only.\n\n"
            + table(["model", "threads", "batch", "FP32 ms"] + [f"{n} / FP32" for n in names], lat_rows)
            + "\n\nAccuracy of each file in onnxruntime, and the ops onnxruntime runs (integer kernels / float compute "
              "ops in its optimized graph):\n\n"
            + table(["model", "FP32"] + names + ["edgeslim integer / float ops", "ORT integer / float ops"], acc_rows))
    if not args.no_write:
        write_section(args.section or ("int8-speed-avx2" if saturating else "int8-speed"), body)


if __name__ == "__main__":
    main()
