"""How long the toolkit makes a user wait: the README's commands end to end (wall seconds, both cores, nothing
else running), next to the time onnxruntime alone needs for the same number of inputs, and issue 19's goals.

    python -m bench.toolkit_times [--before 6268c68] [--rows quantize-r20,quantize-y5n,...]

Rows (``--rows``, default all): ``quantize-r20`` (ResNet-20, 10,000 CIFAR-10 test images), ``quantize-y5n``
(yolov5n ``--task detect``, COCO128), ``sens-mixed`` (``sensitivity`` then ``mixed --max-drop 0.5`` on W4A4
ResNet-20), ``analyze16`` (``analyze --accumulator 16`` on 1,000 test images), ``qat-epoch`` (one W4A4 LSQ
epoch on the 50,000 training images next to one FP32 training epoch of the same loop, model, batch and data),
``suite`` (the fast test suite, ``pytest -q``).

"before" runs the rows that existed at that commit (the two ``quantize`` rows and the suite) from a temporary
git worktree with the same virtual environment (``python -m edgeslim`` from the worktree imports the worktree's
package); the other rows give the figures the issue was filed with, not rerun (they took minutes each).

"onnxruntime alone" is the time the run's own FP32 and INT8 ONNX files need in onnxruntime for as many inputs as
the command scores (random inputs of the model's shape: the time does not depend on the content; batch 250 for
ResNet-20, 8 for yolov5n, all cores, one warm-up batch not counted), i.e. the floor a command that decodes images,
calibrates and scores both files cannot go under. For ``sens-mixed`` it is every (file, input) evaluation both
commands ran (``scored_inputs``, from their summaries) at the rate onnxruntime runs the mixed file on 10,000
inputs: what scoring them one file at a time would take, which the commands' shared work (``eval.ort``) undercuts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._report import COMMIT, ROOT, table, write_section

ROWS = ("quantize-r20", "quantize-y5n", "sens-mixed", "analyze16", "qat-epoch", "suite")
# what the issue was filed with (its text; loaded VNNI machine): not rerun as "before"
FILED = {"sens-mixed": "650 (filed)", "analyze16": "~370 (filed: 2.7 images/s)", "qat-epoch": "2.1x step (filed)"}


def resnet20_args(shared: Path) -> list[str]:
    return ["resnet20", "--weights", str(shared / "models/resnet20_cifar10jpeg.pt"),
            "--calib-data", str(shared / "data/cifar10-jpeg-train.zip"),
            "--data", str(shared / "data/cifar10-jpeg-test.zip")]


def yolov5n_args(shared: Path) -> list[str]:
    return ["yolov5n", "--weights", str(shared / "models/yolov5n.pt"), "--task", "detect",
            "--calib-data", str(shared / "data/coco128.zip"), "--calib-split", "train2017",
            "--data", str(shared / "data/coco128.zip"), "--data-split", "val2017", "--calib-size", "128"]


def _time(cmd: list[str], cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def _secs(t: float, rc: int) -> str:
    return f"{t:.0f}" + ("" if rc == 0 else f" (exit {rc})")


def ort_alone(paths: list[Path], n: int, batch: int) -> float:
    """Seconds onnxruntime (all cores) needs to run every file in ``paths`` on ``n`` inputs of its shape."""
    import onnxruntime as ort

    total = 0.0
    for path in paths:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        fixed = isinstance(inp.shape[0], int)
        b = inp.shape[0] if fixed else batch
        shape = [b, *[int(d) for d in inp.shape[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sess.run(None, {inp.name: x})  # warm-up
        t0 = time.perf_counter()
        for _ in range(math.ceil(n / b)):
            sess.run(None, {inp.name: x})
        total += time.perf_counter() - t0
    return total


def scored_inputs(sens: Path, mixed: Path) -> int:
    """How many (file, input) evaluations ``sensitivity`` and ``mixed`` ran in onnxruntime, from their summaries:
    sensitivity's sweeps (every op's plan per sweep, and the uniform one) on its held-out inputs and its group
    table (every combination and the FP32 file) on the test set; mixed's keep-high sweep (one plan per op, and the
    uniform one) and search steps on its held-out inputs, and its FP32, uniform and mixed files on the test set."""
    s, m = json.loads(sens.read_text()), json.loads(mixed.read_text())
    sw, search = s["sensitivity"], m["search"]
    n = (len(sw["seconds"]) * len(sw["rows"]) + 1) * sw["images"]
    if "groups" in s:
        n += (len(s["groups"]["rows"]) + 1) * s["images"]["test"]
    return n + (len(search["order"]) + 1 + len(search["steps"])) * m["images"]["holdout"] + 3 * m["images"]["test"]


def fp32_epoch(shared: Path, result: Path) -> None:
    """One FP32 training epoch of ResNet-20 on the 50,000 CIFAR-10 training images with ``train.loop.fit``: the
    loop, batch, recipe, augmentation and data the ``qat`` command uses (its QATConfig's recipe, labels'
    cross-entropy), only the model is the float one (BatchNorm in training mode)."""
    from edgeslim.algorithms import qat
    from edgeslim.config import QATConfig
    from edgeslim.data import Preprocess, open_dataset
    from edgeslim.models import build_model
    from edgeslim.train.data import load_train
    from edgeslim.train.loop import fit

    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    ds = open_dataset(shared / "data/cifar10-jpeg-train.zip", Preprocess(info.input_shape, info.mean, info.std),
                      split="train")
    data = load_train(ds, info, None, 0, progress=False)
    cfg = QATConfig(4, 4)
    recipe = cfg.recipe(len(data.y))
    recipe = dataclasses.replace(recipe, steps=math.ceil(len(data.y) / cfg.batch_size))
    r = fit(model.train(), data, recipe, loss=qat.qat_loss(cfg), progress=False, desc="FP32")
    result.write_text(json.dumps({"train_seconds": r["train_seconds"], "steps": r["steps"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--before", default="6268c68")
    ap.add_argument("--keep-before", action="store_true",
                    help="do not rerun 'before': keep each row's cached before figure (same machine, earlier run)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgeslim-toolkit-times.json",
                    help="each measured row is kept here with its commit; the table shows every row measured so far")
    ap.add_argument("--fp32-epoch", type=Path, help=argparse.SUPPRESS)  # internal: one FP32 epoch, result JSON
    args = ap.parse_args()
    shared = args.shared.resolve()
    if args.fp32_epoch:
        fp32_epoch(shared, args.fp32_epoch)
        return
    rows_wanted = args.rows.split(",")
    unknown = sorted(set(rows_wanted) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    em = ["-m", "edgeslim"]
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def before(cmd: list[str], key: str) -> str:
            if args.keep_before and key in cache:
                return cache[key]["cells"][1]
            return _secs(*_time(cmd, tree))

        def add(key: str, name: str, b: str, t: float, rc: int, alone: str, goal: str) -> None:
            cells = [name, b, _secs(t, rc), alone, goal]
            cache[key] = {"cells": cells, "commit": COMMIT, "load": [round(v, 1) for v in os.getloadavg()]}
            args.cache.write_text(json.dumps(cache, indent=1))
            print(" | ".join(cells), flush=True)

        try:
            if "quantize-r20" in rows_wanted:
                cmd = [*em, "quantize", *resnet20_args(shared)]
                b = before([*cmd, "--out", str(tmp / "r20b")], "quantize-r20")
                t, rc = _time([*cmd, "--out", str(tmp / "r20")], ROOT)
                alone = ort_alone([tmp / "r20/model_fp32.onnx", tmp / "r20/model_int8.onnx"], 10_000, 250)
                ok = rc == 0 and t <= min(30.0, 3 * alone)
                add("quantize-r20", "quantize resnet20 (10,000 test images)", b, t, rc, f"{alone:.1f}",
                    f"<= 3x alone and < 30 s: {'met' if ok else 'not met'} ({t / alone:.1f}x)")
            if "quantize-y5n" in rows_wanted:
                cmd = [*em, "quantize", *yolov5n_args(shared)]
                b = before([*cmd, "--out", str(tmp / "y5b")], "quantize-y5n")
                t, rc = _time([*cmd, "--out", str(tmp / "y5")], ROOT)
                alone = ort_alone([tmp / "y5/model_fp32.onnx", tmp / "y5/model_int8.onnx"], 128, 8)
                add("quantize-y5n", "quantize yolov5n --task detect (128 images)", b, t, rc, f"{alone:.1f}",
                    f"< 60 s: {'met' if rc == 0 and t < 60 else 'not met'}")
            if "sens-mixed" in rows_wanted:
                w4a4 = ["--w-bits", "4", "--a-bits", "4"]
                t1, rc1 = _time([*em, "sensitivity", *resnet20_args(shared), *w4a4, "--out", str(tmp / "sens")], ROOT)
                t2, rc2 = _time([*em, "mixed", *resnet20_args(shared), *w4a4, "--max-drop", "0.5", "--out", str(tmp / "mixed")],
                                ROOT)
                t, rc = t1 + t2, rc1 or rc2
                alone = "-"
                if rc == 0:  # the evaluations both ran, at the rate of the mixed file (10,000 inputs timed)
                    evals = scored_inputs(tmp / "sens/summary.json", tmp / "mixed/summary.json")
                    rate = ort_alone([tmp / "mixed/model_mixed.onnx"], 10_000, 250) / 10_000
                    alone = f"{evals * rate:.0f} ({evals:,} file-inputs)"
                add("sens-mixed", f"sensitivity ({t1:.0f} s) + mixed --max-drop 0.5 ({t2:.0f} s), ResNet-20 W4A4",
                    FILED["sens-mixed"], t, rc, alone, f"< 120 s: {'met' if rc == 0 and t < 120 else 'not met'}")
            if "analyze16" in rows_wanted:
                t, rc = _time([*em, "analyze", *resnet20_args(shared), "--accumulator", "16", "--eval-size", "1000",
                               "--out", str(tmp / "a16")], ROOT)
                files = [tmp / "a16/model_fp32.onnx", tmp / "a16/model_int8.onnx"]
                alone = "-" if rc else f"{ort_alone(files, 1000, 250):.1f}"
                add("analyze16", "analyze resnet20 --accumulator 16 (1,000 test images)", FILED["analyze16"], t, rc,
                    alone, "-")
            if "qat-epoch" in rows_wanted:
                t, rc = _time([*em, "qat", *resnet20_args(shared)[:3], "--train-data", str(shared / "data/cifar10-jpeg-train.zip"),
                               "--data", str(shared / "data/cifar10-jpeg-test.zip"), "--w-bits", "4", "--a-bits", "4",
                               "--method", "lsq", "--epochs", "1", "--val-size", "1000", "--eval-size", "1000",
                               "--out", str(tmp / "qat")], ROOT)
                res = tmp / "fp32_epoch.json"
                t_f, rc_f = _time(["-m", "bench.toolkit_times", "--shared", str(shared), "--fp32-epoch", str(res)], ROOT)
                if rc == 0 and rc_f == 0:
                    q = json.loads((tmp / "qat/summary.json").read_text())["training"]
                    f = json.loads(res.read_text())
                    ratio = (q["train_seconds"] / q["steps"]) / (f["train_seconds"] / f["steps"])
                    detail = (f"training {q['train_seconds']:.0f} s QAT vs {f['train_seconds']:.0f} s FP32 "
                              f"for {f['steps']} steps: {ratio:.2f}x")
                    goal = f"step <= 1.3x FP32: {'met' if ratio <= 1.3 else 'not met'} ({ratio:.2f}x)"
                else:
                    detail, goal = f"FP32 epoch exit {rc_f}", "not measured"
                add("qat-epoch", f"qat resnet20 W4A4 LSQ, 1 epoch of 50,000 images (command; {detail})", FILED["qat-epoch"], t, rc,
                    "-", goal)
            if "suite" in rows_wanted:
                cmd = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
                b = before(cmd, "suite")
                t, rc = _time(cmd, ROOT)
                add("suite", "fast test suite (pytest -q)", b, t, rc, "-", f"< 240 s: {'met' if rc == 0 and t < 240 else 'not met'}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    rows = [[*cache[k]["cells"], cache[k]["commit"], " / ".join(map(str, cache[k]["load"]))] for k in ROWS if k in cache]
    write_section("toolkit-times", "## How long the commands take, before and after (wall seconds)\n\n"
                  "Each command run once, one after the other on the same machine with nothing else running (the "
                  "load average after each row is in the table; rows measured in different runs name their commit). "
                  f"before: the code of commit {args.before} (only "
                  "the commands it had; 'filed' figures are the issue's, from a loaded VNNI machine, not rerun"
                  + ("; kept from an earlier run of this script (--keep-before), not rerun with this commit's"
                     if args.keep_before else "") + "). "
                  "after: this commit; ONNX files scored on every image in onnxruntime (all cores), the PyTorch "
                  "float / fake-quant models on a subset (`--simulate-size`). onnxruntime alone: the run's FP32 + "
                  "INT8 files on as many inputs, all cores; for sensitivity + mixed, every (file, input) evaluation "
                  "the two commands ran (from their summaries) at the rate of the mixed file, i.e. scoring them one "
                  "file at a time (see the script's docstring).\n\n"
                  + table(["command", "before s", "after s", "onnxruntime alone s", "goal", "after: commit",
                           "load average (1 / 5 / 15 min)"], rows))


if __name__ == "__main__":
    main()
