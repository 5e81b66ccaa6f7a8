"""Model zoo and the one entry point that turns a user's model spec into a module.

The zoo is a flat dict so the CLI can list it and tests can iterate it. Each entry
carries a ``ModelInfo`` because calibration data, evaluation and ONNX export all need
the input shape and normalization, and those must travel with the model rather than be
re-typed by the user. Architectures are written in this package (no torchvision) with
parameter names that match the public checkpoints.

Detectors (``DETECTORS``: yolov5n/s, yolov3-tiny, fastestdet) return their raw head tensors; their
``ModelInfo`` has ``task="detect"``, the class names and the numpy ``decoder`` that turns those tensors
into boxes and scores. They live in their own dict because every ``ZOO`` entry is a classifier.

A spec is either a zoo name (``resnet20``) or ``package.module:factory`` /
``path/to/file.py:factory`` for the user's own network; the factory is called with no
arguments and must return an ``nn.Module``. A ``path/to/model.onnx`` spec imports a float ONNX
model (``edgeslim.io.onnx_import``); its input shape comes from the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.io.checkpoints import load_weights
from edgeslim.models.digits_cnn import digits_cnn
from edgeslim.models.fastestdet import FastestDetDecoder, fastestdet
from edgeslim.models.mobilenet_v2 import mobilenet_v2
from edgeslim.models.resnet import resnet18, resnet50
from edgeslim.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56
from edgeslim.models.yolo import (COCO_NAMES, YOLOV3_TINY_ANCHORS, YOLOV5_ANCHORS, YoloV3Decoder, YoloV5Decoder,
                                  detection_groups, yolov3_tiny, yolov5, yolov5_cfg)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline must know about a model's input and output.

    ``mean``/``std`` apply to pixels already scaled to [0, 1] (one value per channel).
    ``num_classes`` is 0 for a user model whose output is not a (batch, classes) tensor.
    Detectors (``task="detect"``) carry ``class_names``, the ``channel_order`` their weights were trained
    on (FastestDet: BGR) and a ``decoder``: raw outputs (numpy) -> ``(N, boxes, 4 + classes)``.
    """

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    task: str = "classify"
    class_names: tuple[str, ...] = ()
    channel_order: str = "RGB"
    decoder: Callable[[Sequence], object] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[[], nn.Module]
    info: ModelInfo
    # For weight files that carry the architecture (YOLOv5 pickles: layer dict, anchors, class names):
    # builds the model from the file and returns the info it implies. None: factory() + load_weights.
    load: Callable[[Path, ModelInfo], tuple[nn.Module, ModelInfo]] | None = None


def _cifar(name: str) -> ModelInfo:
    return ModelInfo(name, (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, 10)


def _imagenet(name: str) -> ModelInfo:
    return ModelInfo(name, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, 1000)


# digits pixels (0..16) are divided by 16 in the data layer, then normalized to ~[-1, 1].
ZOO: dict[str, ModelEntry] = {
    "resnet20": ModelEntry(resnet20, _cifar("resnet20")),
    "resnet32": ModelEntry(resnet32, _cifar("resnet32")),
    "resnet44": ModelEntry(resnet44, _cifar("resnet44")),
    "resnet56": ModelEntry(resnet56, _cifar("resnet56")),
    "resnet18": ModelEntry(resnet18, _imagenet("resnet18")),
    "resnet50": ModelEntry(resnet50, _imagenet("resnet50")),
    "mobilenet_v2": ModelEntry(mobilenet_v2, _imagenet("mobilenet_v2")),
    "digits_cnn": ModelEntry(digits_cnn, ModelInfo("digits_cnn", (1, 8, 8), (0.5,), (0.5,), 10)),
}


def _detector(name: str, size: int, decoder: Callable, channel_order: str = "RGB") -> ModelInfo:
    """Pixels / 255, no normalization (what YOLO and FastestDet train on)."""
    return ModelInfo(name, (3, size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), len(COCO_NAMES), task="detect",
                     class_names=COCO_NAMES, channel_order=channel_order, decoder=decoder)


def _load_yolov5(size: str, path: Path, info: ModelInfo) -> tuple[nn.Module, ModelInfo]:
    from edgeslim.io.yolov5_loader import load_yolov5  # imported here: the loader imports this package

    model, meta = load_yolov5(path, cfg=yolov5_cfg(size))
    return model, replace(info, num_classes=meta["nc"], class_names=tuple(meta["names"]),
                          decoder=model.make_decoder())


def _yolov5_entry(size: str) -> ModelEntry:
    info = _detector(f"yolov5{size}", 640, YoloV5Decoder(YOLOV5_ANCHORS, (8, 16, 32), len(COCO_NAMES)))
    return ModelEntry(partial(yolov5, size), info, load=partial(_load_yolov5, size))


# COCO detectors; weights: a YOLOv5 .pt (read without its code), FastestDet's published state_dict.
DETECTORS: dict[str, ModelEntry] = {
    "yolov5n": _yolov5_entry("n"),
    "yolov5s": _yolov5_entry("s"),
    "yolov3-tiny": ModelEntry(yolov3_tiny, _detector("yolov3-tiny", 416, YoloV3Decoder(
        YOLOV3_TINY_ANCHORS, (16, 32), len(COCO_NAMES)))),
    "fastestdet": ModelEntry(fastestdet, _detector("fastestdet", 352, FastestDetDecoder(len(COCO_NAMES)), "BGR")),
}


def build_model(spec: str, weights: str | Path | None = None, *, allow_pickle: bool = False,
                input_shape: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build the model named by ``spec``, optionally load ``weights``, return it in eval mode.

    ``input_shape``/``mean``/``std`` override the zoo's values (e.g. ImageNet models at
    160x160). A user model takes them from these arguments, else from an
    ``edgeslim_info`` attribute (a ``ModelInfo`` or dict) on the returned module; without
    an input shape we stop, because guessing it would calibrate on the wrong data. Its
    ``num_classes`` comes from one dry forward pass when not declared.
    """
    spec = spec.strip()
    entry = ZOO.get(spec) or DETECTORS.get(spec)
    if entry is not None and weights is not None and entry.load is not None:
        model, info = entry.load(Path(weights), entry.info)
        weights = None  # loaded with the architecture
    elif entry is not None:
        model, info = entry.factory(), entry.info
    elif spec.lower().endswith(".onnx"):  # checked before ':' (a Windows drive letter)
        if weights is not None:
            raise EdgeslimError(f"model '{spec}' is an ONNX file, which carries its own weights: drop --weights")
        from edgeslim.io.onnx_import import import_onnx

        model = import_onnx(spec, tuple(input_shape) if input_shape is not None else None)
        if len(model.meta.get("onnx_input_names", [])) > 1:
            raise EdgeslimError(f"model '{spec}' takes {len(model.meta['onnx_input_names'])} inputs "
                                f"({', '.join(model.meta['onnx_input_names'])}): edgeslim quantizes single-input models; "
                                "export a version with one image input")
        info = _user_info(spec, model, input_shape if input_shape is not None else model.meta["onnx_input_shape"])
    elif spec.lower().endswith((".pt", ".pth", ".pkl", ".th")) and Path(spec).is_file():
        model = _whole_model(spec, weights, allow_pickle)
        weights = None
        info = _user_info(spec, model, input_shape)
    elif ":" in spec:
        model = _call_factory(spec)
        info = _user_info(spec, model, input_shape)
    else:
        raise EdgeslimError(
            f"unknown model '{spec}': use one of {', '.join([*ZOO, *DETECTORS])} or 'package.module:factory'"
        )
    info = _apply_overrides(info, spec, input_shape, mean, std)
    if info.num_classes < 0:
        info = replace(info, num_classes=_infer_num_classes(model, info, spec))
    if weights is not None:
        load_weights(model, weights, allow_pickle=allow_pickle, name=spec)
    return model.eval(), info


def detector_decoders(nc: int) -> dict[str, Callable]:
    """Decoders a detection model from elsewhere (an ONNX file) can name with ``--decoder``."""
    return {"yolov5": YoloV5Decoder(YOLOV5_ANCHORS, (8, 16, 32), nc),
            "yolov3-tiny": YoloV3Decoder(YOLOV3_TINY_ANCHORS, (16, 32), nc),
            "fastestdet": FastestDetDecoder(nc),
            "fastestdet-activated": FastestDetDecoder(nc, activated=True)}


def as_detector(info: ModelInfo, decoder: str | None, class_names: Sequence[str], channel_order: str | None) -> ModelInfo:
    """``info`` of a model used for detection: the decoder (by name, for models that carry none), class names and
    channel order (``RGB`` / ``BGR``)."""
    if channel_order is not None and channel_order not in ("RGB", "BGR"):
        raise EdgeslimError(f"invalid --channel-order {channel_order!r}: use RGB or BGR")
    changes: dict = {"task": "detect"}
    if decoder is not None:
        table = detector_decoders(len(class_names) or info.num_classes)
        if decoder not in table:
            raise EdgeslimError(f"unknown --decoder {decoder!r}: use one of {', '.join(table)}")
        changes["decoder"] = table[decoder]
    elif info.decoder is None:
        raise EdgeslimError(f"model {info.name} has no detection decoder: pass --decoder "
                            f"({', '.join(detector_decoders(1))})")
    if class_names and not info.class_names:
        changes["class_names"] = tuple(class_names)
    if channel_order is not None:
        changes["channel_order"] = channel_order
    return replace(info, **changes)


def model_groups(model: nn.Module, info: ModelInfo) -> dict[str, tuple[str, ...]]:
    """The layer groups a detector declares (``backbone`` / ``neck`` / ``head``: fnmatch patterns over plan names)."""
    if getattr(model, "groups", None) is None:
        raise EdgeslimError(f"model {info.name} declares no layer groups (backbone / neck / head): "
                            "name them yourself as NAME=PATTERN, e.g. head='head.*'")
    return {g: tuple(p) for g, p in detection_groups(model).items()}


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse the CLI's ``C,H,W`` (also ``CxHxW``) into a tuple of three positive ints."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise EdgeslimError(f"input shape '{text}' is not C,H,W: pass three positive integers, e.g. 3,224,224")
    return dims  # type: ignore[return-value]


def _whole_model(spec: str, weights, allow_pickle: bool) -> nn.Module:
    """A model saved whole with ``torch.save(model)`` (needs ``--allow-pickle``: unpickling runs code)."""
    from edgeslim.io.checkpoints import load_torch_file

    if weights is not None:
        raise EdgeslimError(f"model '{spec}' is a file holding the model itself: drop --weights")
    obj = load_torch_file(spec, allow_pickle)
    if isinstance(obj, nn.Module):
        return obj
    raise EdgeslimError(f"'{spec}' holds {type(obj).__name__}, not a model (a state_dict holds weights only): pass the "
                        "architecture as MODEL (package.module:factory or path/file.py:factory) and this file as --weights")


def _call_factory(spec: str) -> nn.Module:
    module_part, _, attr_path = spec.rpartition(":")
    if not module_part or not attr_path:
        raise EdgeslimError(f"model spec '{spec}' is malformed: write it as 'package.module:factory'")
    module = _import(module_part, spec)
    obj: object = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise EdgeslimError(
                f"model spec '{spec}': module '{module_part}' has no attribute '{attr_path}': "
                "check the factory name after the colon"
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise EdgeslimError(f"model spec '{spec}': '{attr_path}' is not callable: point it at a function "
                            "or class that builds the model")
    try:
        model = obj()
    except Exception as exc:  # the user's code: report it on one line, not as a traceback
        raise EdgeslimError(
            f"model factory '{spec}' raised {type(exc).__name__}: {_one_line(exc)}; "
            "make it callable with no arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise EdgeslimError(
            f"model factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module: "
            "return the model instance"
        )
    return model


def _import(module_part: str, spec: str) -> object:
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise EdgeslimError(f"model spec '{spec}': file '{path}' does not exist: check the path")
        name = f"edgeslim_user_{path.stem}"
        try:
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)  # type: ignore[arg-type]
            sys.modules[name] = module
            mspec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            sys.modules.pop(name, None)
            raise EdgeslimError(
                f"model spec '{spec}': importing '{path}' raised {type(exc).__name__}: {_one_line(exc)}; "
                "fix that file"
            ) from None
        return module
    # Console scripts do not put the working directory on sys.path; users expect
    # `edgeslim ... --model mymodels:build` to find ./mymodels.py, as `python -m` would.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_part or module_part.startswith(exc.name + ".")):
            raise EdgeslimError(
                f"model spec '{spec}': cannot import module '{module_part}': "
                "check the name and that it is on PYTHONPATH (or pass path/to/file.py:factory)"
            ) from None
        raise EdgeslimError(
            f"model spec '{spec}': module '{module_part}' imports missing module '{exc.name}': install it"
        ) from None
    except Exception as exc:
        raise EdgeslimError(
            f"model spec '{spec}': importing '{module_part}' raised {type(exc).__name__}: "
            f"{_one_line(exc)}; fix that module"
        ) from None


def _user_info(spec: str, model: nn.Module, input_shape: Sequence[int] | None) -> ModelInfo:
    """Info from the module's ``edgeslim_info``; unknown ``num_classes`` is marked -1."""
    declared = getattr(model, "edgeslim_info", None)
    if isinstance(declared, ModelInfo):
        return declared
    values: dict[str, object] = {}
    if isinstance(declared, Mapping):
        known = {f.name for f in fields(ModelInfo)}
        values = {k: v for k, v in declared.items() if k in known}
    elif declared is not None:
        raise EdgeslimError(
            f"model '{spec}' has edgeslim_info of type {type(declared).__name__}: "
            "set it to an edgeslim.models.ModelInfo or a dict"
        )
    shape = input_shape if input_shape is not None else values.get("input_shape")
    if shape is None:
        raise EdgeslimError(
            f"model '{spec}' does not declare its input shape: pass --input-shape C,H,W "
            "(or set an edgeslim_info attribute on the model)"
        )
    shape = _check_shape(shape, spec)
    return ModelInfo(
        name=str(values.get("name", spec)),
        input_shape=shape,
        mean=tuple(values.get("mean", (0.0,) * shape[0])),  # type: ignore[arg-type]
        std=tuple(values.get("std", (1.0,) * shape[0])),  # type: ignore[arg-type]
        num_classes=int(values.get("num_classes", -1)),  # type: ignore[call-overload]
    )


def _apply_overrides(info: ModelInfo, spec: str, input_shape: Sequence[int] | None,
                     mean: Sequence[float] | None, std: Sequence[float] | None) -> ModelInfo:
    shape = _check_shape(input_shape if input_shape is not None else info.input_shape, spec)
    m = tuple(float(v) for v in (mean if mean is not None else info.mean))
    s = tuple(float(v) for v in (std if std is not None else info.std))
    for label, vals in (("mean", m), ("std", s)):
        if len(vals) not in (1, shape[0]):
            raise EdgeslimError(
                f"model '{spec}': {label} has {len(vals)} values for {shape[0]} input channels: "
                f"pass 1 or {shape[0]} values"
            )
    if min(s) <= 0:
        raise EdgeslimError(f"model '{spec}': std {s} has a value <= 0: pass positive std values")
    return replace(info, input_shape=shape, mean=m, std=s)


def _check_shape(shape: object, spec: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise EdgeslimError(f"model '{spec}': input shape {shape!r} is not C,H,W: pass three positive integers")
    return dims  # type: ignore[return-value]


def _infer_num_classes(model: nn.Module, info: ModelInfo, spec: str) -> int:
    """One dry forward pass: also catches a wrong --input-shape before calibration starts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *info.input_shape))
    except Exception as exc:
        raise EdgeslimError(
            f"model '{spec}' fails on input shape {info.input_shape} ({type(exc).__name__}: "
            f"{_one_line(exc)}): pass the --input-shape the model was built for"
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__


__all__ = ["ZOO", "DETECTORS", "ModelEntry", "ModelInfo", "build_model", "model_groups", "parse_shape",
           "IMAGENET_MEAN", "IMAGENET_STD"]
