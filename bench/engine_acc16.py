"""The engine's narrow-accumulator simulation on the shared ResNet-20, before and after its vectorization
(issue 19, "faster engine paths"). Writes the ``engine-acc16`` section of BENCHMARKS.md.

* images/s of the integer engine with a 16-bit accumulator (saturate and wrap) with the old code (the
  tap-by-tap loop, copied below from commit eca52cd and patched in) and the new ``narrow.gemm_acc``, on the
  same test images in the same process, with the 32-bit engine next to them; outputs identical;
* per-filter overflow events (``OverflowStats``) of both on the first images: identical;
* wall seconds of ``edgeslim analyze resnet20 ... --accumulator 16`` on ``--eval-size`` test images with this
  checkout (after) and a git worktree of ``--before`` (before: the commit before the vectorization; on fewer
  images, ``--before-images``, as the old code is slow), and with this checkout on those images too.

    python -m bench.engine_acc16 [--shared ../shared] [--images 1000] [--old-images 64] [--before COMMIT]
                                 [--before-images 200] [--skip-cli]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._data import resnet20_cifar
from bench._report import ROOT, table, write_section
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.data import calibration_indices
from edgeslim.engine import narrow
from edgeslim.engine.overflow import OverflowStats
from edgeslim.engine.run import run
from edgeslim.eval import metrics


def gemm_acc_tap_by_tap(cols, wk, bias=None, *, accumulator_bits=32, overflow="saturate"):
    """``narrow.gemm_acc`` as it was at commit eca52cd (narrow registers: one full (G, M, O) step per tap)."""
    G, M, K = cols.shape
    O = wk.shape[1]
    b = None if bias is None else np.asarray(bias, dtype=np.int64).reshape(G, 1, O)
    if accumulator_bits >= 32:
        ftype = cols.dtype if cols.dtype in (np.float32, np.float64) else np.float64
        acc = np.matmul(cols.astype(ftype, copy=False), wk.astype(ftype).transpose(0, 2, 1)).astype(np.int64)
        if b is not None:
            acc = acc + b
        acc, over = narrow.register(acc, accumulator_bits, overflow)
        return acc, over.sum(axis=1)
    lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
    events = np.zeros((G, O), dtype=np.int64)
    reg = np.zeros((G, M, O), dtype=np.int64)
    c, w = cols.astype(np.int64), wk.astype(np.int64)
    for k in range(K):
        reg = reg + c[:, :, k:k + 1] * w[:, None, :, k]
        events += ((reg < lo) | (reg > hi)).sum(axis=1)
        reg, _ = narrow.register(reg, accumulator_bits, overflow)
    if b is not None:
        reg = reg + b
        events += ((reg < lo) | (reg > hi)).sum(axis=1)
        reg, _ = narrow.register(reg, accumulator_bits, overflow)
    return reg, events


def _engine(g, x, gemm, **kw):
    """(outputs, wall seconds, CPU seconds) of the engine with ``gemm`` as ``narrow.gemm_acc``."""
    new = narrow.gemm_acc
    narrow.gemm_acc = gemm
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        y = run(g, x, **kw)
        return y, time.perf_counter() - t0, time.process_time() - c0
    finally:
        narrow.gemm_acc = new


def _stats_equal(g, x, mode: str) -> tuple[bool, int]:
    """Every OverflowStats number of the old and new GEMM equal; the number of 16-bit overflow events."""
    per = []
    for gemm in (gemm_acc_tap_by_tap, narrow.gemm_acc):
        st = OverflowStats()
        _engine(g, x, gemm, accumulator_bits=16, overflow=mode, stats=st)
        per.append({r["name"]: st.per_filter(r["name"]) for r in st.layers()})
    same = per[0].keys() == per[1].keys() and all(
        np.array_equal(per[0][n][k], per[1][n][k]) for n in per[0] for k in per[0][n])
    return same, int(sum(v["accumulator_overflows"].sum() for v in per[1].values()))


def _analyze_cmd(shared: Path, out: Path, images: int) -> list[str]:
    return [sys.executable, "-m", "edgeslim", "analyze", "resnet20",
            "--weights", str(shared / "models/resnet20_cifar10jpeg.pt"),
            "--calib-data", str(shared / "data/cifar10-jpeg-train.zip"),
            "--data", str(shared / "data/cifar10-jpeg-test.zip"), "--eval-size", str(images),
            "--accumulator", "16", "--out", str(out)]


def _time_cli(cmd: list[str], cwd: Path) -> str:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return f"{time.perf_counter() - t0:.0f}" + ("" if rc == 0 else f" (exit {rc})")


def _cli_rows(shared: Path, images: int, before: str, before_images: int) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), before], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for n in sorted({before_images, images}):
                b = _time_cli(_analyze_cmd(shared, tmp / f"b{n}", n), tree) if n == before_images else "-"
                a = _time_cli(_analyze_cmd(shared, tmp / f"a{n}", n), ROOT)
                rows.append([f"analyze resnet20 --accumulator 16 --eval-size {n}", b, a])
                print(" | ".join(map(str, rows[-1])), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--images", type=int, default=1000, help="test images for the new code and the 32-bit engine")
    ap.add_argument("--old-images", type=int, default=64, help="the first test images, run by old and new code")
    ap.add_argument("--stats-images", type=int, default=16, help="images for the overflow-statistics comparison")
    ap.add_argument("--before", default="HEAD", help="commit with the old narrow accumulator (for the CLI)")
    ap.add_argument("--before-images", type=int, default=200, help="--eval-size of the CLI run with the old code")
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()
    shared = args.shared.resolve()
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    load0 = os.getloadavg()
    model, info, train, test = resnet20_cifar(shared)
    x_cal = train.batch(calibration_indices(len(train), 512, 0, train.labels))
    config = PTQConfig()
    q = api.quantize(model, x_cal, config)
    g = q.intgraph
    x, y = test.batch(np.arange(args.images)), test.labels[:args.images]
    n_old = min(args.old_images, args.images)
    out = g.output_names[0]
    rows, checks = [], []
    _, t32, _ = _engine(g, x, narrow.gemm_acc, accumulator_bits=32)
    for mode in ("saturate", "wrap"):
        kw = {"accumulator_bits": 16, "overflow": mode}
        y_old, t_old, c_old = _engine(g, x[:n_old], gemm_acc_tap_by_tap, **kw)
        y_new, t_new, c_new = _engine(g, x[:n_old], narrow.gemm_acc, **kw)
        y_all, t_all, c_all = _engine(g, x, narrow.gemm_acc, **kw)
        same = bool(np.array_equal(y_old[out], y_new[out]) and np.array_equal(y_all[out][:n_old], y_new[out]))
        stats_same, events = _stats_equal(g, x[:args.stats_images], mode)
        rows.append([f"16-bit {mode}", f"{n_old / t_old:.2f}", f"{n_old / t_new:.1f}", f"{t_old / t_new:.1f}x",
                     f"{c_old / c_new:.1f}x", f"{args.images / t_all:.1f}", f"{metrics.top1(y_all[out], y):.4f}"])
        checks.append(f"{mode}: outputs identical {'yes' if same else 'NO'}; overflow statistics of the first "
                      f"{args.stats_images} images identical {'yes' if stats_same else 'NO'} ({events} events)")
        print(rows[-1], checks[-1], flush=True)
    rows.append(["32-bit (reference)", "", "", "", "", f"{args.images / t32:.1f}", ""])
    load1 = os.getloadavg()
    cli = [] if args.skip_cli else _cli_rows(shared, args.images, before, args.before_images)
    load2 = os.getloadavg()
    body = [
        "## Narrow (16-bit) accumulator simulation in the integer engine: before and after vectorizing it\n",
        f"ResNet-20 W8A8 (default PTQ: weight range `{config.weight_range}` on this CPU; 512 calibration images), "
        "the integer engine (`engine.run`, batch 256) with a "
        "16-bit accumulator. Old: the tap-by-tap loop of commit eca52cd (every tap a full (G, M, O) int64 update "
        f"and overflow count), patched into the engine; new: `narrow.gemm_acc` by blocks of {narrow.NARROW_BLOCK} taps (a "
        "GEMM gives each block's sum and sum of positive terms; only outputs whose partial sums may leave the "
        "register walk that block tap by tap). Old and new run the same first "
        f"{n_old} test images in one process (images/s wall, and the ratio of wall and of CPU seconds); the new "
        f"code and the 32-bit engine then run the first {args.images} test images.\n",
        table(["accumulator", f"old images/s ({n_old})", f"new images/s ({n_old})", "speed-up (wall)",
               "speed-up (CPU time)", f"new images/s ({args.images})", f"engine top-1 ({args.images})"], rows),
        "\n" + "; ".join(checks) + ".\n",
    ]
    if cli:
        body += [f"\n`edgeslim analyze resnet20 ... --accumulator 16` end to end (quantize, onnxruntime and PyTorch "
                 "scoring, engine on every --eval-size image, overflow statistics on the first 256), wall seconds, "
                 f"with commit {before} (before: the old tap-by-tap accumulator) and this checkout (after):\n",
                 table(["command", "before s", "after s"], cli)]
    body.append(f"\nOther work was running on this 2-core machine: 1-min load average {load0[0]:.1f} at the start, "
                f"{load1[0]:.1f} after the engine runs, {load2[0]:.1f} at the end.")
    write_section("engine-acc16", "\n".join(body))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
