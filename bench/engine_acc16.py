"""The integer engine on the shared ResNet-20 with a 32-bit and a 16-bit (saturate / wrap) accumulator, this
checkout against an earlier commit (issue 19, "faster engine paths"). Writes the ``engine-acc16`` section of
BENCHMARKS.md.

* images/s of the engine as ``analyze`` runs it (``analysis.run_narrow_threads``: a narrow accumulator on slices
  of the batch in threads, one per core) of ``--before`` (a git worktree, imported as package ``edgeslim_before``)
  and of this checkout, alternated in one process on the same test images (wall and CPU seconds), outputs
  identical; the tap-by-tap loop of commit eca52cd (the original narrow accumulator, copied below) patched into
  this engine on the first ``--old-images``; this checkout on ``--images`` test images (top-1);
* per-filter overflow events (``OverflowStats``) of the tap-by-tap loop and this engine on the first images:
  identical;
* wall seconds of ``edgeslim analyze resnet20 ... --accumulator 16`` with ``--before`` and this checkout.

    python -m bench.engine_acc16 [--shared ../shared] [--images 1000] [--paired-images 256] [--rounds 3]
                                 [--old-images 64] [--before COMMIT] [--before-images 200] [--skip-cli]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
from edgeslim.engine import narrow, ops
from edgeslim.engine.overflow import OverflowStats
from edgeslim.analysis import run_narrow_threads
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
    new, conv = narrow.gemm_acc, ops.conv_acc
    narrow.gemm_acc = gemm
    ops.conv_acc = lambda *a, **k: conv(*a, **{**k, "count_events": True})  # every conv through gemm (wrap too)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        y = run_narrow_threads(g, x, **kw)
        return y, time.perf_counter() - t0, time.process_time() - c0
    finally:
        narrow.gemm_acc, ops.conv_acc = new, conv


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


@contextlib.contextmanager
def _worktree(commit: str):
    """A detached git worktree of ``commit`` (removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        tree = Path(tmpdir) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def _before_run(tree: Path, tmp: Path):
    """``analysis.run_narrow_threads`` of the worktree ``tree`` (the engine as ``analyze`` runs it: a narrow
    accumulator on contiguous slices of the batch in threads, a 32-bit one as ``run``), imported as package
    ``edgeslim_before`` (its modules import each other relatively, so they all come from the worktree)."""
    alias = tmp / "alias"
    alias.mkdir()
    (alias / "edgeslim_before").symlink_to(tree / "edgeslim")
    sys.path.insert(0, str(alias))
    return importlib.import_module("edgeslim_before.analysis").run_narrow_threads


def _cli_rows(shared: Path, images: int, tree: Path, before_images: int, tmp: Path) -> list[list]:
    rows = []
    for n in sorted({before_images, images}):
        b = _time_cli(_analyze_cmd(shared, tmp / f"b{n}", n), tree) if n == before_images else "-"
        a = _time_cli(_analyze_cmd(shared, tmp / f"a{n}", n), ROOT)
        rows.append([f"analyze resnet20 --accumulator 16 --eval-size {n}", b, a])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def _timed(fn, g, x, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    y = fn(g, x, **kw)
    return y, time.perf_counter() - t0, time.process_time() - c0


MODES = [("32-bit", {"accumulator_bits": 32}), ("16-bit saturate", {"accumulator_bits": 16, "overflow": "saturate"}),
         ("16-bit wrap", {"accumulator_bits": 16, "overflow": "wrap"})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--images", type=int, default=1000, help="test images for this checkout alone (top-1)")
    ap.add_argument("--paired-images", type=int, default=256, help="test images run by --before and this checkout")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of --before and this checkout (best kept)")
    ap.add_argument("--old-images", type=int, default=64, help="test images for the tap-by-tap loop of eca52cd")
    ap.add_argument("--stats-images", type=int, default=16, help="images for the overflow-statistics comparison")
    ap.add_argument("--before", default="HEAD", help="the commit to compare with")
    ap.add_argument("--before-images", type=int, default=200, help="--eval-size of the CLI run with --before")
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()
    shared = args.shared.resolve()
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    load0 = os.getloadavg()
    model, info, train, test = resnet20_cifar(shared)
    x_cal = train.batch(calibration_indices(len(train), 512, 0, train.labels))
    config = PTQConfig()
    g = api.quantize(model, x_cal, config).intgraph
    x, y = test.batch(np.arange(args.images)), test.labels[:args.images]
    xp, n_old = x[:args.paired_images], min(args.old_images, args.images)
    out = g.output_names[0]
    rows, checks = [], []
    with _worktree(args.before) as tree, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        run_before = _before_run(tree, tmp)
        for label, kw in MODES:
            best = {"before": (np.inf, np.inf), "after": (np.inf, np.inf)}
            ys = {}
            for _ in range(args.rounds):
                for name, fn in (("before", run_before), ("after", run_narrow_threads)):
                    ys[name], wall, cpu = _timed(fn, g, xp, **kw)
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            same = np.array_equal(ys["before"][out], ys["after"][out])
            y_all, t_all, _ = _timed(run_narrow_threads, g, x, **kw)
            old = ["", ""]
            if kw["accumulator_bits"] < 32:
                y_old, t_old, _ = _engine(g, x[:n_old], gemm_acc_tap_by_tap, **kw)
                same &= np.array_equal(y_old[out], y_all[out][:n_old])
                old = [f"{n_old / t_old:.2f}", f"{t_old / n_old / (best['after'][0] / len(xp)):.0f}x"]
                stats_same, events = _stats_equal(g, x[:args.stats_images], kw["overflow"])
                checks.append(f"{label}: overflow statistics of the first {args.stats_images} images identical "
                              f"(tap-by-tap loop and this engine) {'yes' if stats_same else 'NO'} ({events} events)")
            (wb, cb), (wa, ca) = best["before"], best["after"]
            rows.append([label, *old[:1], f"{len(xp) / wb:.1f}", f"{len(xp) / wa:.1f}", f"{wb / wa:.2f}x",
                         f"{cb / ca:.2f}x", f"{len(xp) / cb:.0f} / {len(xp) / ca:.0f}", old[1],
                         f"{args.images / t_all:.1f}", f"{metrics.top1(y_all[out], y):.4f}",
                         "yes" if same else "NO"])
            print(rows[-1], flush=True)
        load1 = os.getloadavg()
        cli = [] if args.skip_cli else _cli_rows(shared, args.images, tree, args.before_images, tmp)
    load2 = os.getloadavg()
    body = [
        "## Integer engine on ResNet-20: 32-bit and 16-bit (saturate / wrap) accumulators\n",
        f"ResNet-20 W8A8 (default PTQ: weight range `{config.weight_range}` on this CPU; 512 calibration images), "
        "the integer engine as `analyze` runs it (`analysis.run_narrow_threads`: with a 16-bit accumulator, "
        "contiguous slices of each batch of 256 in threads, one per core; 32-bit: one `engine.run`, whose GEMMs use "
        "every core; the 32-bit engine is unchanged since the commit before, so its ratio shows the noise). Before: "
        f"commit {before}, imported from a git worktree into the same process; after: this commit. Before and "
        f"after alternate {args.rounds} times on the first "
        f"{len(xp)} test images (best of each: images/s wall, speed-up in wall and in CPU seconds, and images/s "
        "per CPU second, which a busy machine disturbs less). Conv / QGemm are one im2col GEMM per chunk of "
        "images in the narrowest exact float type (float32 where every partial sum is below 2^24, float64 below "
        f"2^53, else int64). A saturating 16-bit register is simulated by levels of tests (one GEMM per block of "
        f"about {narrow.NARROW_BLOCK} taps gives each output the sums of the positive and of the negative terms of "
        "each block; their totals settle the outputs whose partial sums cannot leave the register; the others go "
        "through their blocks in order in one compiled loop (numba, `engine/narrow_jit.py`): a block whose sums "
        "keep the register in range is added whole, the others are walked tap by tap); a wrapping one, when no "
        "overflow statistics are asked for (these runs), is the exact sum wrapped once (addition modulo 2^16), "
        "with statistics it takes the blocks too (the statistics comparison below). The original "
        "narrow accumulator (the tap-by-tap loop of commit eca52cd, every tap a full (G, M, O) int64 update) is "
        f"patched into this engine (same threads) on the first {n_old} images; the last columns are this commit "
        "alone on "
        f"{args.images} images.\n",
        table(["accumulator", f"eca52cd tap loop images/s ({n_old})", f"before images/s ({len(xp)})",
               f"after images/s ({len(xp)})", "speed-up (wall)", "speed-up (CPU)", "images per CPU s before / after",
               "after vs tap loop", f"after images/s ({args.images})", f"engine top-1 ({args.images})",
               "outputs identical"], rows),
        "\n" + "; ".join(checks) + ".\n",
    ]
    if cli:
        body += [f"\n`edgeslim analyze resnet20 ... --accumulator 16` end to end (quantize, onnxruntime and PyTorch "
                 "scoring, engine on every --eval-size image, overflow statistics on the first 256), wall seconds, "
                 f"with commit {before} (before) and this checkout (after):\n",
                 table(["command", "before s", "after s"], cli)]
    body.append(f"\nOther work was running on this 2-core machine (OpenBLAS with its default threads): 1-min load "
                f"average {load0[0]:.1f} at the start, {load1[0]:.1f} after the engine runs, {load2[0]:.1f} at the "
                "end; wall numbers are what this load left, the paired ratios are the claim.")
    write_section("engine-acc16", "\n".join(body))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
