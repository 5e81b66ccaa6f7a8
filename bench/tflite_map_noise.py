"""How far apart two equally valid integer runtimes' mAP can be on COCO128, and how precisely 128 images measure it.

    python -m bench.tflite_map_noise [--model yolov5n] [--boot 300] [--work /tmp/edgeslim-map-noise] [--write]

One ``edgeslim quantize MODEL --task detect --formats tflite`` run (calibrated on the 128 train2017 images) gives
``model_fp32.onnx``, ``model_int8.onnx`` and ``model_int8.tflite``: the same IntGraph, the same codes, scales and
zero points. onnxruntime requantizes with a float multiplier and one rounding; TFLite (its reference kernels,
TFLM and XNNPACK alike) with its own arithmetic, so the two INT8 files are two integer models that differ by one
step on a fraction of a percent of each layer's outputs (``tflite-export``). Each file's detections on the 128
val2017 images are scored by the same decoder, NMS and COCO mAP; then a paired bootstrap over images (the same
resampled images for both files; Efron and Tibshirani, "An Introduction to the Bootstrap", 1993) gives the
spread of each mAP difference that the choice of 128 images alone causes. LiteRT runs its default kernels
(XNNPACK, one thread); the engine equals LiteRT's reference kernels and TFLM on these files (``tflite-export``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ._report import ROOT, table, write_section


def _run_quantize(shared: Path, model: str, out: Path) -> None:
    if (out / "summary.json").exists() and (out / "model_int8.tflite").exists():
        return
    weights = {"yolov5n": shared / "models/yolov5n.pt"}[model]
    z = shared / "data/coco128.zip"
    cmd = [sys.executable, "-m", "edgeslim", "quantize", model, "--weights", str(weights), "--task", "detect",
           "--calib-data", str(z), "--calib-split", "train2017", "--data", str(z), "--data-split", "val2017",
           "--calib-size", "128", "--formats", "onnx,tflite", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def detections(shared: Path, model: str, out: Path) -> tuple[dict[str, list], list, int]:
    """Each file's per-image detections on val2017, the targets and the number of classes."""
    from edgeslim.config import DetectOptions
    from edgeslim.data.detection import open_detection
    from edgeslim.export.tflm import litert_runner
    from edgeslim.models import build_model
    from edgeslim.tasks.detect_parts import check_detector, model_detections, ort_runner

    _, info = build_model(model, shared / "models/yolov5n.pt")
    test = open_detection(shared / "data/coco128.zip", "val2017", imgsz=info.input_shape[1])
    decoder = check_detector(info, test)
    runners = {"onnx_fp32": ort_runner(out / "model_fp32.onnx", threads=1),
               "onnx_int8": ort_runner(out / "model_int8.onnx", threads=1),
               "tflite": litert_runner((out / "model_int8.tflite").read_bytes())}
    dets, targets = model_detections(runners, test, decoder, DetectOptions(batch_size=1), "scoring", info)
    return dets, targets, max(test.num_classes, 1)


def bootstrap(dets: dict[str, list], targets: list, nc: int, pairs: list[tuple[str, str]], boot: int,
              seed: int = 0) -> dict:
    """Full-set mAP@.5:.95 / @.5 per file, and per pair (a, b) the paired bootstrap of ``a - b`` in points."""
    from edgeslim.eval.detection import evaluate_map

    def score(name: str, idx) -> tuple[float, float]:
        m = evaluate_map([dets[name][i] for i in idx], [targets[i] for i in idx], num_classes=nc)
        return m["map50_95"], m["map50"]

    n = len(targets)
    full = {k: score(k, range(n)) for k in dets}
    rng = np.random.default_rng(seed)
    samples = {p: [] for p in pairs}
    for _ in range(boot):
        idx = rng.integers(0, n, n)
        s = {k: score(k, idx) for k in {x for p in pairs for x in p}}
        for a, b in pairs:
            samples[(a, b)].append([100 * (s[a][0] - s[b][0]), 100 * (s[a][1] - s[b][1])])
    out = {"images": n, "boot": boot, "full": full, "pairs": {}}
    for (a, b), v in samples.items():
        v = np.asarray(v)
        out["pairs"][f"{a} - {b}"] = {
            "gap": [100 * (full[a][0] - full[b][0]), 100 * (full[a][1] - full[b][1])],
            "se": v.std(axis=0, ddof=1).tolist(), "ci95": np.percentile(v, [2.5, 97.5], axis=0).T.tolist(),
            "within_0_2": float(np.mean(np.abs(v[:, 0]) <= 0.2))}
    return out


def report(r: dict, model: str) -> str:
    rows = []
    for name, p in r["pairs"].items():
        rows.append([name, f"{p['gap'][0]:+.2f}", f"{p['se'][0]:.2f}",
                     f"[{p['ci95'][0][0]:+.2f}, {p['ci95'][0][1]:+.2f}]", f"{p['gap'][1]:+.2f}", f"{p['se'][1]:.2f}",
                     f"[{p['ci95'][1][0]:+.2f}, {p['ci95'][1][1]:+.2f}]", f"{100 * p['within_0_2']:.0f} %"])
    full = ", ".join(f"{k} {v[0]:.4f} / {v[1]:.4f}" for k, v in r["full"].items())
    return ("## How precisely COCO128 measures a runtime's mAP: the .tflite against the ONNX INT8 file\n\n"
            f"{model}, `quantize --task detect --formats onnx,tflite` calibrated on the 128 train2017 images; every "
            f"file scored on the {r['images']} val2017 images by the same decoder, NMS and mAP (onnxruntime one "
            "thread, LiteRT default kernels one thread). mAP@.5:.95 / mAP@.5 on all images: "
            f"{full}. Paired bootstrap over images ({r['boot']} resamples, seed 0): the difference of each pair in "
            "mAP points, its standard error and 95 % interval; the last column is the share of resamples in which "
            "the .5:.95 difference is within 0.2 points (issue 18's goal).\n\n"
            + table(["pair", "mAP@.5:.95 diff", "SE", "95 % interval", "mAP@.5 diff", "SE", "95 % interval",
                     "|diff| <= 0.2"], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--model", default="yolov5n", choices=("yolov5n",))
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeslim-map-noise"))
    ap.add_argument("--boot", type=int, default=300)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    out = args.work / args.model
    _run_quantize(args.shared, args.model, out)
    dets, targets, nc = detections(args.shared, args.model, out)
    r = bootstrap(dets, targets, nc, [("tflite", "onnx_int8"), ("onnx_int8", "onnx_fp32")], args.boot)
    (args.work / f"{args.model}-noise.json").write_text(json.dumps(r, indent=1))
    text = report(r, args.model)
    print(text)
    if args.write:
        write_section("tflite-map-noise", text)


if __name__ == "__main__":
    main()
