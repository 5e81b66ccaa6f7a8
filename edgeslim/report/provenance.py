"""What a reader of a report needs to reproduce it: the preprocessing used, the files and their hashes, package
versions, the CPU (its VNNI / AVX2 flags decide onnxruntime's int8 kernels) and the command line."""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

from ..cpu import cpu_flags, cpu_name, usable_cores

__all__ = ["PACKAGES", "UNITS", "DIGITS_UNITS", "preprocessing", "preprocessing_line", "sha256", "versions",
           "provenance"]


PACKAGES = ("edgeslim", "torch", "onnx", "onnxruntime", "numpy")


UNITS = "mean / std apply to pixels scaled to [0, 1]: x = (pixel / 255 - mean) / std"
DIGITS_UNITS = "scikit-learn's digits (0..16) are scaled to [0, 1]: x = (pixel / 16 - mean) / std"


def preprocessing(pp, channel_order: str = "RGB", data_name: str = "") -> dict:
    """A classification ``Preprocess`` as the same fields the fidelity task writes (``InputSpec.to_dict``);
    ``data_name`` (the dataset's name) picks the pixel scale (scikit-learn's digits are 0..16)."""
    c, h, w = pp.input_shape
    resize = "stretch" if pp.resize is None else f"shorter side to {pp.resize}, center-crop"
    return {"size": [h, w], "channel_order": "GRAY" if c == 1 else channel_order,
            "mean": list(pp.mean), "std": list(pp.std), "resize": resize,
            "units": DIGITS_UNITS if str(data_name).startswith("sklearn-digits") else UNITS}


def preprocessing_line(p) -> str:
    """One console line for a summary's ``preprocessing`` entry (a dict, or a sentence for array inputs)."""
    if not isinstance(p, dict):
        return f"preprocessing: {p}"
    nums = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
    size = "x".join(str(v) for v in p.get("size", []))
    return (f"preprocessing: {size} {p.get('channel_order', '')}, resize {p.get('resize', '')}, "
            f"mean ({nums(p.get('mean', []))}), std ({nums(p.get('std', []))}); "
            + str(p.get("units", "x = (pixel / 255 - mean) / std")).split(": ")[-1])


def sha256(path) -> str | None:
    """The file's sha256 (a folder or a name that is not a file: None)."""
    p = Path(str(path))
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()




def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(args, argv: list[str] | None = None) -> dict:
    """From parsed CLI options: model, weights (with sha256), data, calibration size, versions, CPU, command line."""
    weights = getattr(args, "weights", None)
    data = {k: str(getattr(args, k)) for k in ("calib_data", "data", "train_data") if getattr(args, k, None)}
    for k in list(data):
        digest = sha256(data[k]) if Path(data[k]).is_file() and Path(data[k]).stat().st_size < (1 << 30) else None
        if digest:
            data[k + "_sha256"] = digest
    return {"model": str(getattr(args, "model", "")),
            "weights": str(weights) if weights else None,
            "weights_sha256": sha256(weights) if weights else None,
            "data": data,
            "calib_size": getattr(args, "calib_size", None),
            "seed": getattr(args, "seed", None),
            "versions": versions(),
            "cpu": {"name": cpu_name(), "int8_flags": cpu_flags(), "cores": usable_cores()},
            "command": " ".join(["edgeslim", *(sys.argv[1:] if argv is None else argv)])}


