"""Tasks: how a job gets its data and scores a model, so that one job per verb serves every kind of model.

The protocol and the shared helpers are in ``base``; each task is one module (``classify``, ``detect``,
``fidelity``) registered here. See ``base``'s docstring for what a task answers.
"""

from __future__ import annotations

from .base import HOLDOUT_SOURCES, Deployed, Split, Task, finite
from .classify import Classify, onnx_top1
from .detect import Detect
from .fidelity import Fidelity

__all__ = ["Task", "Split", "Deployed", "Classify", "Detect", "Fidelity", "TASKS", "HOLDOUT_SOURCES", "finite",
           "onnx_top1"]

TASKS = {"classify": Classify, "detect": Detect, "fidelity": Fidelity}
