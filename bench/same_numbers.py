"""Behaviour unchanged by a restructuring: the cheapest form of the PTQ, low-bit, detector, mixed-precision and
lightweighting bench commands, run at a commit before it and at this one, on the same machine, and their headline
numbers side by side.

    python -m bench.same_numbers [--before e9df3cd] [--rows ptq-r20,lowbit-r20,detect-y5n,mixed-r20,prune-r20]

Each row is one CLI command on the README's data (``../shared``); "before" runs it from a temporary git worktree
of ``--before`` with the same virtual environment (``python -m edgeslim`` from the worktree imports the worktree's
package), "after" from this checkout. The numbers are read from each run's ``summary.json``. Results of a commit
are cached in ``--cache`` (JSON, keyed by commit and row), so the before half can run once; delete the file to
measure again. The machine's CPU decides the default weight grid (7-bit where onnxruntime's int8 kernels saturate),
so both halves must run on the same machine: the cache records the CPU flags and refuses to pair other machines'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ._report import COMMIT, ROOT, machine, table, write_section
from .toolkit_times import resnet20_args, yolov5n_args

ROWS = ("ptq-r20", "lowbit-r20", "detect-y5n", "mixed-r20", "prune-r20")


def commands(shared: Path) -> dict[str, list[str]]:
    """Each row's command line (after ``python -m edgeslim``), without ``--out``."""
    r20 = resnet20_args(shared)
    return {
        "ptq-r20": ["quantize", *r20],
        "lowbit-r20": ["quantize", *r20, "--w-bits", "4", "--a-bits", "8", "--algorithm", "cle,adaround",
                       "--iters", "100"],
        "detect-y5n": ["quantize", *yolov5n_args(shared)],
        "mixed-r20": ["mixed", *r20, "--w-bits", "4", "--a-bits", "4", "--max-drop", "0.5"],
        "prune-r20": ["prune", *r20[:3], "--train-data", str(shared / "data/cifar10-jpeg-train.zip"),
                      "--data", str(shared / "data/cifar10-jpeg-test.zip"), "--method", "magnitude",
                      "--sparsity", "0.5", "--epochs", "1", "--train-size", "2000", "--eval-size", "2000"],
    }


def _get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fields(*paths: str) -> Callable[[dict], dict]:
    return lambda s: {p: _get(s, p) for p in paths}


def _mixed(s: dict) -> dict:
    out = _fields("fp32.score", "uniform.score", "uniform.onnx_score", "mixed.score", "mixed.holdout_score",
                  "mixed.onnx_score", "met")(s)
    out["mixed.high_precision_layers"] = ",".join(_get(s, "mixed.high_precision_layers") or [])
    return out


# the headline numbers of each row's summary.json
READ: dict[str, Callable[[dict], dict]] = {
    "ptq-r20": _fields("fp32.top1", "quantized.top1", "onnx_int8.top1", "onnx_int8.flips_vs_fp32",
                       "size_bytes.int8"),
    "lowbit-r20": _fields("fp32.top1", "quantized.top1", "onnx_int8.top1", "size_bytes.int8"),
    "detect-y5n": _fields("onnx_fp32.map50", "onnx_fp32.map50_95", "onnx_int8.map50", "onnx_int8.map50_95",
                          "onnx_int8.precision", "onnx_int8.recall", "size_bytes.int8"),
    "mixed-r20": _mixed,
    "prune-r20": _fields("dense.top1", "pruned.top1", "pruned.params", "pruned.macs"),
}


def run_row(row: str, cmd: list[str], cwd: Path, out: Path) -> dict:
    """Run one row's command from ``cwd``; its headline numbers (or the exit status and the error's last line)."""
    p = subprocess.run([sys.executable, "-m", "edgeslim", *cmd, "--out", str(out)], cwd=cwd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {"exit": p.returncode, "error": (p.stderr.strip().splitlines() or [""])[-1][:200]}
    return READ[row](json.loads((out / "summary.json").read_text()))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--before", default="e9df3cd")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgeslim-same-numbers.json")
    ap.add_argument("--only-before", action="store_true", help="run (and cache) the before half only")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    where = machine()
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    cmds = commands(args.shared)

    def cached(commit: str, row: str, cwd: Path, tmp: Path) -> dict:
        key = f"{commit}:{row}"
        if key not in cache or cache[key]["machine"] != where:
            print(f"{row} at {commit} ...", flush=True)
            cache[key] = {"machine": where, "numbers": run_row(row, cmds[row], cwd, tmp / f"{commit}-{row}")}
            args.cache.write_text(json.dumps(cache, indent=1))
        return cache[key]["numbers"]

    with tempfile.TemporaryDirectory() as t:
        tmp, tree = Path(t), Path(t) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results = {r: (cached(before, r, tree, tmp), None if args.only_before else cached(COMMIT, r, ROOT, tmp))
                       for r in rows}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    if args.only_before:
        return
    lines, same_all = [], True
    for r in rows:
        b, a = results[r]
        for k in sorted(set(b) | set(a), key=lambda k: list(a).index(k) if k in a else len(a)):
            same = b.get(k) == a.get(k)
            same_all &= same
            lines.append([r, k, _fmt(b.get(k)), _fmt(a.get(k)), "yes" if same else "**no**"])
    text = ("## The same numbers before and after the restructuring\n\n"
            f"Each row's command run at {before} (before) and at this commit (after) on this machine; the headline "
            "numbers of each run's `summary.json`. Commands: "
            + "; ".join(f"`{r}`: `edgeslim {' '.join(Path(c).name if '/' in c else c for c in cmds[r])}`" for r in rows)
            + ".\n\n" + table(["row", "number", "before", "after", "identical"], lines)
            + f"\n\nEvery number identical: {'yes' if same_all else 'no'}.\n")
    print(text)
    if args.write:
        write_section("same-numbers", text)


if __name__ == "__main__":
    main()
