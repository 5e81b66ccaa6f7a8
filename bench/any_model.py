"""Any model in: edgeslim next to onnxruntime's own ``quantize_static`` on models of the families users bring.

For each model (the synthetic families of ``tests/families.py`` and, when ``../shared`` is present, ResNet-20,
FastestDet.onnx and yolov5n exported to ONNX), both quantizers get the same FP32 ONNX file and the same
calibration inputs: edgeslim imports the file (``edgeslim.import_onnx``), quantizes and exports it; onnxruntime
runs ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax). Reported per model: SQNR
of each output vs the FP32 file (worst output, dB), convs running as integer kernels in onnxruntime's optimized
graph, float islands, and the INT8 / FP32 latency ratio of each (batch 1, one thread, interleaved in one
process: paired ratios).

    python -m bench.any_model [--shared ../shared] [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import edgeslim
from edgeslim import api
from edgeslim.data.inputs import InputSpec, open_inputs
from edgeslim.eval import ort as ort_eval
from edgeslim.eval.fidelity import fidelity, headline_db

from ._report import table, write_section
from .peers import ort_quantize_static

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import families  # noqa: E402
import onnx_conformance as onnx_conformance_suite  # noqa: E402,F401


def _synthetic(tmp: Path):
    rng = np.random.default_rng(0)
    for name, (_, shape) in families.FAMILIES.items():
        path = families.export(name, tmp / f"{name}.onnx")
        yield name, path, rng.standard_normal((64, *shape)).astype(np.float32), \
            rng.standard_normal((32, *shape)).astype(np.float32)


def _real(tmp: Path, shared: Path):
    from edgeslim.models import build_model

    coco = shared / "data/coco128.zip"
    cifar = shared / "data/cifar10-jpeg-test.zip"
    if (shared / "models/resnet20_cifar10jpeg.pt").exists() and cifar.exists():
        model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
        path = api.export_fp32_onnx(model, info.input_shape, tmp / "resnet20.onnx")
        x = open_inputs(cifar, info.input_shape, InputSpec(size=(32, 32), mean=info.mean, std=info.std), limit=96)
        yield "resnet20 (CIFAR-10)", path, x[:64], x[64:]
    if (shared / "models/fastestdet/FastestDet.onnx").exists() and coco.exists():
        x = open_inputs(coco, (3, 352, 352), InputSpec(size=(352, 352), channel_order="BGR", resize="stretch"),
                        limit=96)
        yield "FastestDet.onnx (published file)", shared / "models/fastestdet/FastestDet.onnx", x[:64], x[64:]
    if (shared / "models/yolov5n.pt").exists() and coco.exists():
        model, info = build_model("yolov5n", shared / "models/yolov5n.pt")
        path = api.export_fp32_onnx(model, info.input_shape, tmp / "yolov5n.onnx")
        x = open_inputs(coco, info.input_shape, InputSpec(size=info.input_shape[1:], resize="letterbox"), limit=48)
        yield "yolov5n (640)", path, x[:32], x[32:]


def _outputs(path: Path, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    return ort_eval.predict_all(ort_eval.session(path, threads=2), x, batch)


def _loads(path: Path) -> bool:
    try:
        ort_eval.session(path)
        return True
    except Exception:  # noqa: BLE001 - quantize_static wrote a file onnxruntime itself refuses
        return False


def measure(name: str, path: Path, calib: np.ndarray, test: np.ndarray, tmp: Path, rounds: int) -> list:
    gm = edgeslim.import_onnx(path)
    batch = 1 if gm.meta.get("onnx_dynamic_batch") is False else 16
    shape = tuple(calib.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = api.quantize(gm, calib, input_shape=shape, batch_size=batch)
    ours = tmp / f"{path.stem}_edgeslim.onnx"
    from edgeslim.export.onnx_qdq import save_onnx, set_io_names, to_onnx

    save_onnx(set_io_names(to_onnx(q.intgraph), gm.meta["onnx_input_names"], gm.meta["onnx_output_names"]), ours)
    theirs = tmp / f"{path.stem}_ort.onnx"
    peer = ort_quantize_static(path, calib, theirs, calib_batch=batch)
    if not peer.ok:
        peer = ort_quantize_static(path, calib, theirs, calib_batch=batch, preprocess=False)
    if peer.ok and not _loads(theirs):  # e.g. per-axis DequantizeLinear written into an opset-11 file
        import onnx
        from onnx import version_converter

        upgraded = tmp / f"{path.stem}_opset13.onnx"
        onnx.save(version_converter.convert_version(onnx.load(str(path)), 13), str(upgraded))
        peer = ort_quantize_static(upgraded, calib, theirs, calib_batch=batch, preprocess=False)
        if peer.ok and not _loads(theirs):
            peer = type(peer)(peer.name, None, peer.seconds, "its output does not load in onnxruntime")
    ref = _outputs(path, test, batch)
    es_db = headline_db(fidelity(ref, _outputs(ours, test, batch)))
    es_int, es_total = ort_eval.integer_convs(ours)
    paths = {"fp32": path, "edgeslim": ours}
    if peer.ok:
        paths["ort"] = theirs
        ort_db = headline_db(fidelity(ref, _outputs(theirs, test, batch)))
        ort_int, ort_total = ort_eval.integer_convs(theirs)
    lat = ort_eval.latency_samples(paths, shape, 1, threads=1, rounds=rounds)
    islands = sorted({i["fn"] for i in q.intgraph.float_islands()})
    row = [name, f"{es_db:.1f}", f"{es_int}/{es_total}", len(q.intgraph.float_islands()),
           ", ".join(islands)[:60] or "-", f"{ort_eval.paired_ratio(lat, 'edgeslim', 'fp32'):.2f}x"]
    if peer.ok:
        row += [f"{ort_db:.1f}", f"{ort_int}/{ort_total}", f"{ort_eval.paired_ratio(lat, 'ort', 'fp32'):.2f}x",
                f"{es_db - ort_db:+.1f}"]
    else:
        row += ["failed: " + peer.error[:60], "-", "-", "-"]
    print(" | ".join(map(str, row)), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        import os

        os.chdir(tmp)  # quantize_static leaves temporary files in the working directory
        for name, path, calib, test in [*_synthetic(tmp), *_real(tmp, Path(args.shared))]:
            rows.append(measure(name, Path(path), calib, test, tmp, args.rounds))
    header = ["model", "edgeslim SQNR dB (worst output)", "integer convs", "float islands", "island ops",
              "edgeslim INT8/FP32", "ORT SQNR dB", "ORT integer convs", "ORT INT8/FP32", "SQNR edgeslim - ORT"]
    body = ("## Any model in: edgeslim vs onnxruntime `quantize_static` on the same FP32 file and calibration inputs\n\n"
            "Both W8A8 per-channel, MinMax; calibration 64 inputs, SQNR on 32 others (16 for yolov5n, 32 calibration). "
            "Synthetic families (tests/families.py) run on random N(0,1) inputs with random weights; ResNet-20 on "
            "CIFAR-10 test images, FastestDet / yolov5n on COCO128 images. SQNR: the worst output of the model vs the "
            "FP32 file in onnxruntime. Latency: batch 1, one thread, FP32 / edgeslim / ORT interleaved in one "
            "process (paired ratio of medians per round).\n\n" + table(header, rows))
    from collections import Counter

    suite = onnx_conformance_suite

    totals = Counter(r.status for r in suite.run_suite())
    body += ("\n\nONNX backend node tests (the `onnx` package's conformance suite) as tests of the importer "
             f"(`python -m tests.onnx_conformance`): {sum(totals.values())} run: "
             + ", ".join(f"{k} {totals.get(k, 0)}" for k in ("pass", "refused", "wrong", "crash", "skipped"))
             + " (refused: one `edgeslim: error:` line; skipped: integer / string / sequence inputs).")
    if not args.no_write:
        write_section("any-model", body)


if __name__ == "__main__":
    main()
