"""Quantization-aware training on the shared CIFAR ResNet-20 (CIFAR-10 JPEG train / test).

Sections of BENCHMARKS.md:
* ``qat-w4a4``: PTQ vs QAT (LSQ, with and without distillation from the FP32 model);
* ``qat-w2a2``: uniform + LSQ, APoT + STE, APoT + EWGS (3 seeds), DSQ, DAQ, with each run's loss curve;
* ``qat-resume``: a run killed with SIGKILL during its second epoch and resumed, next to the same run
  uninterrupted (both through the ``edgeslim qat`` command line).

Every run writes its ``edgeslim qat`` output folder under ``--work``; a run whose ``summary.json`` exists is not
run again, so the runs can be split over processes (``--runs``) and the tables written afterwards
(``--report``). The machine has 2 cores: run at most two processes of one thread each.

    python -m bench.qat_resnet20 --runs w4a4 --threads 1      # and, beside it, --runs w2a2 --threads 1
    python -m bench.qat_resnet20 --runs resume --threads 1
    python -m bench.qat_resnet20 --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench._data import resnet20_cifar
from bench._report import COMMIT, ROOT, table, write_section
from edgeslim.config import MixedPlan, PTQConfig, QATConfig
from edgeslim.jobs.qat import run_qat
from edgeslim.tasks import Classify

IMAGE_INPUT_8BIT = {"layers": {"conv1": {"w": "int4", "a": "int8"}}}  # the image stays 8-bit, conv1's weights 4-bit
ENDS_8BIT = {"layers": {"conv1": "int8", "linear": "int8"}}  # first conv and last layer W8A8 (APoT / EWGS practice)
W2A2_STEPS = 250


BRECQ_START = ("brecq",)  # the W4A4 PTQ start of the low-bit benchmark: MSE calibration + BRECQ, 1000 iterations


def runs() -> dict[str, tuple[QATConfig, dict]]:
    r = {
        "w4a4-lsq": (QATConfig(4, 4, method="lsq", epochs=1), IMAGE_INPUT_8BIT),
        "w4a4-lsq-kd": (QATConfig(4, 4, method="lsq", epochs=1, kd=True), IMAGE_INPUT_8BIT),
        "w4a4-brecq-lsq-kd-3ep": (QATConfig(4, 4, method="lsq", epochs=3, kd=True), IMAGE_INPUT_8BIT),
        "w4a4-lsq-kd-lr3": (QATConfig(4, 4, method="lsq", epochs=1, kd=True, lr=0.003), IMAGE_INPUT_8BIT),
        "w4a4-lsq-kd-lr3-4ep": (QATConfig(4, 4, method="lsq", epochs=4, kd=True, lr=0.003), IMAGE_INPUT_8BIT),
        "w4a4-lsq-kd-lr3-8ep": (QATConfig(4, 4, method="lsq", epochs=8, kd=True, lr=0.003), IMAGE_INPUT_8BIT),
    }
    w2 = dict(epochs=None, max_steps=W2A2_STEPS)
    r["w2a2-uniform-lsq"] = (QATConfig(2, 2, method="lsq", **w2), ENDS_8BIT)
    r["w2a2-apot-ste"] = (QATConfig(2, 2, quantizer="apot", method="ste", **w2), ENDS_8BIT)
    for seed in (0, 1, 2):
        r[f"w2a2-apot-ewgs-s{seed}"] = (QATConfig(2, 2, quantizer="apot", method="ewgs", seed=seed, **w2), ENDS_8BIT)
    r["w2a2-apot-ewgs-s0-2ep"] = (QATConfig(2, 2, quantizer="apot", method="ewgs", epochs=2), ENDS_8BIT)  # longer
    r["w2a2-uniform-dsq"] = (QATConfig(2, 2, method="dsq", **w2), ENDS_8BIT)
    r["w2a2-uniform-daq"] = (QATConfig(2, 2, method="daq", **w2), ENDS_8BIT)
    return r


def run_group(group: str, shared: Path, work: Path) -> None:
    model, info, train, test = resnet20_cifar(shared)
    wanted = [g for g in group.split(",") if g]
    for key, (cfg, plan) in runs().items():
        if not any(key.startswith(g) for g in wanted) or (work / key / "summary.json").exists():
            continue
        print(f"[{key}]", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        algorithms = BRECQ_START if "-brecq-" in key else ()
        s = run_qat(model, info, Classify(train, test), cfg, PTQConfig(cfg.w_bits, cfg.a_bits, calibrator="mse", seed=cfg.seed,
                                                             algorithms=algorithms, iters=1000),
                    work / key, plan=MixedPlan.from_dict(plan), resume=(work / key / "checkpoint.pt").exists(),
                    val_size=2000 if key.startswith("w2a2") else None)
        s["wall_s"] = time.perf_counter() - t0
        s["code_commit"] = COMMIT
        (work / key / "summary.json").write_text(json.dumps(s, indent=2))


def _cli(out: Path, shared: Path, threads: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgeslim", "qat", "resnet20", "--weights", str(shared / "models/resnet20_cifar10jpeg.pt"),
            "--train-data", str(shared / "data/cifar10-jpeg-train.zip"), "--data", str(shared / "data/cifar10-jpeg-test.zip"),
            "--train-size", "5000", "--val-size", "2000", "--epochs", "3", "--w-bits", "4", "--a-bits", "4",
            "--torch-threads", str(threads), "--seed", "0", "--out", str(out)] + (["--resume"] if resume else [])


def run_resume(shared: Path, work: Path, threads: int) -> None:
    """The same 3-epoch run twice: once uninterrupted, once killed (SIGKILL) during epoch 2 and resumed."""
    plain, killed = work / "resume-plain", work / "resume-killed"
    log = {}
    if not (plain / "summary.json").exists():
        subprocess.run(_cli(plain, shared, threads), check=True)
    if not (killed / "summary.json").exists():
        if not (killed / "checkpoint.pt").exists():
            proc = subprocess.Popen(_cli(killed, shared, threads), start_new_session=True)
            while not (killed / "checkpoint.pt").exists():  # epoch 1 done
                if proc.poll() is not None:
                    raise SystemExit("the run to be killed ended before its first checkpoint")
                time.sleep(0.5)
            time.sleep(15)  # into epoch 2
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            state = torch.load(killed / "checkpoint.pt", weights_only=True)
            log = {"killed_during_epoch": int(state["epoch"]) + 1, "return_code": proc.returncode}
            (work / "resume-kill.json").write_text(json.dumps(log))
        subprocess.run(_cli(killed, shared, threads, resume=True), check=True)


def _divergence(curve: list[float], div: dict | None, top1: float, classes: int = 10) -> str:
    """How a run went wrong, if it did: a non-finite loss, a loss above 1.5 x chance level, a collapse to chance."""
    chance = math.log(classes)
    if div:
        return f"yes: non-finite loss at step {div['step']}"
    notes = []
    if curve and max(curve) > 1.5 * chance:
        notes.append(f"loss exploded to {max(curve):.1f} (chance {chance:.2f})")
    if top1 <= 1.5 / classes:
        notes.append("collapsed to chance")
    return "yes: " + ", ".join(notes) if notes else "no"


def _row_w2(key: str, s: dict) -> list:
    cfg = s["config"]
    hist = s["history"]
    curve = [v for h in hist for v in h["loss_curve"]]
    div = s["training"].get("diverged")
    onnx = s["onnx"].get("top1", "not exported")
    start = s.get("init", s["ptq"])["top1"]
    return [key, cfg["quantizer"] + ("" if cfg["a_quantizer"] in (None, cfg["quantizer"]) else "/" + cfg["a_quantizer"]),
            cfg["method"], cfg["seed"], start, s["qat"]["top1"], onnx,
            " / ".join(f"{h['ewgs_delta_mean']:.3f}" + (f" (max {h['ewgs_delta_max']:.2f})" if "ewgs_delta_max" in h else "")
                       for h in hist) if "ewgs_delta_mean" in hist[-1] else "-",
            " ".join(f"{v:.2f}" for v in curve[::max(1, len(curve) // 12)]),
            _divergence(curve, div, s["qat"]["top1"]),
            s["training"]["steps"], round(s["training"]["seconds"])]


def _commits(summaries) -> str:
    """Which commits' code made the runs (``code_commit``, written when a run finishes)."""
    found = sorted({s.get("code_commit", "unrecorded") for s in summaries if s})
    return "Runs made from commit(s) " + ", ".join(found) + "."


def report(work: Path) -> None:
    def load(key):
        p = work / key / "summary.json"
        return json.loads(p.read_text()) if p.exists() else None

    w4 = [(k, load(k)) for k in ("w4a4-lsq", "w4a4-lsq-kd", "w4a4-brecq-lsq-kd-3ep", "w4a4-lsq-kd-lr3")]  # qat-w4a4
    w4 = [(k, s) for k, s in w4 if s]
    if w4:
        fp32 = w4[0][1]["fp32"]["top1"]
        rows = [["FP32", "-", fp32, "-", 0.0, "-", "-"], ["PTQ W4A4 (MSE, round to nearest)", "-", w4[0][1]["ptq"]["top1"], "-",
                (w4[0][1]["ptq"]["top1"] - fp32) * 100, "-", round(w4[0][1]["ptq"]["seconds"])]]
        for k, s in w4:
            if s["ptq"]["config"]["algorithms"]:
                rows.append([f"PTQ W4A4 + {'+'.join(s['ptq']['config']['algorithms']).upper()} (the next row's start)",
                             "-", s["ptq"]["top1"], "-", (s["ptq"]["top1"] - fp32) * 100, "-", round(s["ptq"]["seconds"])])
            start = "+".join(s["ptq"]["config"]["algorithms"]).upper() or "RTN"
            rows.append([f"QAT LSQ{' + KD' if s['config']['kd'] else ''} from {start}, lr {s['config']['lr']:g}", f"{s['training']['steps']} steps "
                         f"({s['training']['steps'] / s['training']['steps_per_epoch']:.2f} epochs)", s["qat"]["top1"],
                         s["onnx"].get("top1", "-"), (s["qat"]["top1"] - fp32) * 100, s["history"][-1]["loss"],
                         round(s["training"]["seconds"])])
        body = ("## QAT W4A4 on ResNet-20: PTQ vs LSQ, with and without distillation\n\n"
                "Shared ResNet-20 (FP32 fine-tuned on CIFAR-10 JPEG), 50,000 training images, 10,000 test images. "
                "All layers 4-bit weights and 4-bit activations except the image input, which stays 8-bit "
                "(conv1's weights are 4-bit). QAT starts from the PTQ model (MSE calibration on 512 training images), "
                "BN folded, SGD lr 0.001 cosine, batch 128, weight decay 5e-4, random crop + flip, one thread. "
                "KD: KL divergence to the FP32 model's predictions (T = 1, no label term). The BRECQ start: "
                "`--algorithm brecq`, 1000 iterations per block on the same 512 images (the learned codes become the "
                "weights QAT starts from). Target of the issue: QAT within 0.5 points of FP32.\n\n"
                + table(["model", "budget", "test top-1", "ONNX top-1", "vs FP32 (points)", "final train loss",
                         "train s"], rows) + "\n\n" + _commits(s for _, s in w4))
        write_section("qat-w4a4", body)
    longs = [(k, load(k)) for k in ("w4a4-lsq-kd-lr3-4ep", "w4a4-lsq-kd-lr3-8ep")]
    longs = [(k, s) for k, s in longs if s]
    if longs:
        fp32 = longs[0][1]["fp32"]["top1"]
        parts = ["## QAT W4A4 on ResNet-20, longer: LSQ + KD, lr 0.003, 4 and 8 epochs\n\n"
                 "The setup of the `qat-w4a4` section (8-bit image input, MSE PTQ start, BN folded, KD), all 50,000 "
                 f"training images, cosine schedule from lr 0.003, one thread. FP32 {fp32:.4f}, PTQ "
                 f"{longs[0][1]['ptq']['top1']:.4f}. Target of the issue: within 0.5 points of FP32. Per-epoch "
                 "validation uses the training graph's quantizers; the final numbers are after the scales are written "
                 "back into the PTQ modules (what is exported)."]
        for k, s in longs:
            rows = [[f"epoch {i + 1}", h["loss"], h.get("train_top1", "-"), h["val_top1"]] for i, h in enumerate(s["history"])]
            parts.append(f"### {k}: **QAT {s['qat']['top1']:.4f}** ({(s['qat']['top1'] - fp32) * 100:+.2f} points vs FP32), "
                         f"ONNX {s['onnx'].get('top1', '-')}, {s['training']['steps']} steps in "
                         f"{s['training']['seconds'] / 60:.0f} min\n\n"
                         + table(["epoch", "train loss", "train top-1", "test top-1"], rows))
        write_section("qat-w4a4-long", "\n\n".join(parts) + "\n\n" + _commits([s for _, s in longs]))
    w2 = [(k, load(k)) for k in runs() if k.startswith("w2a2")]
    w2 = [(k, s) for k, s in w2 if s]
    if w2:
        fp32 = w2[0][1]["fp32"]["top1"]
        body = ("## QAT W2A2 on ResNet-20: uniform + LSQ, APoT + STE, APoT + EWGS (3 seeds), DSQ, DAQ\n\n"
                f"FP32 {fp32:.4f}. 2-bit weights and activations everywhere except the first conv and the last layer "
                f"(W8A8, as APoT and EWGS do); non-uniform levels go on weights and ReLU outputs, the signed "
                f"pre-addition outputs keep a uniform grid (asymmetric). Each run: {W2A2_STEPS} steps of batch 128 (0.64 epoch; "
                "the -2ep run: 2 epochs) from the PTQ start, SGD lr 0.001 cosine, one thread. 'start' is the model before training (uniform PTQ, or the "
                "APoT levels with MSE-fitted scales). The loss curve is the mean training loss per 25 steps.\n\n"
                + table(["run", "levels", "estimator", "seed", "start top-1", "QAT top-1", "ONNX top-1",
                         "EWGS delta (mean per epoch)", "training loss, mean per 25 steps (long runs: every k-th)", "diverged", "steps", "train s"], [_row_w2(k, s) for k, s in w2])
                + "\n\n" + _commits(s for _, s in w2))
        write_section("qat-w2a2", body)
    plain, killed = load("resume-plain"), load("resume-killed")
    if plain and killed:
        kill = json.loads((work / "resume-kill.json").read_text()) if (work / "resume-kill.json").exists() else {}
        a, b = (torch.load(work / f"{k}/qat_model.pt", weights_only=True) for k in ("resume-plain", "resume-killed"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows = [["uninterrupted", plain["qat"]["top1"], plain["onnx"].get("top1", "-"),
                 " ".join(f"{h['val_top1']:.4f}" for h in plain["history"]), "-"],
                [f"SIGKILL in epoch {kill.get('killed_during_epoch', '?')}, then --resume", killed["qat"]["top1"],
                 killed["onnx"].get("top1", "-"), " ".join(f"{h['val_top1']:.4f}" for h in killed["history"]),
                 killed["training"]["resumed_from_epoch"]]]
        body = ("## QAT kill -9 and --resume (W4A4 LSQ, 5,000 training images, 3 epochs, seed 0)\n\n"
                "Both runs through `edgeslim qat ... --train-size 5000 --val-size 2000 --epochs 3`; the second was "
                "killed with SIGKILL 15 s into epoch 2 and restarted with `--resume` (it reloads the epoch-1 "
                "checkpoint and repeats epoch 2). Test top-1 on all 10,000 images; per-epoch validation on 2,000.\n\n"
                + table(["run", "test top-1", "ONNX top-1", "validation per epoch", "resumed from epoch"], rows)
                + f"\n\nFinal trained weights, biases and scales identical tensor for tensor between the two runs: "
                f"**{'yes' if same else 'no'}**; "
                f"difference {abs(plain['qat']['top1'] - killed['qat']['top1']) * 100:.2f} points. "
                + _commits([plain, killed]))
        write_section("qat-resume", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeslim-qat"))
    ap.add_argument("--runs", help="comma-separated run-name prefixes (w4a4, w2a2, w2a2-uniform-dsq, ...) or resume; "
                    "runs whose summary exists are skipped")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="write the BENCHMARKS.md sections from the finished runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.shared / "models/resnet20_cifar10jpeg.pt").exists():
        raise SystemExit(f"shared data not found under {args.shared}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.runs:
        groups = [g for g in args.runs.split(",") if g != "resume"]
        if groups:
            run_group(",".join(groups), args.shared, args.work)
        if "resume" in args.runs.split(","):
            run_resume(args.shared, args.work, args.threads)
    if args.report:
        report(args.work)


if __name__ == "__main__":
    main()
