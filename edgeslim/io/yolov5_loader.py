"""Read an ultralytics YOLOv5 checkpoint without its code and without running anything it pickles.

A YOLOv5 ``.pt`` is a pickled whole model (``{'model': DetectionModel, 'ema': ..., ...}`` made of
``models.common.*`` / ``models.yolo.*`` classes, GPL-3.0 code we neither have nor want). ``torch.load``
with ``weights_only=True`` refuses it, and ``weights_only=False`` would import and run whatever the file
names. Instead we hand ``torch.load`` a restricted unpickler (its ``pickle_module`` argument; torch keeps
its own storage handling, so tensors load as usual onto the CPU):

* every ``models.*`` / ``utils.*`` / ``torch.nn.modules.*`` class becomes a ``PickledObject`` stand-in
  that only records the state pickle gives it (no ``__setstate__`` of the real class runs);
* a short allow-list (``ALLOWED_GLOBALS``) of torch tensor rebuilders, ``OrderedDict``, ``set``, dtypes and
  numpy scalar / array reconstruction resolves to the real objects;
* anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises a one-line
  ``EdgeslimError`` naming the global, before it is ever called.

Then the embedded layer dict (``model.yaml``) rebuilds the network from our own definitions
(``edgeslim.models.yolo.YoloNet``) and every parameter / buffer found in the stand-in tree is loaded into
it with strict key and shape checks.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgeslimError
from ..models.yolo import YoloNet
from .checkpoints import check_compatible

__all__ = ["ALLOWED_GLOBALS", "STAND_IN_PREFIXES", "RefusedGlobal", "PickledObject", "RestrictedUnpickler",
           "read_restricted", "load_yolov5"]


# (module, name) -> object. Only constructors of plain data (what YOLOv5 checkpoints hold: tensors and
# parameters, OrderedDict, set, dtypes, numpy scalars such as best_fitness); none can call into the file.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles spell bytes (numpy array data) this way
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
ALLOWED_GLOBALS.update({("torch", n): getattr(torch, n) for n in _DTYPE_NAMES})
try:  # numpy 2 moved numpy.core to numpy._core; pickles name either
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
for _np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED_GLOBALS[(_np_core, "scalar")] = _multiarray.scalar
    ALLOWED_GLOBALS[(_np_core, "_reconstruct")] = _multiarray._reconstruct
ALLOWED_GLOBALS.update({("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray})
# Modules whose classes become stand-ins (the checkpoint's own code and torch's module classes).
STAND_IN_PREFIXES = ("models.", "utils.", "torch.nn.modules.")
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RefusedGlobal(EdgeslimError):
    """A global outside the allow-list; ``read_restricted`` turns it into the user-facing message."""


class PickledObject:
    """Stands in for a class named in the file: keeps the pickled state, runs none of the class's code."""

    qualname = "?"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            for part in state:
                if isinstance(part, Mapping):
                    self.__dict__.update(part)
        elif isinstance(state, Mapping):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` maps the checkpoint's classes to stand-ins, allows ``ALLOWED_GLOBALS``, refuses the rest."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        module = _PY2_MODULES.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module.startswith(STAND_IN_PREFIXES) and name.isidentifier() and not name.startswith("_"):
            qual = f"{module}.{name}"
            if qual not in self._stand_ins:
                self._stand_ins[qual] = type(name, (PickledObject,), {"qualname": qual})
            return self._stand_ins[qual]
        raise RefusedGlobal(f"{module}.{name}")


def _restricted_pickle_module() -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` uses: ``Unpickler`` for the data, ``load`` for legacy headers."""
    mod = types.ModuleType("edgeslim_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


def read_restricted(path: str | Path) -> object:
    """``torch.load`` through ``RestrictedUnpickler``: tensors on the CPU, the checkpoint's classes as stand-ins."""
    p = Path(path)
    if not p.exists():
        raise EdgeslimError(f"checkpoint '{p}' does not exist: check the path passed as weights")
    if not p.is_file():
        raise EdgeslimError(f"checkpoint '{p}' is not a file: pass the .pt file itself")
    try:
        return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    except RefusedGlobal as exc:
        raise EdgeslimError(
            f"checkpoint '{p}' refers to {exc}, which no weights file needs: refused to unpickle it (the file "
            "may be malicious); pass only checkpoints you trust, or re-save the weights as a state_dict"
        ) from None
    except Exception as exc:  # BadZipFile, EOFError, UnpicklingError, RuntimeError from torch's reader
        raise EdgeslimError(f"checkpoint '{p}' is corrupt or not a PyTorch checkpoint ({type(exc).__name__}): "
                            "pass a YOLOv5 .pt saved by torch.save") from None


def load_yolov5(path: str | Path, *, cfg: Mapping | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a YOLOv5 checkpoint as our ``YoloNet``; return it in eval mode and its metadata.

    Metadata: ``names`` (class names), ``stride``, ``anchors`` (pixels, one row per stride), ``nc``,
    ``imgsz`` (640), ``yaml`` (the layer dict). ``cfg`` is the expected layer dict: a file holding only
    a state_dict is built from it, and a whole-model checkpoint must match its depth / width multiples.

    >>> model, meta = load_yolov5("../shared/models/yolov5n.pt")  # doctest: +SKIP
    >>> meta["stride"], len(meta["names"])  # doctest: +SKIP
    ((8.0, 16.0, 32.0), 80)
    """
    obj = read_restricted(path)
    net = _find_model(obj)
    if net is None:
        sd = _plain_state_dict(obj)
        if sd is None or cfg is None:
            keys = ", ".join(repr(k) for k in list(obj)[:5]) if isinstance(obj, Mapping) else type(obj).__name__
            raise EdgeslimError(f"checkpoint '{path}' holds no YOLOv5 model (found {keys}): pass an ultralytics "
                                "YOLOv5 .pt, or a state_dict of edgeslim's yolov5 built by its zoo name")
        yaml, names, stride = dict(cfg), None, None
    else:
        yaml = net.__dict__.get("yaml")
        if not isinstance(yaml, Mapping):
            raise EdgeslimError(f"checkpoint '{path}' has a model without its layer dict (model.yaml): "
                                "pass a YOLOv5 .pt saved by ultralytics' train.py / export")
        yaml = dict(yaml)
        if "nc" in net.__dict__:
            yaml["nc"] = int(net.__dict__["nc"])
        names, stride = net.__dict__.get("names"), net.__dict__.get("stride")
        sd = dict(_tensors(net))
        _check_size(yaml, cfg, path)
    model = YoloNet(yaml).eval()
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    check_compatible(model, sd, path=path, name="YOLOv5 (built from the checkpoint's layer dict)")
    model.load_state_dict(sd, strict=True)
    det = model.detect
    if stride is not None and tuple(float(s) for s in torch.as_tensor(stride).flatten()) != det.stride:
        raise EdgeslimError(f"checkpoint '{path}' has strides {torch.as_tensor(stride).tolist()} but its layer "
                            f"dict gives {list(det.stride)}: the file is inconsistent, re-export it")
    anchors = (det.anchors * torch.tensor(det.stride).view(-1, 1, 1)).reshape(det.nl, -1)
    meta = {
        "names": _names(names, det.nc),
        "stride": det.stride,
        "anchors": [[round(float(a), 4) for a in row] for row in anchors],
        "nc": det.nc,
        "imgsz": 640,
        "yaml": model.cfg,
    }
    return model, meta


def _find_model(obj: object) -> PickledObject | None:
    if isinstance(obj, PickledObject):
        return obj
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):  # ultralytics' own preference: the EMA weights when present
            if isinstance(obj.get(key), PickledObject):
                return obj[key]
    return None


def _plain_state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _plain_state_dict(obj[key])
    return None


def _tensors(node: PickledObject, prefix: str = ""):
    """(name, tensor) for every parameter and persistent buffer in the stand-in tree, state_dict order."""
    state = node.__dict__
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if isinstance(t, torch.Tensor) and not (kind == "_buffers" and name in skip):
                yield prefix + name, t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            yield from _tensors(child, f"{prefix}{name}.")


def _check_size(yaml: Mapping, cfg: Mapping | None, path: str | Path) -> None:
    if cfg is None:
        return
    got = (float(yaml.get("depth_multiple", 0)), float(yaml.get("width_multiple", 0)))
    want = (float(cfg["depth_multiple"]), float(cfg["width_multiple"]))
    if got != want:
        raise EdgeslimError(f"checkpoint '{path}' is a YOLOv5 with depth/width multiples {got[0]}/{got[1]}, not "
                            f"the requested {want[0]}/{want[1]}: build it with the matching yolov5 name")


def _names(names: object, nc: int) -> list[str]:
    if isinstance(names, Mapping):
        names = [names[k] for k in sorted(names)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [f"class{i}" for i in range(nc)]
