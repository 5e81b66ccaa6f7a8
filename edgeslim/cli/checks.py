"""Checks every command's options pass before any work starts: numbers in range and a usable ``--out``."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import EdgeslimError

__all__ = ["RANGES", "check_numbers", "check_ranges", "check_out"]

# option: (lowest, highest, lowest allowed, highest allowed) -- every float option is also checked to be finite
RANGES = {"kd_temperature": (0.0, None, False, True), "kd_weight": (0.0, 1.0, True, True),
          "lr": (0.0, None, False, True), "weight_decay": (0.0, None, True, True),
          "budget_epochs": (0.0, None, True, True), "max_drop": (0.0, None, True, True),
          "max_size_kb": (0.0, None, False, True), "max_latency_ms": (0.0, None, False, True),
          "target_macs": (0.0, 1.0, False, True), "ratio": (0.0, 1.0, False, False),
          "sparsity": (0.0, 1.0, True, False), "prune_macs": (0.0, 1.0, False, True),
          "share": (0.0, 1.0, False, True), "macs_reduction": (0.0, 1.0, False, True),
          "conf_thres": (0.0, 1.0, True, True), "iou_thres": (0.0, 1.0, False, True),
          "cm_conf": (0.0, 1.0, True, True)}


def check_numbers(args) -> None:
    """Options that must be non-negative / positive, checked before any work starts."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise EdgeslimError(f"invalid --seed {seed}: use an integer from 0 to 2**32 - 1")
    for opt in ("epochs", "eval_size", "batch_size", "threads"):
        v = getattr(args, opt, None)
        if v is not None and not isinstance(v, float) and v < 1:  # float --epochs (fine-tuning): check_ranges
            raise EdgeslimError(f"invalid --{opt.replace('_', '-')} {v}: use 1 or more")
    check_ranges(args)


def check_ranges(args) -> None:
    """Float options must be finite numbers inside their range (``--kd-temperature 0`` divides by zero)."""
    for opt, (lo, hi, lo_ok, hi_ok) in RANGES.items():
        v = getattr(args, opt, None)
        if not isinstance(v, float):
            continue
        bad = not math.isfinite(v) or v < lo or (v == lo and not lo_ok)
        bad = bad or (hi is not None and (v > hi or (v == hi and not hi_ok)))
        if bad:
            span = f"{'[' if lo_ok else '('}{lo:g}, {'inf)' if hi is None else f'{hi:g}' + (']' if hi_ok else ')')}"
            raise EdgeslimError(f"invalid --{opt.replace('_', '-')} {v:g}: use a number in {span}")
    epochs = getattr(args, "epochs", None)
    if isinstance(epochs, float) and (not math.isfinite(epochs) or epochs <= 0):
        raise EdgeslimError(f"invalid --epochs {epochs:g}: use a positive number of epochs")


def check_out(args) -> None:
    """``--out`` must be a folder of its own: never empty, never holding (or being) one of the inputs."""
    out = getattr(args, "out", None)
    if out is None:
        return
    if not str(out).strip():
        raise EdgeslimError("--out is empty: pass a folder for the results, e.g. --out runs/model")
    target = Path(out).expanduser().resolve()
    for opt in ("model", "weights", "calib_data", "data", "train_data", "plan"):
        value = getattr(args, opt, None)
        if not value or not isinstance(value, str):
            continue
        src = Path(value).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if src == target or target in src.parents:
            raise EdgeslimError(f"--out {out} holds the input {value} (--{opt.replace('_', '-')}), which the results "
                                "would overwrite: pass another --out folder")
    from ..io.staging import check_out_folder, sweep_stale

    sweep_stale(check_out_folder(out))  # refuse a file / read-only --out; drop staging folders of dead runs
