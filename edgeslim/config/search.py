"""What a search must meet and how it runs: ``Budget`` (``edgeslim mixed``), ``Requirement`` and ``PlanOptions``
(``edgeslim plan``, the G1-G5 lightweighting loop)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import EdgeslimError
from .checks import Config, check_int, check_number
from .train import FinetuneConfig

if TYPE_CHECKING:
    from ..algorithms.mixed_precision import Metric

__all__ = ["Budget", "PLAN_STEPS", "PlanOptions", "Requirement"]

PLAN_STEPS = ("G1", "G2", "G3", "G4", "G5")  # the TTA guideline's lightweighting steps, in its order


@dataclass(frozen=True)
class Budget(Config):
    """What the mixed-precision search must meet, in the metric's budget units (``Metric.unit``).

    ``max_drop``: how far below the FP32 model's score the plan may fall (points of top-1 or mAP: 0.5 = half a
    point); ``min_score``: a floor in the metric's own value (dB for SQNR, the label-free metric, whose FP32
    value is infinite); ``max_size_bytes`` / ``max_latency_ms``: costs.
    """

    max_drop: float | None = None
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None
    min_score: float | None = None

    KIND = "budget"

    def __post_init__(self) -> None:
        if all(v is None for v in (self.max_drop, self.min_score, self.max_size_bytes, self.max_latency_ms)):
            raise EdgeslimError("give a budget: --max-drop (accuracy), --min-sqnr (label-free), --max-size-kb or "
                                "--max-latency-ms")
        for name, v in (("--max-drop", self.max_drop), ("--max-size-kb", self.max_size_bytes),
                        ("--max-latency-ms", self.max_latency_ms)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v < 0):
                raise EdgeslimError(f"invalid {name} {v!r}: use a non-negative number")
        if self.min_score is not None and (not isinstance(self.min_score, (int, float))
                                           or isinstance(self.min_score, bool) or not math.isfinite(self.min_score)):
            raise EdgeslimError(f"invalid --min-sqnr {self.min_score!r}: use a finite number of dB")

    @property
    def has_quality(self) -> bool:
        return self.max_drop is not None or self.min_score is not None

    def floor(self, metric: Metric, fp32_score: float) -> float:
        """The lowest metric value that meets the budget (-inf without a quality budget)."""
        floors = [-math.inf]
        if self.max_drop is not None:
            if not math.isfinite(fp32_score):
                raise EdgeslimError(f"--max-drop is a drop from the FP32 model's {metric.name}, which is infinite for "
                                    f"a label-free model: give the floor instead (--min-sqnr DB)")
            floors.append(fp32_score - self.max_drop / metric.per_unit)
        if self.min_score is not None:
            floors.append(self.min_score)
        return max(floors)

    def to_dict(self) -> dict:
        return {"max_drop": self.max_drop, "min_score": self.min_score, "max_size_bytes": self.max_size_bytes,
                "max_latency_ms": self.max_latency_ms}


@dataclass(frozen=True)
class Requirement(Config):
    """What the user needs: accuracy drop in points, latency per image (onnxruntime, batch 1), stored size."""

    max_drop: float | None = None  # points of top-1 (1.0 = one point)
    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    max_ram_kb: float | None = None  # TFLM tensor arena of the int8 .tflite (mcu targets; tflm_ram_bytes)

    KIND = "requirement"

    def __post_init__(self) -> None:
        if self.max_drop is None and self.max_latency_ms is None and self.max_size_kb is None \
                and self.max_ram_kb is None:
            raise EdgeslimError("give a target: --max-drop POINTS, --max-latency-ms MS and/or --max-size-kb KB")
        for name, v in asdict(self).items():
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0
                                  or not math.isfinite(v)):
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v!r}: use a non-negative number")

    def excess(self, row: dict, fp32_top1: float) -> float:
        """How far ``row`` is from the requirement: the sum of relative overshoots (0 when it holds)."""
        total = 0.0
        if self.max_drop is not None:
            total += max(0.0, (fp32_top1 - row["top1"]) * 100 - self.max_drop) / max(self.max_drop, 0.1)
        if self.max_latency_ms is not None:
            total += max(0.0, row["latency_ms"] / max(self.max_latency_ms, 1e-9) - 1)
        if self.max_size_kb is not None:
            total += max(0.0, row["size_bytes"] / max(self.max_size_kb * 1024, 1e-9) - 1)
        if self.max_ram_kb is not None:  # a model TFLM cannot run in int8 (FP32) is as far as it gets
            ram = row.get("ram_bytes")
            total += 1.0 if ram is None else max(0.0, ram / max(self.max_ram_kb * 1024, 1e-9) - 1)
        return total

    def failures(self, row: dict, fp32_top1: float) -> list[str]:
        out = []
        if self.max_drop is not None and (fp32_top1 - row["top1"]) * 100 > self.max_drop + 1e-9:
            out.append(f"accuracy drop {(fp32_top1 - row['top1']) * 100:.2f} > {self.max_drop:g} points")
        if self.max_latency_ms is not None and row["latency_ms"] > self.max_latency_ms:
            out.append(f"latency {row['latency_ms']:.3f} > {self.max_latency_ms:g} ms")
        if self.max_size_kb is not None and row["size_bytes"] > self.max_size_kb * 1024:
            out.append(f"size {row['size_bytes'] / 1024:.1f} > {self.max_size_kb:g} KiB")
        if self.max_ram_kb is not None:
            ram = row.get("ram_bytes")
            if ram is None:
                out.append("no int8 TFLM arena (not an all-int8 TFLite model)")
            elif ram > self.max_ram_kb * 1024:
                out.append(f"TFLM arena {ram / 1024:.1f} > {self.max_ram_kb:g} KiB")
        return out


@dataclass(frozen=True)
class PlanOptions(Config):
    """How ``edgeslim plan`` runs: which steps, the fine-tuning budget and recipe, the pruning / factorization
    amounts, the G1 backbone, measurement, and the learned rounding of the sub-8-bit roads."""

    steps: tuple[str, ...] = PLAN_STEPS
    budget_epochs: float = 3.0  # fine-tuning epochs shared by the steps that change weights
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    calib_size: int = 512
    holdout_size: int = 1000  # training images kept out of fine-tuning: every choice is scored on them
    prune_macs: float = 0.5  # G5 channel pruning: keep this fraction of MACs
    sparsity: float | None = None  # G5 magnitude pruning: fraction of weights set to zero; None: what the size needs
    factor_share: float = 0.5  # G2: factorize the heaviest convs covering this share of conv MACs
    factor_reduction: float = 0.5  # G2: each factorized conv keeps at most this fraction of its MACs
    backbone: str | None = None  # G1: "shufflenet_v2:0.5" / "mobilenet_v2:1.0" (name:width); None skips G1
    threads: int = 1
    latency_rounds: int = 100
    lowbit_method: str = "brecq"  # learned rounding of the sub-8-bit roads: "brecq" or "adaround"
    lowbit_iters: int = 300  # its iterations per unit

    KIND = "plan options"

    def __post_init__(self) -> None:
        bad = [s for s in self.steps if s not in PLAN_STEPS]
        if isinstance(self.steps, str) or bad or not self.steps:
            raise EdgeslimError(f"invalid --steps {','.join(map(str, self.steps))}: use a comma list of "
                                f"{', '.join(PLAN_STEPS)}")
        object.__setattr__(self, "steps", tuple(self.steps))
        check_number("--budget-epochs", self.budget_epochs, low=0)
        if not isinstance(self.finetune, FinetuneConfig):
            raise EdgeslimError(f"invalid fine-tuning settings {self.finetune!r}: use a FinetuneConfig")
        check_int("--calib-size", self.calib_size)
        if self.lowbit_method not in ("brecq", "adaround"):
            raise EdgeslimError(f"invalid --lowbit-method {self.lowbit_method!r}: use brecq or adaround")
        if not isinstance(self.holdout_size, int) or self.holdout_size < 1:
            raise EdgeslimError(f"invalid --holdout-size {self.holdout_size!r}: use 1 or more images")
        if not isinstance(self.lowbit_iters, int) or self.lowbit_iters < 1:
            raise EdgeslimError(f"invalid --lowbit-iters {self.lowbit_iters!r}: use 1 or more")
        if self.sparsity is not None and (not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1):
            raise EdgeslimError(f"invalid --sparsity {self.sparsity!r}: use a fraction between 0 and 1")
        check_number("--prune-macs", self.prune_macs, low=0, high=1, open_low=True)
        check_number("--factor-share", self.factor_share, low=0, high=1, open_low=True)
        check_number("--factor-reduction", self.factor_reduction, low=0, high=1, open_low=True, open_high=True)
        if self.backbone is not None and (not isinstance(self.backbone, str) or not self.backbone.strip()):
            raise EdgeslimError(f"invalid --backbone {self.backbone!r}: use NAME:WIDTH, e.g. mobilenet_v2:1.0")
        check_int("--threads", self.threads)
        check_int("latency rounds", self.latency_rounds)

    @classmethod
    def from_dict(cls, d: dict) -> "PlanOptions":
        if isinstance(d, dict) and isinstance(d.get("finetune"), dict):
            d = {**d, "finetune": FinetuneConfig.from_dict(d["finetune"])}
        return super().from_dict(d)
