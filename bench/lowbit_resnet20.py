"""Low-bit PTQ on the shared CIFAR ResNet-20: round-to-nearest, CLE + bias correction, AdaRound and BRECQ at
W8A8 / W4A8 / W4A4 / W3A8 / W2A8, with 512 and 1024 calibration images; then the best method's headline runs.
Writes the ``lowbit-*`` sections of BENCHMARKS.md. Results are cached per run in ``--cache`` (JSON), so an
interrupted benchmark resumes; delete the file to measure again.

    python -m bench.lowbit_resnet20 [--shared ../shared] [--iters 300] [--long-iters 1000] [--calib 512,1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import peers
from bench._data import resnet20_cifar
from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import MixedPlan, PTQConfig
from edgeslim.data import calibration_indices
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval

BITS = [(8, 8), (4, 8), (4, 4), (3, 8), (2, 8)]
METHODS = {  # label -> (algorithms, calibrator)
    "min-max (RTN)": ((), "minmax"),
    "+CLE+BC": (("cle", "bias-correction"), "minmax"),
    "AdaRound": (("adaround",), "minmax"),
    "BRECQ": (("brecq",), "minmax"),
}
FIRST_INPUT_8BIT = {"layers": {"conv1": {"w": "int4", "a": "int8"}}}  # the image stays 8-bit; conv1's weights 4-bit


def _logits(model, x: np.ndarray, bs: int = 500) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)]).numpy()


class Runner:
    def __init__(self, model, info, x_test, y, cache: Path, work: Path) -> None:
        self.model, self.info, self.x_test, self.y, self.cache, self.work = model, info, x_test, y, cache, work
        self.results = json.loads(cache.read_text()) if cache.exists() else {}

    def run(self, key: str, x_cal: np.ndarray, config: PTQConfig, plan: dict | None = None,
            onnx: bool = False) -> dict:
        if key in self.results and (not onnx or "onnx_top1" in self.results[key]):
            return self.results[key]
        print(f"[{key}]", file=sys.stderr, flush=True)
        q = api.quantize(self.model, x_cal, config, plan=MixedPlan.from_dict(plan) if plan else None,
                         input_shape=self.info.input_shape, progress=True)
        r = {"top1": metrics.top1(_logits(q.model, self.x_test), self.y), "seconds": q.seconds}
        if onnx:
            path = api.export_onnx(q, self.work / "m.onnx")
            r["onnx_top1"] = metrics.top1(ort_eval.predict(ort_eval.session(path, threads=0), self.x_test, 500), self.y)
            r["onnx_bytes"] = path.stat().st_size
        for method, units in q.reports.items():
            r["units_kept"] = f"{sum(u['kept'] for u in units)}/{len(units)}"
        print(f"  top-1 {r['top1']:.4f}  {r['seconds']:.0f} s", file=sys.stderr, flush=True)
        self.results[key] = r
        self.save()
        return r

    def save(self) -> None:
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.cache)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--calib", default="512,1024", help="calibration set sizes")
    ap.add_argument("--iters", type=int, default=300, help="AdaRound / BRECQ iterations per unit in the grid")
    ap.add_argument("--long-iters", type=int, default=1000, help="iterations for the headline runs")
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "edgeslim-lowbit.json"))
    ap.add_argument("--only", default="grid,headline,peers")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shared = Path(args.shared)
    model, info, train, test = resnet20_cifar(shared)
    test_idx = np.arange(len(test)) if args.test_size >= len(test) else \
        calibration_indices(len(test), args.test_size, 0, test.labels)
    x_test, y = test.batch(test_idx), test.labels[test_idx]
    fp32 = metrics.top1(_logits(model, x_test), y)
    runner = Runner(model, info, x_test, y, Path(args.cache), Path(tempfile.mkdtemp(prefix="edgeslim-lowbit-")))
    sizes = [int(s) for s in args.calib.split(",")]
    cal = {n: train.batch(calibration_indices(len(train), n, 0, train.labels)) for n in sizes}
    only = set(args.only.split(","))
    if "grid" in only:
        _grid(runner, cal, fp32, args.iters)
    if "headline" in only:
        _headline(runner, cal[max(sizes)] if 1024 not in cal else cal[1024], fp32, args.long_iters)
    if "peers" in only:
        _peers(runner, cal, fp32, args.long_iters)


def _grid(runner: Runner, cal: dict, fp32: float, iters: int) -> None:
    header = ["weights / acts"]
    for n in cal:
        header += [f"{m} top-1 ({n})" for m in METHODS]
    rows, times = [], []
    for w, a in BITS:
        row, trow = [f"W{w}A{a}"], [f"W{w}A{a}"]
        for n, x in cal.items():
            for label, (algos, calibrator) in METHODS.items():
                cfg = PTQConfig(w_bits=w, a_bits=a, algorithms=algos, calibrator=calibrator, iters=iters,
                                calib_size=n)
                r = runner.run(f"grid/{n}/W{w}A{a}/{label}/{iters}", x, cfg)
                row.append(f"{r['top1']:.4f} ({100 * (r['top1'] - fp32):+.2f})")
                trow.append(f"{r['seconds']:.0f}")
        rows.append(row)
        times.append(trow)
    body = ["## Low-bit PTQ on ResNet-20: round-to-nearest, CLE + bias correction, AdaRound, BRECQ\n",
            f"Model `resnet20_cifar10jpeg.pt`, FP32 top-1 **{fp32:.4f}** on {len(runner.y)} `cifar10-jpeg-test` images. "
            "Calibration images: seeded, class-balanced subsets of `cifar10-jpeg-train` (the sizes in brackets). "
            "Every conv and the linear layer at the weight bits shown, per-channel symmetric weights; "
            "activations asymmetric per tensor, min-max calibrated (the model input too, so at A4 the image is "
            f"4-bit). AdaRound and BRECQ: {iters} iterations per unit, batch 32, Adam (rounding lr 1e-3; BRECQ's "
            "activation step sizes lr 4e-5), regularizer 0.01 with beta 20 -> 2 after a 20% warm-up; BRECQ's units "
            "are the stem, the nine residual blocks and the linear layer. Top-1 of the fake-quant model (the "
            "exported ONNX agrees within one LSB; the headline table below runs it); in brackets, points vs FP32.\n",
            table(header, rows),
            "\nTime to quantize (s: calibration, reconstruction, bias correction and lowering; data loading "
            "excluded; 2 threads):\n",
            table(["weights / acts"] + [f"{m} ({n})" for n in cal for m in METHODS], times)]
    write_section("lowbit-grid", "\n".join(body))


def _headline(runner: Runner, x_cal: np.ndarray, fp32: float, iters: int) -> None:
    n = len(x_cal)
    runs = [
        ("W4A8 BRECQ", PTQConfig(w_bits=4, a_bits=8, algorithms=("brecq",), iters=iters, calib_size=n), None),
        ("W4A8 AdaRound", PTQConfig(w_bits=4, a_bits=8, algorithms=("adaround",), iters=iters, calib_size=n), None),
        ("W4A4 min-max (RTN)", PTQConfig(w_bits=4, a_bits=4, calib_size=n), None),
        ("W4A4 mse (RTN)", PTQConfig(w_bits=4, a_bits=4, calibrator="mse", calib_size=n), None),
        ("W4A4 BRECQ, mse init", PTQConfig(w_bits=4, a_bits=4, calibrator="mse", algorithms=("brecq",), iters=iters,
                                          calib_size=n), None),
        ("W4A4 BRECQ, mse init, 8-bit image input", PTQConfig(w_bits=4, a_bits=4, calibrator="mse",
                                                              algorithms=("brecq",), iters=iters, calib_size=n),
         FIRST_INPUT_8BIT),
        ("W2A8 mse (RTN)", PTQConfig(w_bits=2, a_bits=8, calibrator="mse", calib_size=n), None),
        ("W2A8 BRECQ, mse init", PTQConfig(w_bits=2, a_bits=8, calibrator="mse", algorithms=("brecq",), iters=iters,
                                          calib_size=n), None),
        ("W4A4 BRECQ + Fisher, mse init, 8-bit image input",
         PTQConfig(w_bits=4, a_bits=4, calibrator="mse", algorithms=("brecq",), iters=iters, fisher=True,
                   calib_size=n), FIRST_INPUT_8BIT),
    ]
    rows = []
    for label, cfg, plan in runs:
        r = runner.run(f"headline/{n}/{label}/{iters}", x_cal, cfg, plan, onnx=True)
        rows.append([label, r["top1"], f"{100 * (r['top1'] - fp32):+.2f}", r["onnx_top1"],
                     f"{100 * (r['onnx_top1'] - fp32):+.2f}", r.get("units_kept", ""), f"{r['seconds']:.0f}",
                     f"{r['onnx_bytes'] / 1024:.0f}"])
    body = ["## Low-bit headline runs: W4A8, W4A4 and W2A8 with the best method\n",
            f"{n} calibration images, {iters} iterations per unit, {len(runner.y)} test images, FP32 top-1 "
            f"**{fp32:.4f}**. Every layer's weights at the bits shown (int8 containers with 4- or 2-bit ranges in "
            "the ONNX file). "
            "`mse init`: activation ranges (and weight clipping) from the MSE calibrator before BRECQ learns. `Fisher`: "
            "BRECQ's loss weighted by the squared gradient of the KL to the FP32 predictions (`--fisher`). "
            "`8-bit image input`: the plan `{\"conv1\": {\"w\": \"int4\", \"a\": \"int8\"}}` keeps only the model "
            "input at 8 bits (conv1's weights stay 4-bit). ONNX top-1: the exported QDQ model in onnxruntime. "
            "Units kept: units whose reconstruction beat round-to-nearest on the calibration images.\n",
            table(["run", "fake-quant top-1", "vs FP32 (pts)", "ONNX top-1", "ONNX vs FP32", "units kept",
                   "time to quantize s", "ONNX KiB"], rows)]
    write_section("lowbit-headline", "\n".join(body))


def _peers(runner: Runner, cal: dict, fp32: float, iters: int) -> None:
    """Brevitas at W4A8 / W4A4 on the same model, calibration images and test images (optional dependency)."""
    rows = []
    n = max(cal)  # the headline runs' calibration set
    for x in (cal[n],):
        for w, a in ((4, 8), (4, 4)):
            for label, kw in (("Brevitas (percentile, bias correction)", {}),
                              ("Brevitas + GPTQ", {"gptq": True}),
                              ("Brevitas, first conv 8-bit (layerwise)", {"first_conv_8bit": True})):
                key = f"peers/{n}/W{w}A{a}/{label}"
                r = runner.results.get(key)
                if r is None:
                    print(f"[{key}]", file=sys.stderr, flush=True)
                    res = peers.brevitas_ptq(runner.model, x, w_bits=w, a_bits=a, **kw)
                    r = ({"error": res.error} if res.error else
                         {"top1": metrics.top1(_logits(res.model, runner.x_test), runner.y), "seconds": res.seconds})
                    runner.results[key] = r
                    runner.save()
                rows.append([f"W{w}A{a}", n, label] + (
                    [f"failed: {r['error']}", "", ""] if "error" in r else
                    [f"{r['top1']:.4f}", f"{100 * (r['top1'] - fp32):+.2f}", f"{r['seconds']:.0f}"]))
            for key, r in runner.results.items():  # edgeslim's runs on the same images, from the headline table
                if key.startswith(f"headline/{n}/W{w}A{a} BRECQ"):
                    rows.append([f"W{w}A{a}", n, "edgeslim " + key.split("/")[2][len(f"W{w}A{a} "):],
                                 f"{r['top1']:.4f}", f"{100 * (r['top1'] - fp32):+.2f}", f"{r['seconds']:.0f}"])
    if not rows:
        return
    body = ["## Low-bit PTQ peers: Brevitas on the same ResNet-20\n",
            f"Same model, calibration and {len(runner.y)} test images as above (FP32 **{fp32:.4f}**). Brevitas "
            f"{_version('brevitas')} through its ImageNet example's `quantize_model` (graph mode; per-channel "
            "symmetric float-scale weights; static per-tensor symmetric activations, 99.999th-percentile "
            "calibration), then bias correction (and GPTQ where named). Top-1 of Brevitas' fake-quant PyTorch "
            "model. Compare with the headline table above (same calibration and test images). MCT and NNCF are not run "
            "here: see the issue 5 note.\n",
            table(["bits", "calibration images", "method", "top-1", "vs FP32 (pts)", "time s"], rows)]
    write_section("lowbit-peers", "\n".join(body))


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
