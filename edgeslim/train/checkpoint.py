"""Checkpoints of a training run: written atomically, restored exactly, refused when they belong to another run.

A checkpoint holds everything the next optimizer step depends on: the weights and buffers, the optimizer's
momentum, the step (the cosine schedule is a function of it), the epoch's batch order and the position in it,
and the global torch / numpy / Python random states (dropout and anything else drawing from them). Resuming
from it and training to the end gives the weights of the uninterrupted run, bit for bit.

Its ``identity`` names what the run was made of (the model's weights digest, the training and quantization
configs, the plan, the training data's digest); ``--resume`` compares it with the run being resumed and names
what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgeslimError

__all__ = ["Checkpoint", "DEFAULT_EVERY_SECONDS", "params_digest", "rng_state", "save_atomic", "set_rng_state"]

DEFAULT_EVERY_SECONDS = 300.0  # without --checkpoint-every: a checkpoint every five minutes of training


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: into a fresh temporary file in the same folder, synced, then
    renamed over ``path`` (``os.replace`` swaps the directory entry: a symlink at ``path`` is replaced, never
    written through). A crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600 files: the usual ones, as torch.save gives
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def params_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names included): equal digests, equal weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    """The global random states of torch, numpy and Python, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _plain(value):
    """``value`` as JSON would hold it (tuples become lists), so identities compare by content."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:12] if isinstance(value, str) and len(value) == 64 else text[:40]  # a digest: its first 12 hex


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between two identities, one phrase per entry (``config: w_bits 4 -> 3, lr``)."""
    out = []
    for name in now:
        a, b = _plain(saved.get(name)), _plain(now[name])
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            parts = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys[:4]] + (["..."] if len(keys) > 4 else [])
            out.append(f"{name} ({', '.join(parts)})")
        else:
            out.append(f"{name} ({_short(a)} -> {_short(b)})")
    return out


@dataclass
class Checkpoint:
    """Where a run checkpoints, how often, and what it must match on ``--resume``.

    ``every``: optimizer steps between checkpoints; None: every ``every_seconds`` of training (measured); 0: only
    at the end of every epoch and of the run. ``identity``: name -> value (a digest, a config dict) that a resumed
    run must reproduce; the training loop adds ``data`` (the training data's digest) and ``tensors`` (the names
    and shapes of the model's parameters and buffers).
    """

    path: Path
    identity: dict = field(default_factory=dict)
    every: int | None = None
    every_seconds: float = DEFAULT_EVERY_SECONDS
    last_write: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every is not None and (not isinstance(self.every, int) or self.every < 0):
            raise EdgeslimError(f"invalid --checkpoint-every {self.every!r}: use a number of steps (0: epoch ends only)")

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimizer step ``step``."""
        if self.every is None:
            return time.monotonic() - self.last_write >= self.every_seconds
        return self.every > 0 and step % self.every == 0

    def check_start(self, resume: bool) -> None:
        """Refuse to overwrite an earlier run's checkpoint without ``--resume``, and ``--resume`` without one.
        Temporary files a killed run left mid-write (``save_atomic``) are removed."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if resume and not self.path.exists():
            raise EdgeslimError(f"--resume: no checkpoint at {self.path}: run without --resume first")
        if not resume and self.path.exists():
            raise EdgeslimError(f"{self.path} exists from an earlier run: add --resume to continue it, or pass a new --out")

    def save(self, payload: dict) -> None:
        save_atomic({**payload, "identity": _plain(self.identity)}, self.path)
        self.last_write = time.monotonic()

    def load(self) -> dict:
        """The checkpoint's contents, after checking its identity against this run's."""
        if not self.path.exists():
            raise EdgeslimError(f"--resume: no checkpoint at {self.path}: run without --resume first")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise EdgeslimError(f"checkpoint {self.path} cannot be read ({str(exc).splitlines()[0][:80]}): "
                                "delete it and train again") from None
        if not isinstance(state, dict) or "progress" not in state:
            raise EdgeslimError(f"--resume: {self.path} is not a training checkpoint of this edgeslim version: delete "
                                "it and train again")
        diff = _differences(state.get("identity") or {}, self.identity)
        if diff:
            raise EdgeslimError(f"--resume: {self.path} belongs to another run; it differs in {'; '.join(diff)}: resume "
                                "with the same model, options and training data, or pass a new --out")
        self.last_write = time.monotonic()
        return state
