"""Every option config in one place: small frozen dataclasses, validated on construction (one-line
``EdgeslimError`` naming the field, the bad value and the fix) and round-trippable to JSON (``to_dict`` /
``from_dict``, unknown keys refused). One module per area:

* ``quantize``: ``PTQConfig``, ``Reconstruction`` (AdaRound / BRECQ), ``MixedPlan`` and the small JSON readers;
* ``train``: ``QATConfig``, ``FinetuneConfig``;
* ``measure``: ``MeasureOptions``, ``AnalyzeOptions`` (the engine's arithmetic), ``DetectOptions``;
* ``search``: ``Budget`` (``mixed``), ``Requirement`` and ``PlanOptions`` (``plan``);
* ``checks``: the field checks and the ``Config`` base they share.

Deployment targets are not here: they are entries of a device table (``targets.TARGETS``, or a JSON file).
"""

from .checks import Config
from .measure import FORMATS, REQUANT_MODES, AnalyzeOptions, DetectOptions, MeasureOptions
from .quantize import (ALGORITHMS, CALIBRATORS, GRANULARITIES, MAX_JSON_BYTES, SCALES, SCHEMES, WEIGHT_RANGES,
                       MixedPlan, PTQConfig, Reconstruction, check_precision_value, load_json)
from .search import PLAN_STEPS, Budget, PlanOptions, Requirement
from .train import FinetuneConfig, QATConfig

__all__ = ["ALGORITHMS", "AnalyzeOptions", "Budget", "CALIBRATORS", "Config", "DetectOptions", "FORMATS",
           "FinetuneConfig", "GRANULARITIES", "MAX_JSON_BYTES", "MeasureOptions", "MixedPlan", "PLAN_STEPS",
           "PTQConfig", "PlanOptions", "QATConfig", "REQUANT_MODES", "Reconstruction", "Requirement", "SCALES",
           "SCHEMES", "WEIGHT_RANGES", "check_precision_value", "load_json"]
