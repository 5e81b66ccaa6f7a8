"""Detector accuracy of edgeslim's INT8 file next to onnxruntime's ``quantize_static`` on the same FP32 file and the
same calibration images, over several disjoint calibration subsets (how much of a difference is calibration noise).

yolov5n exported by edgeslim, and the published FastestDet.onnx (converted to opset 13, which onnxruntime's
per-channel quantizer needs); calibration: disjoint sets of ``--calib`` COCO128 images (both splits, letterboxed),
evaluation: the 128 val2017 images, both files in onnxruntime. W8A8 per-channel, MinMax.

    python -m bench.detect_vs_ort [--subsets 3] [--calib 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

import edgeslim
from edgeslim import api
from edgeslim.data.detection import open_detection
from edgeslim.data.inputs import InputSpec, open_inputs
from edgeslim.config import DetectOptions
from edgeslim.tasks.detect_parts import evaluate_models, ort_runner
from edgeslim.models import as_detector, build_model

from ._report import ROOT, table, write_section
from .peers import ort_quantize_static


def _models(shared: Path, tmp: Path):
    model, info = build_model("yolov5n", shared / "models/yolov5n.pt")
    yield "yolov5n", api.export_fp32_onnx(model, info.input_shape, tmp / "yolov5n.onnx"), info, None, None, "RGB"
    import onnx
    from onnx import version_converter

    src = shared / "models/fastestdet/FastestDet.onnx"
    path = tmp / "fastestdet13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(src)), 13), str(path))
    _, info = build_model(str(path))
    yield "FastestDet.onnx", path, info, "fastestdet-activated", "BGR", "BGR"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--calib", type=int, default=32)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.chdir(tmp)  # quantize_static leaves temporary files in the working directory
        for name, path, info, decoder, order, channels in _models(args.shared, tmp):
            size = info.input_shape[1:]
            x = open_inputs(args.shared / "data/coco128.zip", info.input_shape,
                            InputSpec(size=size, channel_order=channels, resize="letterbox"),
                            limit=args.subsets * args.calib, seed=1)
            test = open_detection(args.shared / "data/coco128.zip", "val2017", imgsz=size[0])
            info = as_detector(info, decoder, test.names, order)
            gm = edgeslim.import_onnx(path)
            step = 1 if gm.meta.get("onnx_dynamic_batch") is False else 8
            got = {"edgeslim": [], "ort": []}
            for k in range(args.subsets):
                calib = x[k * args.calib:(k + 1) * args.calib]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q = api.quantize(gm, calib, input_shape=info.input_shape, batch_size=step)
                ours, theirs = api.export_onnx(q, tmp / f"es{k}.onnx"), tmp / f"ort{k}.onnx"
                peer = ort_quantize_static(path, calib, theirs, calib_batch=step)
                if not peer.ok:
                    peer = ort_quantize_static(path, calib, theirs, calib_batch=step, preprocess=False)
                res = evaluate_models({"edgeslim": ort_runner(ours, 2), "ort": ort_runner(theirs, 2)}, test,
                                      info.decoder, DetectOptions(batch_size=step), info=info)
                for who, r in res.items():
                    got[who].append((r["map50"], r["map50_95"]))
                rows.append([name, k, f"{res['edgeslim']['map50']:.4f} / {res['edgeslim']['map50_95']:.4f}",
                             f"{res['ort']['map50']:.4f} / {res['ort']['map50_95']:.4f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
            mean = {who: np.mean(v, axis=0) for who, v in got.items()}
            rows.append([name, "mean", f"{mean['edgeslim'][0]:.4f} / {mean['edgeslim'][1]:.4f}",
                         f"{mean['ort'][0]:.4f} / {mean['ort'][1]:.4f}"])
    body = ("## Detectors: edgeslim INT8 vs onnxruntime `quantize_static` INT8, several calibration subsets\n\n"
            f"Same FP32 file and the same {args.calib} calibration images for both in each row (disjoint subsets of "
            "COCO128, letterboxed); mAP@0.5 / mAP@0.5:0.95 on the 128 val2017 images, both files run in onnxruntime. "
            "The spread between subsets is the calibration noise the single-subset tables carry.\n\n"
            + table(["model", "calibration subset", "edgeslim mAP@.5 / @.5:.95", "ORT mAP@.5 / @.5:.95"], rows))
    write_section("detect-vs-ort", body)


if __name__ == "__main__":
    main()
