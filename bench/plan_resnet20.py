"""``edgeslim plan`` by cost on the shared ResNet-20: a target low-bit PTQ meets alone (150 KiB / 1 point), one that
needs structure as well (64 KiB / 3 points), one that cannot be met (16 KiB / 0.5 points), next to plain W4A8 BRECQ
with the same calibration and iterations. Target ``mcu-w4``: sizes count packed 4-bit weights (two a byte) and
int32 biases, as the target stores them; the ONNX files onnxruntime times hold the same values in int8 containers.

Writes the ``plan-cost`` section of BENCHMARKS.md. Each run's job folder under ``--work`` is reused when its
``summary.json`` exists. One thread (the machine's 2 cores are shared).

    python -m bench.plan_resnet20 --train-size 5000 --budget-epochs 1 --lowbit-iters 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench._data import resnet20_cifar
from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import FinetuneConfig, PlanOptions, PTQConfig, Requirement
from edgeslim.eval import ort as ort_eval
from edgeslim.jobs.plan import run_plan, split_holdout
from edgeslim.jobs.plan_roads import graph_bytes
from edgeslim.targets import TARGETS
from edgeslim.tasks import onnx_top1
from edgeslim.train.data import load_train

TARGET = TARGETS["mcu-w4"]
PLANS = {"low-bit alone": Requirement(max_drop=1.0, max_size_kb=150),
         "needs structure": Requirement(max_drop=3.0, max_size_kb=64),
         "cannot be met": Requirement(max_drop=0.5, max_size_kb=16)}


def plain_brecq(model, info, train_ds, test, args, out: Path) -> dict:
    """W4A8 BRECQ on the whole model with the planner's calibration images (same split and seed)."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    train, _ = split_holdout(load_train(train_ds, info, args.train_size, 0), 1000, 0)
    idx = np.random.default_rng(0).choice(len(train.y), min(512, len(train.y)), replace=False)
    t0 = time.perf_counter()
    config = replace(TARGET.ptq_config(PTQConfig(calib_size=512)), w_bits=4, algorithms=("brecq",),
                     iters=args.lowbit_iters)  # the target's scale rule, then the bits (ptq_config sets its own)
    q = api.quantize(model, train.x[idx].numpy(), config, input_shape=info.input_shape, progress=True)
    seconds = time.perf_counter() - t0
    fp32 = api.export_fp32_onnx(model, info.input_shape, out / "fp32.onnx")
    path = api.export_onnx(q, out / "w4a8_brecq.onnx")
    top1 = onnx_top1({"fp32": fp32, "w4": path}, test, 500, "scoring")
    lat = ort_eval.latency_samples({"fp32": fp32, "m": path}, info.input_shape, 1, threads=1, rounds=100)
    s = {"fp32_top1": top1["fp32"], "top1": top1["w4"], "size_bytes": graph_bytes(q.intgraph, TARGET),
         "latency_ms": statistics.median(lat["m"]), "latency_vs_fp32": ort_eval.paired_ratio(lat, "m", "fp32"),
         "seconds": seconds}
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    return s


def plan(model, info, train, test, req: Requirement, args, out: Path) -> dict:
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    opts = PlanOptions(budget_epochs=args.budget_epochs, finetune=FinetuneConfig(epochs=1.0, lr=0.01),
                       lowbit_iters=args.lowbit_iters)
    return run_plan(model, info, train, test, out, target=TARGET, requirement=req, options=opts,
                    train_size=args.train_size)


def section(name: str, req: Requirement, s: dict) -> str:
    fp32 = s["fp32_top1"]
    rows = [[r["on"], r["road"], f"{r['holdout_top1']:.4f}", f"{r['top1']:.4f}", f"{(r['top1'] - fp32) * 100:+.2f}",
             f"{r['size_bytes'] / 1024:.1f}", f"{r['latency_vs_fp32']:.2f}", f"{r['step_seconds']:.0f}",
             ("**taken**: " if r.get("taken") else "") + "; ".join(r.get("why", ["reference"]))] for r in s["steps"]]
    skipped = "\n".join(f"- {k}: {v}" for k, v in s["skipped"].items())
    return (f"### {name}: {req.max_size_kb:g} KiB, {req.max_drop:g} points\n\n"
            + table(["structure", "road", "held-out top-1", "test top-1", "vs FP32 (pts)", "KiB", "latency / FP32",
                     "s", "why"], rows)
            + f"\n\n{s['statement']}. Total {s['total_seconds']:.0f} s.\n\nSkipped:\n{skipped}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edgeslim-plan-cost"))
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--budget-epochs", type=float, default=1.0)
    ap.add_argument("--lowbit-iters", type=int, default=300)
    ap.add_argument("--only", default=",".join(PLANS) + ",brecq")
    ap.add_argument("--section", default="plan-cost", help="BENCHMARKS.md section to write (a second setting: "
                    "another name, e.g. plan-cost-50k)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, info, train, test = resnet20_cifar(Path(args.shared))
    work, only = Path(args.work), set(args.only.split(","))
    results = {name: plan(model, info, train, test, req, args, work / name.replace(" ", "-"))
               for name, req in PLANS.items() if name in only}
    ref = plain_brecq(model, info, train, test, args, work / "brecq") if "brecq" in only else None
    body = ["## Planning by cost on ResNet-20: quantization roads first, structure when needed"
            + ("" if args.section == "plan-cost" else f" ({args.train_size} training images)") + "\n",
            f"`edgeslim plan` on `resnet20_cifar10jpeg.pt`, target `mcu-w4` (sizes: packed k-bit weights + int32 "
            f"biases, what the target stores; the ONNX files hold the same values in int8 containers). "
            f"{args.train_size} training images ({min(1000, args.train_size // 4)} held out of fine-tuning: every "
            f"choice is made on them), 512 calibration images, BRECQ {args.lowbit_iters} iterations per unit, "
            f"fine-tuning budget {args.budget_epochs:g} epoch(s) of the rest shared by the structural steps; test "
            "top-1 on all 10,000 `cifar10-jpeg-test` images (reported, never used to choose). Latency: onnxruntime, "
            "batch 1, one thread, paired with the FP32 file in the same run. Each row is one measured candidate: "
            "`structure` is the structural state it was built on, `road` how it is deployed.\n"]
    if ref:
        body.append(f"Plain W4A8 BRECQ (same calibration, {args.lowbit_iters} iterations): test top-1 "
                    f"{ref['top1']:.4f} ({(ref['top1'] - ref['fp32_top1']) * 100:+.2f} points), "
                    f"{ref['size_bytes'] / 1024:.1f} KiB packed, latency {ref['latency_vs_fp32']:.2f}x FP32, "
                    f"{ref['seconds']:.0f} s.\n")
    for name, s in results.items():
        body.append(section(name, PLANS[name], s))
    write_section(args.section, "\n".join(body))


if __name__ == "__main__":
    main()
