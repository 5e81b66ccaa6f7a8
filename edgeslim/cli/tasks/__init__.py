"""The tasks on the command line: one module per task of ``edgeslim.tasks`` (``classify``, ``detect``,
``fidelity``), each with ``build(args, model, info, verb)`` (the task object from the parsed options) and its console
summaries ``print_quantize`` / ``print_qat``; ``CLI_TASKS`` registers them under the names of ``tasks.TASKS``."""

from __future__ import annotations

from . import classify, detect, fidelity
from ..common import VERBS, qat_task_name, task_name

__all__ = ["CLI_TASKS", "build_task"]

CLI_TASKS = {"classify": classify, "detect": detect, "fidelity": fidelity}


def build_task(args, model, info, verb: str):
    """The ``tasks.Task`` the options name (``--task``; ``auto`` as ``task_name`` / ``qat_task_name`` resolve it),
    built for ``verb``: ``quantize`` (``quantize`` / ``analyze``), ``score`` (``sensitivity`` / ``mixed``) or
    ``qat`` (``--train-data`` gives the task's calibration / training inputs); with the model's ``ModelInfo`` for it
    (a detector's decoder and class names). Each task's builder is its module's ``build``; a new task is one module
    here and its entry in ``CLI_TASKS``."""
    if verb not in VERBS:
        raise ValueError(f"verb {verb!r}: use one of {VERBS}")
    name = qat_task_name(args, info) if verb == "qat" else task_name(args, info)
    return CLI_TASKS[name].build(args, model, info, verb)
