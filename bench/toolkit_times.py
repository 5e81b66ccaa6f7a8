"""How long the toolkit makes a user wait: the README's commands end to end (wall seconds, both cores, nothing
else running), with the code of a reference commit ("before") and the current checkout ("after"), in one run.

    python -m bench.toolkit_times [--before 6268c68]

"before" runs from a temporary git worktree of that commit with the same virtual environment (``python -m
edgeslim`` from the worktree imports the worktree's package).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._report import ROOT, table, write_section


def _commands(shared: Path, out: Path) -> dict[str, list[str]]:
    r20 = ["-m", "edgeslim", "quantize", "resnet20", "--weights", str(shared / "models/resnet20_cifar10jpeg.pt"),
           "--calib-data", str(shared / "data/cifar10-jpeg-train.zip"),
           "--data", str(shared / "data/cifar10-jpeg-test.zip"), "--out", str(out / "r20")]
    y5 = ["-m", "edgeslim", "quantize", "yolov5n", "--weights", str(shared / "models/yolov5n.pt"), "--task", "detect",
          "--calib-data", str(shared / "data/coco128.zip"), "--calib-split", "train2017",
          "--data", str(shared / "data/coco128.zip"), "--data-split", "val2017", "--calib-size", "128",
          "--out", str(out / "y5n")]
    return {"quantize resnet20 (10,000 test images)": r20, "quantize yolov5n --task detect (128 images)": y5,
            "fast test suite (pytest -q)": ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]}


def _time(cmd: list[str], cwd: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--before", default="6268c68")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for name, cmd in _commands(args.shared.resolve(), tmp).items():
                before, rc_b = _time(cmd, tree)
                after, rc_a = _time(cmd, ROOT)
                rows.append([name, f"{before:.0f}" + ("" if rc_b == 0 else f" (exit {rc_b})"),
                             f"{after:.0f}" + ("" if rc_a == 0 else f" (exit {rc_a})"), f"{before / after:.1f}x"])
                print(" | ".join(rows[-1]), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    write_section("toolkit-times", "## How long the commands take, before and after (wall seconds)\n\n"
                  f"Each command run once with the code of commit {args.before} (before) and of this commit (after), "
                  "one after the other on the same machine, nothing else running. After: the ONNX files are scored on "
                  "every image in onnxruntime (all cores) and the PyTorch float / fake-quant models on a subset "
                  "(`--simulate-size`, 1000 images for classification, 16 for detectors).\n\n"
                  + table(["command", "before s", "after s", "speed-up"], rows))


if __name__ == "__main__":
    main()
