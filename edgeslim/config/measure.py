"""Measurement settings: ``MeasureOptions`` (how a job times and scores), ``AnalyzeOptions`` (the integer engine's
arithmetic for ``edgeslim analyze``) and ``DetectOptions`` (a detector's post-processing and measurement)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgeslimError
from .checks import Config, check_flag, check_int, check_number, one_of

__all__ = ["AnalyzeOptions", "DetectOptions", "FORMATS", "MeasureOptions", "REQUANT_MODES"]

FORMATS = ("onnx", "tflite", "tflm")  # deployment files a job writes (ONNX always; LiteRT / TFLM: export.tflm)
REQUANT_MODES = ("float", "fixed", "shift")  # the engine's requantization in `analyze` (engine.run)


@dataclass(frozen=True)
class MeasureOptions(Config):
    """How a job measures: onnxruntime threads and batches for latency, evaluation batch size, how many test
    images the PyTorch models are scored on, and which deployment formats it writes."""

    threads: int = 1
    latency_batches: tuple[int, ...] = (1, 64)
    latency_rounds: int = 200
    # each batch size's paired FP32 / INT8 timing stops after this many seconds once 20 rounds are done (None:
    # every round); the summary reports the rounds measured
    latency_seconds: float | None = 2.0
    batch_size: int = 256
    # the FP32 and INT8 files are scored on every test image in onnxruntime (all cores); the PyTorch models
    # (float and fake-quant simulation) on a seeded class-balanced subset of this many (None: all)
    simulation_images: int | None = 1000
    formats: tuple[str, ...] = ("onnx",)  # + "tflite" / "tflm": LiteRT and microcontroller files (export.tflm)

    KIND = "measure options"

    def __post_init__(self) -> None:
        check_int("--threads", self.threads)
        if isinstance(self.latency_batches, (str, bytes)) or not isinstance(self.latency_batches, (tuple, list)) \
                or not self.latency_batches:
            raise EdgeslimError(f"invalid latency batches {self.latency_batches!r}: use batch sizes, e.g. (1, 64)")
        for b in self.latency_batches:
            check_int("latency batch", b)
        object.__setattr__(self, "latency_batches", tuple(self.latency_batches))
        check_int("latency rounds", self.latency_rounds)
        check_number("latency seconds", self.latency_seconds, low=0, open_low=True, optional=True)
        check_int("--batch-size", self.batch_size)
        check_int("--simulate-size", self.simulation_images, optional=True)
        if isinstance(self.formats, (str, bytes)) or not isinstance(self.formats, (tuple, list)):
            raise EdgeslimError(f"invalid --formats {self.formats!r}: use a tuple of {', '.join(FORMATS)}")
        for f in self.formats:
            one_of("--formats entry", f, FORMATS)
        object.__setattr__(self, "formats", tuple(self.formats))


@dataclass(frozen=True)
class AnalyzeOptions(Config):
    """What ``edgeslim analyze`` runs and the engine's arithmetic: ``requant`` is ``float`` (onnxruntime's float
    multiplier), ``fixed`` (gemmlowp m0 * 2^-shift) or ``shift`` (pure bit shift; needs power-of-two scales,
    ``--scale pow2``); ``accumulator_bits`` 16 or 32, ``overflow_mode`` what a too-wide accumulator does."""

    engine: bool = True
    overflow: bool = True
    accumulator_bits: int = 32
    overflow_mode: str = "saturate"
    requant: str = "float"
    overflow_images: int = 256

    KIND = "analyze options"

    def __post_init__(self) -> None:
        check_flag("--engine", self.engine)
        check_flag("--overflow", self.overflow)
        if self.accumulator_bits not in (16, 32) or isinstance(self.accumulator_bits, bool):
            raise EdgeslimError(f"invalid --accumulator {self.accumulator_bits!r}: use 16 or 32")
        if self.overflow_mode not in ("saturate", "wrap"):
            raise EdgeslimError(f"invalid --overflow-mode {self.overflow_mode!r}: use saturate or wrap")
        if self.requant not in REQUANT_MODES:
            raise EdgeslimError(f"invalid --requant {self.requant!r}: use one of {', '.join(REQUANT_MODES)}")
        check_int("--overflow-images", self.overflow_images)


@dataclass(frozen=True)
class DetectOptions(Config):
    """A detector's post-processing and measurement settings (the usual mAP-evaluation thresholds by default)."""

    conf_thres: float = 0.001  # candidates for mAP (near-full recall)
    iou_thres: float = 0.6  # NMS
    cm_conf: float = 0.25  # confusion matrix: detections above this score count (Jang et al.: deployed threshold)
    cm_iou: float = 0.5
    batch_size: int = 8
    threads: int = 1
    latency_rounds: int = 30
    # the paired FP32 / INT8 timing stops after this many seconds once 20 rounds are done (None: every round; a
    # yolov5n round of the two files takes about 0.16 s here); the summary reports the rounds measured
    latency_seconds: float | None = 2.0
    # the ONNX files are scored on every test image; the PyTorch float and fake-quant models (about 3 s per
    # yolov5n image for the simulation) on the first this many (None: all)
    simulation_images: int | None = 16
    # also write model_fp32_decoded.onnx / model_int8_decoded.onnx: the box decoding in the graph (export.decoded)
    decoded_output: bool = False

    KIND = "detect options"

    def __post_init__(self) -> None:
        for name in ("conf_thres", "iou_thres", "cm_conf", "cm_iou"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), low=0, high=1)
        check_int("batch size", self.batch_size)
        check_int("--threads", self.threads)
        check_int("latency rounds", self.latency_rounds)
        check_number("latency seconds", self.latency_seconds, low=0, open_low=True, optional=True)
        check_int("--simulate-size", self.simulation_images, optional=True)
        check_flag("--decoded-output", self.decoded_output)
