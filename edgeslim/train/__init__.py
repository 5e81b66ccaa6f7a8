"""Training: the one SGD / cosine / distillation loop (``loop``), in-memory training data and its seeded order
(``data``), ``torchrun`` replicas (``dist``), atomic checkpoints with exact resume (``checkpoint``) and the
losses (``losses``). Quantization-aware training (``algorithms.qat``) and fine-tuning (``algorithms.finetune``)
are this loop plus their own hooks."""

from .checkpoint import Checkpoint, params_digest
from .data import TrainData, augment, load_train
from .dist import Dist
from .loop import Batch, Recipe, fit
from .losses import distillation_loss, head_distillation

__all__ = ["Batch", "Checkpoint", "Dist", "Recipe", "TrainData", "augment", "distillation_loss", "fit",
           "head_distillation", "load_train", "params_digest"]
