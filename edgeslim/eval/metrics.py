"""Classification metrics on logits (numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["top1", "flips"]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def flips(logits_a: np.ndarray, logits_b: np.ndarray) -> int:
    """Number of samples whose predicted class differs between two models."""
    return int((logits_a.argmax(axis=1) != logits_b.argmax(axis=1)).sum())
