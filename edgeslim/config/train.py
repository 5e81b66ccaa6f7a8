"""Training settings: ``QATConfig`` (``edgeslim qat``) and ``FinetuneConfig`` (fine-tuning after a structural change);
each gives the shared loop its ``Recipe``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import EdgeslimError
from ..quant.qat import METHODS, QUANTIZERS
from ..train.loop import Recipe
from .checks import Config, check_flag, check_int, check_number

__all__ = ["FinetuneConfig", "QATConfig"]


@dataclass(frozen=True)
class QATConfig(Config):
    """How to train. ``epochs`` or ``max_steps`` bounds the run (``max_steps`` wins when both are given).

    * ``quantizer`` / ``a_quantizer``: level sets of weights / activations (``a_quantizer`` defaults to
      ``quantizer``); ``method``: the gradient estimator (``quant.qat``).
    * ``lr`` is the peak of a cosine schedule over the whole run (per step, no warm-up); SGD with Nesterov
      momentum 0.9, ``weight_decay`` on weights only (not on biases or scales). The default 0.001 is low
      because BN is folded: the shared ResNet-20 diverged within 10 steps at 0.01 and trained at 0.001.
    * ``kd``: distil from the FP32 model: ``kd_weight * T^2 * KL(teacher || student)`` at temperature
      ``kd_temperature`` plus ``(1 - kd_weight)`` times the label cross-entropy.
    * ``dsq_alpha``: DSQ's alpha, annealed linearly from the first value to the second over the run.
    * ``daq_gamma``: DAQ's temperature constant (Kim et al. 2021, "Distance-aware quantization", use 2).
    * ``ewgs_every``: steps between Hessian-trace updates of EWGS's delta (default: one epoch, at most a
      fifth of the run); delta is 0 (plain STE) until the first update (Lee et al. 2021, sec. 3.3).
    """

    w_bits: int = 4
    a_bits: int = 4
    quantizer: str = "uniform"
    a_quantizer: str | None = None
    method: str = "lsq"
    epochs: int | None = 1
    max_steps: int | None = None
    lr: float = 0.001
    batch_size: int = 128
    weight_decay: float = 5e-4
    kd: bool = False
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    dsq_alpha: tuple[float, float] = (0.2, 0.01)
    daq_gamma: float = 2.0
    ewgs_every: int | None = None
    augment: bool = True
    seed: int = 0

    KIND = "QAT config"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: QAT trains 2 to 8 bits")
        for name in ("quantizer", "a_quantizer"):
            v = getattr(self, name)
            if v is not None and v not in QUANTIZERS:
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: use one of {', '.join(QUANTIZERS)}")
        if self.method not in METHODS:
            raise EdgeslimError(f"invalid --method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.epochs is None and self.max_steps is None:
            raise EdgeslimError("give --epochs N or --max-steps N")
        for name in ("epochs", "max_steps", "batch_size", "ewgs_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: use a positive integer")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or not math.isfinite(self.lr):
            raise EdgeslimError(f"invalid --lr {self.lr!r}: use a positive learning rate such as 0.01")
        check_number("--weight-decay", self.weight_decay, low=0)
        check_flag("--kd", self.kd)
        if not isinstance(self.kd_weight, (int, float)) or not 0.0 <= self.kd_weight <= 1.0:
            raise EdgeslimError(f"invalid kd weight {self.kd_weight!r}: use a value in [0, 1]")
        check_number("--kd-temperature", self.kd_temperature, low=0, open_low=True)
        a = self.dsq_alpha
        if not isinstance(a, (tuple, list)) or len(a) != 2 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a) \
                or not (0 < a[1] <= a[0] < 1):
            raise EdgeslimError(f"invalid DSQ alpha schedule {a!r}: use (start, end) with 0 < end <= start < 1")
        object.__setattr__(self, "dsq_alpha", tuple(a))
        check_number("DAQ gamma", self.daq_gamma, low=0, open_low=True)
        check_flag("--augment", self.augment)
        check_int("--seed", self.seed, minimum=0)

    @property
    def act_quantizer(self) -> str:
        return self.a_quantizer or self.quantizer

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["dsq_alpha"] = list(self.dsq_alpha)
        return d

    def recipe(self, n_images: int) -> Recipe:
        """The loop's recipe for ``n_images`` training images: ``max_steps``, else ``epochs`` full epochs."""
        spe = math.ceil(n_images / self.batch_size)
        steps = self.max_steps if self.max_steps is not None else self.epochs * spe
        return Recipe(steps, self.lr, self.batch_size, self.weight_decay, self.augment, self.seed)


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """Fine-tuning with distillation from the unchanged model (``algorithms.finetune``)."""

    epochs: float = 1.0  # may be fractional: the step budget is epochs x steps per epoch
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    kd: bool = True  # distil from the teacher (KL to its softened predictions)
    kd_weight: float = 1.0  # weight of the KL term; the rest (1 - kd_weight) is cross-entropy on the labels
    temperature: float = 1.0
    augment: bool = True
    seed: int = 0

    KIND = "fine-tuning config"

    def __post_init__(self) -> None:
        check_number("fine-tuning epochs", self.epochs, low=0, open_low=True)
        check_number("learning rate", self.lr, low=0, open_low=True)
        check_int("batch size", self.batch_size)
        check_number("weight decay", self.weight_decay, low=0)
        check_flag("kd", self.kd)
        check_number("KD weight", self.kd_weight, low=0, high=1)
        check_number("temperature", self.temperature, low=0, open_low=True)
        check_flag("augment", self.augment)
        check_int("seed", self.seed, minimum=0)

    def total_steps(self, n_images: int) -> int:
        """Optimizer steps for ``n_images`` training images: ``epochs`` x steps per epoch, at least one."""
        return max(1, round(self.epochs * math.ceil(n_images / self.batch_size)))

    def recipe(self, n_images: int) -> Recipe:
        return Recipe(self.total_steps(n_images), self.lr, self.batch_size, self.weight_decay, self.augment, self.seed)
