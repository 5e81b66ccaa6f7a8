"""How much slower a QAT training step is than an FP32 one: ResNet-20, CIFAR-10-shaped input, batch 128.

FP32 is the float ResNet-20 (BatchNorm in training mode) as a user fine-tunes it; QAT is the W4A4 model that the
``qat`` command trains: the frozen PTQ graph of ``api.quantize`` (MSE calibration, the image input kept 8-bit, as
``bench.qat_resnet20``) with ``algorithms.qat.attach``'s trainable quantizers, LSQ or STE. A step is what
``train.loop.fit`` does per batch: the quantizers' schedule (QAT), forward, loss, the finite check, zero_grad,
backward, SGD with Nesterov momentum and weight decay (``train.loop.sgd``), reading the loss and the top-1 count.

"before" is the plain formulas, one autograd op per elementwise step (``TrainableQuantizer.fused = False``: the
code of cebb983, the parent of 4acd58e), "after" the fused quantizer (``quant.qat._FakeQuant``). FP32 and the QAT
variants alternate in one process (F v1 F v2 F ..., the variant order shuffled per round); each QAT step's ratio is its
time over the mean of the FP32 steps on either side, and the table gives the median of those paired ratios, so a
load change from other processes affects both sides of a ratio.

    python -m bench.qat_step [--rounds 15] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from pathlib import Path

import torch

from edgeslim import api
from edgeslim.algorithms import qat
from edgeslim.config import MixedPlan, PTQConfig, QATConfig
from edgeslim.models import build_model
from edgeslim.quant.qat import TrainableQuantizer
from edgeslim.train.dist import Dist
from edgeslim.train.loop import Batch, _finite, sgd

from ._report import COMMIT, ROOT, table, write_section

IMAGE_INPUT_8BIT = {"layers": {"conv1": {"w": "int4", "a": "int8"}}}  # as bench.qat_resnet20's W4A4 runs
BATCH = 128


class Runner:
    """One model with its optimizer and loss, stepped as ``train.loop.fit`` steps it."""

    def __init__(self, model: torch.nn.Module, cfg: QATConfig, fused: bool | None) -> None:
        self.model, self.fused = model.train(), fused
        self.recipe = cfg.recipe(50_000)
        self.opt = sgd(model, self.recipe)
        self.loss = qat.qat_loss(cfg)
        self.schedule = (qat.QuantizerSchedule(model, cfg, self.recipe.steps, 391, self.loss)
                         if fused is not None else None)
        self.step_no = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.fused is not None:
            TrainableQuantizer.fused = self.fused
        t0 = time.perf_counter()
        batch = Batch(x, y, None, torch.Generator().manual_seed(self.step_no), self.step_no)
        if self.schedule is not None:
            self.schedule(batch)
        for g in self.opt.param_groups:
            g["lr"] = self.recipe.lr_at(self.step_no)
        out = self.model(batch.x)
        value = self.loss(out, batch.y, None)
        assert _finite(value, Dist())
        self.opt.zero_grad(set_to_none=True)
        value.backward()
        self.opt.step()
        _ = value.item(), int((out.argmax(1) == batch.y).sum())  # the loop's bookkeeping
        self.step_no += 1
        TrainableQuantizer.fused = True
        return time.perf_counter() - t0


def build(shared: Path, methods: list[str]) -> tuple[dict[str, Runner], str]:
    weights = shared / "models/resnet20_cifar10jpeg.pt"
    model, info = build_model("resnet20", weights if weights.exists() else None)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(128, *info.input_shape, generator=gen)
    ptq_config = PTQConfig(4, 4, calibrator="mse")
    q = api.quantize(copy.deepcopy(model).eval(), calib, ptq_config, plan=MixedPlan.from_dict(IMAGE_INPUT_8BIT),
                     input_shape=info.input_shape)
    runners = {"fp32": Runner(copy.deepcopy(model), QATConfig(4, 4), None)}
    for method in methods:
        cfg = QATConfig(4, 4, method=method)
        for fused in (False, True):
            gm = copy.deepcopy(q.model)
            qat.attach(gm, cfg)
            runners[f"{method} {'after' if fused else 'before'}"] = Runner(gm, cfg, fused)
    return runners, ("shared fine-tuned weights" if weights.exists() else "random weights")


def measure(runners: dict[str, Runner], threads: int, rounds: int, seed: int) -> dict[str, dict]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    variants = [k for k in runners if k != "fp32"]
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        for r in runners.values():
            r.step(x, y)
    times: dict[str, list[float]] = {k: [] for k in runners}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    order = random.Random(seed)
    for i in range(rounds):
        seq = variants[:]
        order.shuffle(seq)
        prev = runners["fp32"].step(x, y)
        times["fp32"].append(prev)
        for k in seq:
            t = runners[k].step(x, y)
            nxt = runners["fp32"].step(x, y)
            times[k].append(t)
            times["fp32"].append(nxt)
            ratios[k].append(t / ((prev + nxt) / 2))
            prev = nxt
        print(f"{threads} thread(s), round {i + 1}/{rounds}: " +
              ", ".join(f"{k} {ratios[k][-1]:.2f}x" for k in variants), flush=True)
    return {k: {"median_s": statistics.median(v), "ratios": ratios.get(k)} for k, v in times.items()}


def _quartiles(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--methods", default="lsq,ste")
    ap.add_argument("--no-write", action="store_true", help="print only; BENCHMARKS.md untouched")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    runners, weights = build(args.shared, methods)
    rows, results = [], {}
    for n in [int(v) for v in args.threads.split(",")]:
        res = measure(runners, n, args.rounds, seed=n)
        results[n] = res
        fp = res["fp32"]["median_s"]
        for m in methods:
            b, a = res[f"{m} before"], res[f"{m} after"]
            rb, ra = statistics.median(b["ratios"]), statistics.median(a["ratios"])
            rows.append([n, m, f"{fp * 1e3:.0f}", f"{b['median_s'] * 1e3:.0f}", f"{a['median_s'] * 1e3:.0f}",
                         f"{rb:.2f}x ({_quartiles(b['ratios'])})", f"{ra:.2f}x ({_quartiles(a['ratios'])})",
                         "yes" if ra <= 1.3 else "no"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    load1 = os.getloadavg()
    body = (
        "## QAT training step vs FP32 (ResNet-20, batch 128)\n\n"
        f"One training step of ResNet-20 ({weights}) on a random CIFAR-10-shaped batch of {BATCH}, as `train.loop.fit` "
        "runs it (forward, cross-entropy, backward, SGD with Nesterov momentum and weight decay): FP32 (the float "
        "model, BatchNorm training) and W4A4 QAT (the `qat` command's model: PTQ start with MSE calibration, image "
        "input 8-bit, `algorithms.qat.attach`). *Before*: the plain fake-quant formulas (one autograd op per "
        "elementwise step: the code of cebb983, the parent of 4acd58e, kept as `TrainableQuantizer.fused = False`); "
        "*after*: the fused quantizer `quant.qat._FakeQuant`. FP32 and QAT steps alternate in one process; each "
        "ratio is a QAT step over the mean of the FP32 steps beside it, median (and quartiles) over "
        f"{args.rounds} rounds. Step times are medians in ms. Goal (issue 19): QAT <= 1.3x FP32.\n\n"
        + table(["threads", "QAT method", "FP32 ms", "QAT before ms", "QAT after ms", "QAT / FP32 before",
                 "QAT / FP32 after", "<= 1.3x"], rows)
        + f"\n\nOther work was running on the machine (load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the "
        f"end, 2 cores): absolute times are inflated and noisy, the paired ratios much less so. "
        f"{time.perf_counter() - t0:.0f} s in all.\n")
    print(body)
    if not args.no_write:
        write_section("qat-step", body)


if __name__ == "__main__":
    main()
