"""The training losses: knowledge distillation for classifiers, head distillation for detectors and output
distillation for any model (the label-free fidelity task)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "head_distillation", "output_distillation"]


def distillation_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, *,
                      weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a neural network"):
    ``weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * CE(labels)`` at temperature ``T`` (the ``T^2``
    keeps the gradient scale independent of ``T``); plain cross-entropy without teacher logits."""
    ce = F.cross_entropy(logits, y)
    if teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                  reduction="batchmean") * t * t
    return weight * kl + (1 - weight) * ce


def head_distillation(student, teacher) -> torch.Tensor:
    """Label-free loss for models with several raw outputs (detector heads): the mean squared error between the
    student's and the teacher's outputs after a sigmoid, averaged over the outputs. The sigmoid is the squash the
    YOLO / FastestDet decoders apply to objectness and class scores (Redmon and Farhadi 2018, "YOLOv3"); it keeps
    the many confidently empty cells (logits far below zero) from dominating the loss."""
    s = [student] if isinstance(student, torch.Tensor) else list(student)
    t = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    return sum(F.mse_loss(torch.sigmoid(a), torch.sigmoid(b)) for a, b in zip(s, t)) / len(s)


def output_distillation(student, teacher) -> torch.Tensor:
    """Label-free loss for any model: per output, the squared error to the FP32 model's output relative to that
    output's energy, ``||s - t||^2 / ||t||^2`` (the noise-to-signal ratio whose inverse is the SQNR the fidelity
    task reports), averaged over the outputs; scale-free, so outputs in different units weigh alike."""
    s = [student] if isinstance(student, torch.Tensor) else list(student)
    t = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    return sum((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-12) for a, b in zip(s, t)) / len(s)
