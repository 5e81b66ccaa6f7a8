"""Read weight files safely and load them into models with readable errors.

Checkpoints in the wild come as plain state_dicts, wrapped in ``{'state_dict': ...}``
(often with a DataParallel ``module.`` prefix), ``{'model': ...}`` or
``{'model_state_dict': ...}``. We unwrap those so users need not re-save files, but load
with ``weights_only=True`` by default because a pickle can run arbitrary code; whole
pickled models need an explicit ``allow_pickle=True`` (``--allow-pickle``).

Every failure a user can cause (wrong path, wrong file, wrong architecture) becomes one
``EdgeslimError`` line naming the problem and the fix, never a torch traceback.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from edgeslim.errors import EdgeslimError

__all__ = ["WRAPPER_KEYS", "STRIP_PREFIXES", "load_state_dict", "load_weights", "check_compatible", "load_torch_file"]


# Keys under which training scripts commonly nest the state_dict, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel / DistributedDataParallel and by torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")
_PICKLE_FIX = "re-save with torch.save(model.state_dict()) or pass --allow-pickle if you trust the file"
_MAX_NAMED = 3


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return a flat ``{name: tensor}`` dict on CPU.

    Unwraps the common training-script containers and strips ``module.`` /
    ``_orig_mod.`` when every key carries it.
    """
    p = Path(path)
    obj = _torch_load(p, allow_pickle)
    sd = _unwrap(obj, p)
    return _strip_prefixes(sd)


def load_weights(model: nn.Module, path: str | Path, *, allow_pickle: bool = False,
                 name: str = "model") -> nn.Module:
    """Load ``path`` into ``model`` strictly and return the model.

    Strict because a silently half-loaded network quantizes and exports fine and then
    gives garbage accuracy on the device. The one tolerated gap is BatchNorm's
    ``num_batches_tracked`` counter, which older checkpoints (saved before torch 0.4.1)
    lack and which does not affect inference.
    """
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    check_compatible(model, sd, path=path, name=name)
    target = model.state_dict()
    full = dict(sd)
    for key in target:
        if key not in full and key.endswith("num_batches_tracked"):
            full[key] = target[key].clone()
    try:
        model.load_state_dict(full, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a non-floating dtype clash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeslimError(
            f"checkpoint '{path}' could not be loaded into {name}: {first}; "
            "pass the weights trained for this architecture"
        ) from None
    return model


def check_compatible(model: nn.Module, sd: Mapping[str, torch.Tensor], *, path: str | Path = "<memory>",
                     name: str = "model") -> None:
    """Raise ``EdgeslimError`` unless ``sd`` has exactly the model's keys and shapes.

    Checked up front (instead of parsing torch's multi-line RuntimeError) so the message
    can name the first few offending keys on one line.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {_shape(sd[k])} vs {_shape(target[k])}"
              for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)]
    if not (missing or unexpected or shapes):
        _check_dtypes(target, sd, path, name)
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model) {_first(shapes)}")
    hint = _prefix_hint(missing, unexpected)
    raise EdgeslimError(
        f"checkpoint '{path}' does not match model '{name}': {'; '.join(parts)}{hint}; "
        "pass the weights trained for this architecture"
    )


def _check_dtypes(target: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], path, name: str) -> None:
    """A float parameter given as integers (or booleans) would be cast silently: refuse it, naming the first few."""
    wrong = [f"{k} {sd[k].dtype} vs {target[k].dtype}" for k in target
             if k in sd and (target[k].is_floating_point() or target[k].is_complex())
             and not (sd[k].is_floating_point() or sd[k].is_complex())]
    if wrong:
        raise EdgeslimError(
            f"checkpoint '{path}' holds integer tensors where model '{name}' has float weights: {_first(wrong)}; "
            "pass the float weights (a quantized or integer export cannot be loaded as float weights)"
        )


def load_torch_file(path: str | Path, allow_pickle: bool = False) -> object:
    """``torch.load`` with ``weights_only`` unless ``allow_pickle``; every failure is one ``EdgeslimError``."""
    return _torch_load(Path(path), allow_pickle)


def _torch_load(p: Path, allow_pickle: bool) -> object:
    if not p.exists():
        raise EdgeslimError(f"checkpoint '{p}' does not exist: check the path passed as weights")
    if p.is_dir():
        raise EdgeslimError(f"checkpoint '{p}' is a directory: pass the .pt/.pth/.th file inside it")
    if not _looks_like_checkpoint(p):
        raise EdgeslimError(
            f"checkpoint '{p}' is not a zip or pickle file: pass a file saved with torch.save"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the outcome is reported below
            return torch.load(p, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if not allow_pickle and (glob or "safe_globals" in msg or "Weights only load failed" in msg):
            what = f" (it stores {glob.group(1)})" if glob else ""
            raise EdgeslimError(
                f"checkpoint '{p}' holds pickled Python objects, not just weights{what}: {_PICKLE_FIX}"
            ) from None
        raise EdgeslimError(
            f"checkpoint '{p}' is corrupt or not a PyTorch checkpoint: pass a file saved with torch.save"
        ) from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc) and not allow_pickle:
            raise EdgeslimError(
                f"checkpoint '{p}' is a TorchScript archive: save its weights with "
                "torch.save(torch.jit.load(path).state_dict()) or pass --allow-pickle if you trust the file"
            ) from None
        raise EdgeslimError(
            f"checkpoint '{p}' is corrupt or truncated: re-download it or save it again with torch.save"
        ) from None
    except PermissionError:
        raise EdgeslimError(f"checkpoint '{p}' is not readable: fix its permissions") from None
    except (AttributeError, ImportError) as exc:  # pickled classes missing here (allow_pickle)
        raise EdgeslimError(
            f"checkpoint '{p}' needs Python code that is not importable here "
            f"({type(exc).__name__}: {_one_line(exc)}): make that code importable, or re-save "
            "with torch.save(model.state_dict()) where it is"
        ) from None
    except Exception:  # EOFError, KeyError, BadZipFile, errors raised by pickled objects, ...
        raise EdgeslimError(
            f"checkpoint '{p}' is corrupt or not a PyTorch checkpoint: pass a file saved with torch.save"
        ) from None


def _looks_like_checkpoint(p: Path) -> bool:
    """Cheap magic-byte check: torch.save writes a zip (new) or a pickle (legacy format)."""
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except PermissionError:
        raise EdgeslimError(f"checkpoint '{p}' is not readable: fix its permissions") from None
    except OSError as exc:
        raise EdgeslimError(f"checkpoint '{p}' cannot be read ({_one_line(exc)}): check the path") from None
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _unwrap(obj: object, p: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # only reachable with allow_pickle=True
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise EdgeslimError(
            f"checkpoint '{p}' holds a {type(obj).__name__}, not a state_dict: "
            "save it with torch.save(model.state_dict())"
        )
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    if depth < 3:
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)):
                return _unwrap(inner, p, depth + 1)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise EdgeslimError(
        f"checkpoint '{p}' has no state_dict (top-level keys: {keys}): "
        "save it with torch.save(model.state_dict())"
    )


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Spot checkpoints whose keys carry an extra leading component (e.g. ``backbone.``)."""
    if not missing or not unexpected:
        return ""
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(heads) == 1:
        head = heads.pop()
        if any(k.split(".", 1)[-1] in set(missing) for k in unexpected):
            return f" (checkpoint keys carry an extra '{head}.' prefix)"
    return ""


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    more = len(items) - _MAX_NAMED
    return f"{shown} (+{more} more)" if more > 0 else shown


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(d) for d in t.shape) + ")"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__
