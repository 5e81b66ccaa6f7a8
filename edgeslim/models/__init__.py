"""Model zoo and the one entry point that turns a user's model spec into a module.

The zoo is a flat dict so the CLI can list it and tests can iterate it. Each entry
carries a ``ModelInfo`` because calibration data, evaluation and ONNX export all need
the input shape and normalization, and those must travel with the model rather than be
re-typed by the user. Architectures are written in this package (no torchvision) with
parameter names that match the public checkpoints.

A spec is either a zoo name (``resnet20``) or ``package.module:factory`` /
``path/to/file.py:factory`` for the user's own network; the factory is called with no
arguments and must return an ``nn.Module``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from edgeslim.errors import EdgeslimError
from edgeslim.io.checkpoints import load_weights
from edgeslim.models.digits_cnn import digits_cnn
from edgeslim.models.mobilenet_v2 import mobilenet_v2
from edgeslim.models.resnet import resnet18, resnet50
from edgeslim.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline must know about a model's input and output.

    ``mean``/``std`` apply to pixels already scaled to [0, 1] (one value per channel).
    ``num_classes`` is 0 for a user model whose output is not a (batch, classes) tensor.
    """

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[[], nn.Module]
    info: ModelInfo


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
    if spec in ZOO:
        entry = ZOO[spec]
        model, info = entry.factory(), entry.info
    elif ":" in spec:
        model = _call_factory(spec)
        info = _user_info(spec, model, input_shape)
    else:
        raise EdgeslimError(
            f"unknown model '{spec}': use one of {', '.join(ZOO)} or 'package.module:factory'"
        )
    info = _apply_overrides(info, spec, input_shape, mean, std)
    if info.num_classes < 0:
        info = replace(info, num_classes=_infer_num_classes(model, info, spec))
    if weights is not None:
        load_weights(model, weights, allow_pickle=allow_pickle, name=spec)
    return model.eval(), info


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


__all__ = ["ZOO", "ModelEntry", "ModelInfo", "build_model", "parse_shape", "IMAGENET_MEAN", "IMAGENET_STD"]
