"""PTQ on the shared CIFAR ResNet-20: edgeslim vs onnxruntime's quantize_static and NNCF, seed 001's table,
calibrators x bits, and the same CLI command on ResNet-32. Writes its sections of BENCHMARKS.md.

    python -m bench.ptq_resnet20 [--shared ../shared] [--calib-size 512] [--test-size 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import peers
from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.data import Preprocess, calibration_indices, open_dataset
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.models import build_model


def _logits_torch(model, x: np.ndarray, bs: int = 500) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)]).numpy()


def _logits_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return ort_eval.predict(ort_eval.session(path, threads=0), x, 500)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--latency-rounds", type=int, default=500)
    ap.add_argument("--only", default="peers,seed001,calibrators,resnet32",
                    help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="edgeslim-bench-"))
    torch.set_num_threads(2)

    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    x_cal = train.batch(calibration_indices(len(train), args.calib_size, 0, train.labels))
    test_idx = np.arange(len(test)) if args.test_size >= len(test) else \
        calibration_indices(len(test), args.test_size, 0, test.labels)
    x_test, y = test.batch(test_idx), test.labels[test_idx]

    fp32_path = api.export_fp32_onnx(model, info.input_shape, work / "fp32.onnx")
    l_fp32 = _logits_torch(model, x_test)
    fp32_top1 = metrics.top1(l_fp32, y)
    print(f"FP32 top-1 {fp32_top1:.4f}", file=sys.stderr)

    if "peers" in only:
        _peers(model, info, x_cal, x_test, y, l_fp32, fp32_path, work, args.latency_rounds)
    if "seed001" in only:
        _seed001(model, x_cal, x_test, y, fp32_top1)
    if "calibrators" in only:
        _calibrators(model, x_cal, x_test, y, fp32_top1)
    if "resnet32" in only:
        _resnet32(shared, work)
    print(f"done; artifacts in {work}", file=sys.stderr)


def _peers(model, info, x_cal, x_test, y, l_fp32, fp32_path, work, latency_rounds) -> None:
    """edgeslim vs peers, same model, same calibration images."""
    fp32_top1 = metrics.top1(l_fp32, y)
    rows, paths = [], {"FP32": fp32_path}
    api.quantize(model, x_cal[:64], PTQConfig())  # warm-up: first-call initialisation, as the peers get

    def add_row(name, path, seconds, fq_top1=None):
        l_onnx = _logits_onnx(path, x_test)
        integer, total = ort_eval.integer_convs(path)
        rows.append([name, fq_top1 if fq_top1 is not None else "", metrics.top1(l_onnx, y),
                     metrics.flips(l_onnx, l_fp32), f"{integer}/{total}", seconds])
        paths[name] = path

    for i, (label, cfg) in enumerate([
            ("edgeslim W8A8 (default: asym act, min-max)", PTQConfig()),
            ("edgeslim W8A8 (asym act, mse)", PTQConfig(calibrator="mse")),
            ("edgeslim W8A8 (sym act, entropy)", PTQConfig(scheme="symmetric", calibrator="entropy")),
            ("edgeslim W8A8 (asym act, asym weights, min-max)", PTQConfig(w_scheme="asymmetric"))]):
        q = api.quantize(model, x_cal, cfg)
        p = api.export_onnx(q, work / f"edgeslim_{i}.onnx")
        add_row(label, p, q.seconds, metrics.top1(_logits_torch(q.model, x_test), y))
    for label, fn in [
        ("ORT quantize_static MinMax u8", lambda o: peers.ort_quantize_static(fp32_path, x_cal, o, method="minmax")),
        ("ORT quantize_static Entropy u8", lambda o: peers.ort_quantize_static(fp32_path, x_cal, o, method="entropy")),
        ("ORT quantize_static MinMax s8 symmetric",
         lambda o: peers.ort_quantize_static(fp32_path, x_cal, o, method="minmax", activation_type="int8",
                                             activation_symmetric=True)),
        ("NNCF quantize (performance)", lambda o: peers.nncf_quantize(fp32_path, x_cal, o)),
    ]:
        r = fn(work / (label.replace(" ", "_") + ".onnx"))
        if r.error:
            rows.append([label, "", "", "", "", f"failed: {r.error}"])
        else:
            add_row(label, r.path, r.seconds)
    # each model timed interleaved with FP32 only (as deployed: one model, warm caches); ratios per pair
    lat = {name: {b: ort_eval.latency_samples({"FP32": fp32_path, name: path}, info.input_shape, b,
                                              rounds=latency_rounds if b == 1 else 40) for b in (1, 64)}
           for name, path in paths.items() if name != "FP32"}
    med = {name: {b: {k: float(np.median(v)) for k, v in t[b].items()} for b in t} for name, t in lat.items()}
    for r in rows:
        if r[0] in lat:
            t = lat[r[0]]
            r += [med[r[0]][1][r[0]], ort_eval.paired_ratio(t[1], r[0], "FP32"),
                  med[r[0]][64][r[0]], ort_eval.paired_ratio(t[64], r[0], "FP32")]
    fp32_ms = {b: float(np.median([m[b]["FP32"] for m in med.values()])) for b in (1, 64)}
    body = ["## PTQ W8A8 on ResNet-20 (CIFAR-10 JPEG): edgeslim vs peers\n",
            f"Model `resnet20_cifar10jpeg.pt`; {len(x_cal)} calibration images (seeded, class-balanced) from "
            f"`cifar10-jpeg-train`; {len(y)} test images. FP32 top-1 (PyTorch) **{fp32_top1:.4f}**. "
            "Per-channel int8 weights everywhere. Top-1 of the ONNX model in onnxruntime; flips = test images "
            "whose predicted class differs from FP32's. Latency: onnxruntime CPU, 1 thread, "
            f"in one process, each model interleaved with the FP32 model (pairwise, so caches stay as warm as in "
            f"deployment), {latency_rounds} (batch 1) / 40 (batch 64) rounds; ms = median; ratio = median over rounds of "
            "model time / FP32 time in the same round; the FP32 row shows the median FP32 time over the pairs. "
            "Time to quantize: warm (imports and first-call initialisation excluded for every method), "
            "calibration included, data loading excluded.\n",
            table(["method", "fake-quant top-1", "ONNX top-1", "flips vs FP32", "integer convs (ORT)",
                   "time to quantize s", "ms b1", "x FP32 b1", "ms b64", "x FP32 b64"],
                  [["FP32 (ONNX)", "", metrics.top1(_logits_onnx(fp32_path, x_test), y), 0, "0/19", "",
                    fp32_ms[1], 1.0, fp32_ms[64], 1.0]] + rows)]
    write_section("ptq-resnet20-peers", "\n".join(body))


def _seed001(model, x_cal, x_test, y, fp32_top1) -> None:
    """Seed 001: single global scale vs profiled pow2 vs profiled pow2 + fusion."""
    seed_rows = []
    for label, kw in [("single global scale (pow2, signed; TVM-VTA style)", dict(scale="global", fuse=False)),
                      ("profiled per-tensor pow2", dict(scale="pow2", fuse=False)),
                      ("profiled per-tensor pow2 + Conv/Add+ReLU fusion", dict(scale="pow2", fuse=True))]:
        row = [label]
        for bits in (8, 6):
            cfg = PTQConfig(w_bits=bits, a_bits=bits, granularity="tensor", scheme="symmetric", **kw)
            q = api.quantize(model, x_cal, cfg)
            row.append(metrics.top1(_logits_torch(q.model, x_test), y))
        seed_rows.append(row)
    write_section("seed001", "\n".join([
        "## Seed 001's comparison on ResNet-20: global scale vs profiling vs profiling + fusion\n",
        "Symmetric, per-tensor weights, every scale a power of two (shift-only requantization, as on VTA); "
        "fake-quant top-1 on the same test images.\n",
        table(["method", "W8A8 top-1", "W6A6 top-1"], [["FP32", fp32_top1, fp32_top1]] + seed_rows)]))


def _calibrators(model, x_cal, x_test, y, fp32_top1) -> None:
    cal_rows = []
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        row = [calibrator]
        for wb, ab in ((8, 8), (6, 6), (4, 8), (4, 4)):
            q = api.quantize(model, x_cal, PTQConfig(w_bits=wb, a_bits=ab, calibrator=calibrator))
            row.append(f"{metrics.top1(_logits_torch(q.model, x_test), y):.4f} ({q.seconds:.1f} s)")
        cal_rows.append(row)
    write_section("calibrators", "\n".join([
        "## Calibrators x bit widths on ResNet-20 (round-to-nearest PTQ, per-channel symmetric weights, asymmetric activations)\n",
        f"Fake-quant top-1 (time to quantize). FP32 {fp32_top1:.4f}. Below 8 bits, plain PTQ is expected to lose "
        "accuracy; learned rounding (AdaRound / BRECQ) is a later issue.\n",
        table(["calibrator", "W8A8", "W6A6", "W4A8", "W4A4"], cal_rows)]))


def _resnet32(shared: Path, work: Path) -> None:
    """The same CLI command on ResNet-32."""
    out = work / "r32"
    cmd = [sys.executable, "-m", "edgeslim", "quantize", "resnet32", "--weights",
           str(shared / "models/resnet32-d509ac18.th"), "--calib-data", str(shared / "data/cifar10-jpeg-train.zip"),
           "--data", str(shared / "data/cifar10-jpeg-test.zip"), "--out", str(out), "--simulate-size", "0"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    shown = "edgeslim quantize resnet32 --weights ../shared/models/resnet32-d509ac18.th --calib-data " \
            "../shared/data/cifar10-jpeg-train.zip --data ../shared/data/cifar10-jpeg-test.zip --out runs/r32"
    write_section("resnet32", "\n".join([
        "## The same `quantize` command on ResNet-32\n", f"`{shown}`\n",
        table(["FP32 top-1", "fake-quant top-1", "flips", "ONNX INT8 top-1", "integer convs", "INT8/FP32 ms b1",
               "INT8/FP32 ms b64", "time to quantize s"],
              [[s["fp32"]["top1"], s["quantized"]["top1"], s["quantized"]["flips_vs_fp32"], s["onnx_int8"]["top1"],
                f"{s['onnx_int8']['integer_convs']}/{s['onnx_int8']['total_convs']}",
                s["latency_ms"]["int8_over_fp32"]["batch1"], s["latency_ms"]["int8_over_fp32"]["batch64"],
                s["time_to_quantize_s"]]])]))


if __name__ == "__main__":
    main()
