"""Replay a table of bad inputs over every CLI command and the API, and count how each one ends.

    python -m tests.hardening_replay            # all cases (a few minutes: one subprocess per case)
    python -m tests.hardening_replay -k npz -v  # the cases whose name contains 'npz', with their stderr

Every case runs in a subprocess, in a fresh temporary folder holding a copy of tiny inputs. Outcomes:
* ``clean``: exit 2 and exactly one line ``edgeslim: error: ...`` (for cases that must be refused), or the expected
  success (``expect="ok"``, with its check);
* ``traceback``: a traceback, an ``internal error`` line, another exit status, or a run past its time limit (hang);
* ``silent``: a bad input accepted (exit 0), or an expected success whose check failed;
* ``leftover``: anything left in ``--out`` by a refused run (or a ``.staging-*`` folder after any run);
* ``outside``: a file created or changed outside ``--out`` (an input overwritten, a write through a planted link).

Totals are printed at the end; the exit status is 1 when any category other than ``clean`` is non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("clean", "traceback", "silent", "leftover", "outside")

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))

    def gray():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 2))
''')


# ---------------------------------------------------------------------------------------------- fixtures


def png_folder(root: Path, rng, classes=("cats", "dogs"), n=6, size=8) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def zip_with(path: Path, good: Path, mutate: Callable[[bytearray, zipfile.ZipInfo], None]) -> None:
    """A zip of the image folder ``good`` whose first member is damaged by ``mutate`` (bytes of the whole file)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(good.rglob("*.png")):
            zf.write(p, p.relative_to(good).as_posix())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    mutate(data, info)
    path.write_bytes(bytes(data))


def corrupt_member(data: bytearray, info: zipfile.ZipInfo) -> None:
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start, start + min(info.compress_size, 16)):
        data[k] ^= 0x5A


def unknown_method(data: bytearray, info: zipfile.ZipInfo) -> None:
    for off in (info.header_offset + 8, data.find(b"PK\x01\x02") + 10):  # local header and central directory
        data[off:off + 2] = (99).to_bytes(2, "little")


def encrypted(data: bytearray, info: zipfile.ZipInfo) -> None:
    for off in (info.header_offset + 6, data.find(b"PK\x01\x02") + 8):
        data[off] |= 1


def npy_header(path: Path, shape: tuple[int, ...], dtype="<f4") -> None:
    """An .npy whose header declares ``shape`` but which holds a few bytes: np.load would allocate it all."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64)


def onnx_short_initializer(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 3, 3, 3], raw_data=b"\0" * 16)  # needs 432
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def qdq_bare_constant(path: Path) -> None:
    """A QDQ file whose weight arrives through a bare Constant node (no DequantizeLinear after it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "wv")
    s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Constant", [], ["w"], value=w),
             helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], [s, z])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def qdq_empty_constant(path: Path) -> None:
    """A QDQ file with a Constant node that has no value attribute (malformed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    nodes = [helper.make_node("Constant", [], ["c"]),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Add", ["xd", "c"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])], [s, z])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


class Payload:
    """A pickle that runs ``touch pwned`` when unpickled (the restricted loader must refuse it)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def malicious_checkpoint(path: Path) -> None:
    import torch

    torch.save({"state_dict": {"0.weight": Payload()}}, path)


def png16(root: Path, rng) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            v = np.full((8, 8), 40000 + 1000 * i, np.uint16)  # 16-bit gray: 40000 / 65535 = 0.61 in [0, 1]
            Image.fromarray(v).save(root / c / f"{i}.png")


def yaml_bomb(root: Path, rng) -> None:
    from PIL import Image

    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{i}.jpg")
        (root / "labels" / "val" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 10):
        prev, cur = chr(ord("a") + k - 1), chr(ord("a") + k)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    lines.append("names: *j")
    (root / "data.yaml").write_text("\n".join(lines) + "\n")


def build_inputs(d: Path) -> None:
    """Every input file the cases use, written once into ``d`` and copied into each case's folder."""
    import torch

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    (d / "usermodels.py").write_text(USER_MODEL)
    png_folder(d / "images", rng)
    x = rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(d / "d.npz", x=x, y=(np.arange(40) % 2).astype(np.int64))
    big = rng.integers(0, 255, (240, 8, 8, 3), dtype=np.uint8)
    np.savez(d / "big.npz", x=big, y=(np.arange(240) % 2).astype(np.int64))
    np.savez(d / "calib.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.savez(d / "zero_pixels.npz", x=np.zeros((4, 0, 0, 3), np.uint8), y=np.zeros(4, np.int64))
    np.savez(d / "zero_float.npz", x=np.zeros((4, 3, 0, 0), np.float32))
    good = d / "d.npz"
    raw = good.read_bytes()
    (d / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    crc = bytearray(raw)
    crc[200] ^= 0xFF  # inside the first member's data (stored, not compressed): its CRC no longer matches
    (d / "crc.npz").write_bytes(bytes(crc))
    npy_header(d / "huge.npy", (1 << 40, 3, 8, 8))
    with zipfile.ZipFile(d / "huge.npz", "w") as zf:
        npy_header(d / "x.npy", (1 << 40, 3, 8, 8))
        zf.write(d / "x.npy", "x.npy")
    (d / "x.npy").unlink()
    zip_with(d / "corrupt_member.zip", d / "images", corrupt_member)
    zip_with(d / "unknown_method.zip", d / "images", unknown_method)
    zip_with(d / "encrypted.zip", d / "images", encrypted)
    png16(d / "png16", rng)
    yaml_bomb(d / "bomb", rng)
    # the tiny model's weights as int64 tensors (a float model: each would be silently truncated or cast)
    ns: dict = {}
    exec(USER_MODEL, ns)
    sd = ns["tiny"]().state_dict()
    torch.save({k: v.round().to(torch.int64) for k, v in sd.items()}, d / "int64.pt")
    torch.save(sd, d / "tiny.pt")
    malicious_checkpoint(d / "evil.pt")
    # a float ONNX file (item 1: --out holding it)
    (d / "onnxdir").mkdir()
    import warnings

    warnings.simplefilter("ignore")
    torch.onnx.export(ns["tiny"]().eval(), (torch.zeros(1, 3, 8, 8),), str(d / "onnxdir" / "model_fp32.onnx"),
                      dynamo=False, input_names=["input"], output_names=["output"], opset_version=17,
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    onnx_short_initializer(d / "short_init.onnx")
    qdq_bare_constant(d / "qdq_const.onnx")
    qdq_empty_constant(d / "qdq_empty_const.onnx")
    plans = {"plan_float_bits.json": {"layers": {"0": "int8.5"}}, "plan_list.json": [["0", "int8"]],
             "plan_empty_bits.json": {"layers": {"0": ""}}, "plan_unicode.json": {"layers": {"0": "int\u0668"}},
             "plan_superscript.json": {"layers": {"0": "int\u00b2"}}, "plan_bits_list.json": {"layers": {"0": [8]}},
             "plan_bool.json": {"layers": {"0": True}}, "plan_null.json": {"layers": {"0": None}},
             "target_float_bits.json": {"name": "t", "bits": [8.5]}, "target_list.json": [1, 2],
             "target_empty_bits.json": {"name": "t", "bits": []}, "target_unicode.json": {"name": "t", "bits": ["\u0668"]},
             "target_ops.json": {"name": "t", "int_ops": "conv"}, "target_acc.json": {"name": "t", "accumulator_bits": "32"}}
    for name, obj in plans.items():
        (d / name).write_text(json.dumps(obj))
    deep = "[" * 100000 + "]" * 100000
    (d / "plan_deep.json").write_text('{"layers": ' + deep + "}")
    (d / "target_deep.json").write_text(deep)
    (d / "plain_file").write_text("not a folder")
    # an image folder with a symlink loop (a link to its own parent)
    png_folder(d / "loop", rng, n=3)
    os.symlink("..", d / "loop" / "cats" / "up")


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    item: str  # the item number
    argv: list[str] | None = None  # CLI arguments ({d} = the case folder)
    api: str | None = None  # Python code run with edgeslim imported ({d} = the case folder)
    expect: str = "error"  # "error" (one clean line, exit 2) or "ok"
    check: str | None = None  # for expect="ok": Python code raising AssertionError when the result is wrong
    prepare: Callable[[Path], None] | None = None
    signal_after_stage: bool = False  # send SIGTERM once a .staging-* folder appears in --out
    timeout: float = 120.0
    out: str = "out"  # --out relative to the case folder (checked for leftovers)
    extra: dict = field(default_factory=dict)


TINY = ["{d}/usermodels.py:tiny", "--input-shape", "3,8,8"]
Q_IMG = ["--calib-data", "{d}/images", "--data", "{d}/images", "--calib-size", "8"]
Q_NPZ = ["--calib-data", "{d}/big.npz", "--data", "{d}/big.npz", "--calib-size", "8", "--holdout-size", "60"]
TRAIN = ["--train-data", "{d}/d.npz", "--data", "{d}/d.npz"]
OUT = ["--out", "{d}/out"]


def _quant(*extra: str, data=Q_IMG, model=TINY, verb="quantize") -> list[str]:
    return [verb, *model, *data, *OUT, *extra]


def _plant_link(name: str, target: str) -> Callable[[Path], None]:
    def prep(d: Path) -> None:
        (d / "out").mkdir(exist_ok=True)
        os.symlink(d / target, d / "out" / name)
    return prep


def _stale_stage(d: Path) -> None:
    out = d / "out"
    dead = dead_pid()
    for name in (f".staging-{dead}-old1234",):
        (out / name).mkdir(parents=True)
        (out / name / "model_int8.onnx").write_bytes(b"half written")


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


QAT_ONE_STEP = ["qat", "{d}/usermodels.py:tiny", "--input-shape", "3,8,8", "--train-data", "{d}/d.npz", "--data",
                "{d}/d.npz", "--max-steps", "1", "--calib-size", "8", "--w-bits", "8", "--a-bits", "8", "--out",
                "{d}/out"]


def _finished_qat(d: Path) -> None:
    """A finished one-step QAT run in ``out`` (its checkpoint), for the --resume cases."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("EDGESLIM_REPLAY_ROOT", str(ROOT)))
    subprocess.run([sys.executable, "-m", "edgeslim", *[a.replace("{d}", str(d)) for a in QAT_ONE_STEP]], cwd=d,
                   env=env, check=True, capture_output=True, timeout=300)


def _file_out(d: Path) -> None:
    (d / "out").write_text("an existing file")


def _read_only_out(d: Path) -> None:
    (d / "out").mkdir()
    (d / "out").chmod(0o555)


CASES: list[Case] = [
    # 1. --out holding an input, empty --out
    Case("out-holds-onnx-input", "1", ["quantize", "{d}/onnxdir/model_fp32.onnx", "--calib-data", "{d}/calib.npz",
                                       "--data", "{d}/calib.npz", "--out", "{d}/onnxdir"], out="onnxdir"),
    Case("out-empty", "1", ["quantize", *TINY, *Q_IMG, "--out", ""]),
    Case("out-is-data-folder", "1", ["quantize", *TINY, *Q_IMG, "--out", "{d}/images"], out="images"),
    # 2. zoo model without weights
    Case("zoo-without-weights", "2", ["quantize", "digits_cnn", *Q_IMG, *OUT]),
    # 7. a malicious pickle: refused as a pickle that needs --allow-pickle, its payload never runs
    Case("pickle-payload-weights", "7", _quant("--weights", "{d}/evil.pt")),
    Case("pickle-payload-model", "7", ["quantize", "{d}/evil.pt", *Q_IMG, *OUT]),
    Case("pickle-payload-qat", "7", ["qat", *TINY, *TRAIN, "--weights", "{d}/evil.pt", *OUT]),
    # 3. silent wrong results
    Case("int64-state-dict", "3", _quant("--weights", "{d}/int64.pt")),
    Case("png16-decoded-to-unit-range", "3", api=(
        "from edgeslim.data import Preprocess, open_dataset\n"
        "ds = open_dataset('{d}/png16', Preprocess((1, 8, 8), (0.0,), (1.0,)))\n"
        "x = ds.load_all()\n"
        "print(float(x.min()), float(x.max()))\n"
        "assert abs(float(x.min()) - 40000 / 65535) < 2e-3 and abs(float(x.max()) - 42000 / 65535) < 2e-3, "
        "(x.min(), x.max())"), expect="ok"),
    Case("png16-fidelity-inputs", "3", api=(
        "from edgeslim.data.inputs import InputSpec, open_inputs\n"
        "x = open_inputs('{d}/png16', (1, 8, 8), InputSpec((8, 8), 'GRAY', (0.0,), (1.0,)))\n"
        "assert abs(float(x.min()) - 40000 / 65535) < 2e-3 and abs(float(x.max()) - 42000 / 65535) < 2e-3, "
        "(x.min(), x.max())"), expect="ok"),
    Case("zero-pixel-npz", "3", _quant(data=["--calib-data", "{d}/zero_pixels.npz", "--data", "{d}/zero_pixels.npz"])),
    Case("zero-pixel-float-npz", "3", _quant(data=["--calib-data", "{d}/zero_float.npz", "--data",
                                                    "{d}/zero_float.npz"])),
    Case("zero-pixel-api", "3", api="edgeslim.quantize(edgeslim.build_model('digits_cnn')[0], np.zeros((4, 1, 0, 0)))"),
    Case("kd-temperature-0", "3", ["qat", *TINY, *TRAIN, "--kd", "--kd-temperature", "0", *OUT]),
    Case("kd-temperature-negative", "3", ["qat", *TINY, *TRAIN, "--kd", "--kd-temperature", "-1", *OUT]),
    # 4. --max-drop units
    Case("mixed-max-drop-negative", "4", ["mixed", *TINY, *Q_NPZ, "--max-drop", "-1", *OUT]),
    # 5. file-system targets
    Case("out-existing-file", "5", _quant(), prepare=_file_out),
    Case("out-below-a-file", "5", ["quantize", *TINY, *Q_IMG, "--out", "{d}/plain_file/run"]),
    Case("out-read-only", "5", _quant(), prepare=_read_only_out),
    Case("out-under-proc", "5", ["quantize", *TINY, *Q_IMG, "--out", "/proc/edgeslim-run"]),
    # 5. damaged archives and arrays
    Case("zip-corrupt-member", "5", _quant(data=["--calib-data", "{d}/corrupt_member.zip", "--data",
                                                  "{d}/corrupt_member.zip"])),
    Case("zip-unknown-method", "5", _quant(data=["--calib-data", "{d}/unknown_method.zip", "--data",
                                                  "{d}/unknown_method.zip"])),
    Case("zip-encrypted", "5", _quant(data=["--calib-data", "{d}/encrypted.zip", "--data", "{d}/encrypted.zip"])),
    Case("zip-corrupt-fidelity", "5", _quant("--mean", "0.5", "--std", "0.5", "--task", "fidelity",
                                             data=["--calib-data", "{d}/corrupt_member.zip", "--data",
                                                   "{d}/corrupt_member.zip"])),
    Case("npz-truncated", "5", _quant(data=["--calib-data", "{d}/trunc.npz", "--data", "{d}/trunc.npz"])),
    Case("npz-crc-broken", "5", _quant(data=["--calib-data", "{d}/crc.npz", "--data", "{d}/crc.npz"])),
    Case("npz-truncated-train", "5", ["qat", *TINY, "--train-data", "{d}/trunc.npz", "--data", "{d}/d.npz", *OUT]),
    Case("npy-terabytes", "5", _quant(data=["--calib-data", "{d}/huge.npy", "--data", "{d}/huge.npy"])),
    Case("npz-terabytes-labelled", "5", _quant(data=["--calib-data", "{d}/huge.npz", "--data", "{d}/huge.npz"])),
    Case("yaml-alias-bomb", "5", ["quantize", "yolov5n", "--random-init", "--task", "detect", "--calib-data",
                                  "{d}/bomb", "--calib-split", "val", "--data", "{d}/bomb", "--data-split", "val",
                                  *OUT], timeout=90),
    Case("input-shape-absurd", "5", ["quantize", "{d}/usermodels.py:tiny", "--input-shape", "3,100000,100000",
                                     *Q_IMG, *OUT]),
    Case("input-shape-absurd-inspect", "5", ["inspect", "{d}/usermodels.py:tiny", "--input-shape",
                                             "3,1000000,1000000"]),
    Case("seed-negative", "5", _quant("--seed", "-1")),
    Case("seed-negative-qat", "5", ["qat", *TINY, *TRAIN, "--seed", "-3", *OUT]),
    Case("seed-negative-prune", "5", ["prune", *TINY, *TRAIN, "--seed", "-3", *OUT]),
    Case("demo-epochs-negative", "5", ["demo", "--epochs", "-1", *OUT]),
    Case("demo-threads-zero", "5", ["demo", "--threads", "0", *OUT]),
    Case("qat-epochs-zero", "5", ["qat", *TINY, *TRAIN, "--epochs", "0", *OUT]),
    Case("prune-epochs-negative", "5", ["prune", *TINY, *TRAIN, "--epochs", "-1", *OUT]),
    Case("factorize-lr-nan", "5", ["factorize", *TINY, *TRAIN, "--lr", "nan", *OUT]),
    Case("mixed-max-drop-nan", "5", ["mixed", *TINY, *Q_NPZ, "--max-drop", "nan", *OUT]),
    # 5. malformed plan / target JSON
    *[Case(f"plan-{k}", "5", _quant("--plan", f"{{d}}/plan_{k}.json"))
      for k in ("float_bits", "list", "empty_bits", "unicode", "superscript", "bits_list", "bool", "null", "deep")],
    *[Case(f"target-{k}", "5", ["plan", *TINY, *TRAIN, "--target", f"{{d}}/target_{k}.json", "--max-drop", "1",
                                 *OUT])
      for k in ("float_bits", "list", "empty_bits", "unicode", "deep", "ops", "acc")],
    Case("backbone-bogus", "5", ["plan", *TINY, *TRAIN, "--backbone", "bogus:abc", "--max-drop", "1", *OUT]),
    Case("backbone-width", "5", ["plan", *TINY, *TRAIN, "--backbone", "shufflenet_v2:abc", "--max-drop", "1", *OUT]),
    # 5. ONNX files
    Case("onnx-short-initializer", "5", ["quantize", "{d}/short_init.onnx", "--calib-data", "{d}/calib.npz",
                                         "--data", "{d}/calib.npz", *OUT]),
    Case("qdq-bare-constant-weight", "5", api=(
        "from edgeslim.engine.run import run\n"
        "g = edgeslim.import_qdq('{d}/qdq_const.onnx')\n"
        "y = run(g, np.ones((1, 3, 8, 8), np.float32))['out']\n"
        "assert y.shape == (1, 4, 8, 8) and np.isfinite(y).all()"), expect="ok"),
    Case("qdq-constant-without-value", "5", api="edgeslim.import_qdq('{d}/qdq_empty_const.onnx')"),
    # 3 / 5. --resume from a checkpoint of another run
    Case("resume-other-train-data", "3", [*QAT_ONE_STEP[:4], "--train-data", "{d}/big.npz",
                                          *QAT_ONE_STEP[6:], "--resume"], prepare=_finished_qat, timeout=300),
    Case("resume-other-model", "5", ["qat", "{d}/usermodels.py:gray", "--input-shape", "1,8,8",
                                     *QAT_ONE_STEP[4:], "--resume"], prepare=_finished_qat, timeout=300),
    # 5. every other command
    Case("analyze-accumulator-8", "5", _quant("--accumulator", "8", verb="analyze")),
    Case("analyze-corrupt-zip", "5", _quant(verb="analyze", data=["--calib-data", "{d}/corrupt_member.zip",
                                                                   "--data", "{d}/corrupt_member.zip"])),
    Case("sensitivity-bad-group", "5", ["sensitivity", *TINY, *Q_NPZ, "--group", "nonsense", *OUT]),
    Case("sensitivity-bad-high", "5", ["sensitivity", *TINY, *Q_NPZ, "--high", "int\u0668", *OUT]),
    Case("inspect-missing-model-file", "5", ["inspect", "{d}/nope.py:tiny", "--input-shape", "3,8,8"]),
    Case("prune-crc-npz", "5", ["prune", *TINY, "--train-data", "{d}/crc.npz", "--data", "{d}/d.npz", *OUT]),
    Case("factorize-bad-layers", "5", ["factorize", *TINY, *TRAIN, "--layers", "nope", *OUT]),
    # 6. API
    Case("api-quantize-function", "6", api="edgeslim.quantize(lambda x: x, torch.zeros(2, 3, 8, 8))"),
    Case("api-quantize-not-a-model", "6", api="edgeslim.quantize('resnet20', torch.zeros(2, 3, 8, 8))"),
    Case("api-export-missing-dir", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, torch.randn(4, *info.input_shape))\n"
        "edgeslim.export_onnx(q, '{d}/no/such/dir/m.onnx')")),
    Case("api-export-onto-dir", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, torch.randn(4, *info.input_shape))\n"
        "edgeslim.export_onnx(q, '{d}/images')")),
    Case("api-export-fp16-onto-dir", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "import os\n"
        "os.makedirs('{d}/out', exist_ok=True)\n"
        "edgeslim.export_fp32_onnx(m, info.input_shape, '{d}/out/f.onnx')\n"
        "edgeslim.export_fp16_onnx('{d}/out/f.onnx', '{d}/images')")),
    Case("api-unknown-zoo-model", "6", api="edgeslim.build_model('resnet21')"),
    Case("api-import-missing-onnx", "6", api="edgeslim.import_onnx('{d}/nope.onnx')"),
    Case("api-export-fp32-onto-dir", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "edgeslim.export_fp32_onnx(m, info.input_shape, '{d}/images')")),
    Case("api-dataloader-calibration", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "ds = torch.utils.data.TensorDataset(torch.randn(16, *info.input_shape), torch.zeros(16, dtype=torch.long))\n"
        "q = edgeslim.quantize(m, torch.utils.data.DataLoader(ds, batch_size=4))\n"
        "assert q.input_shape == tuple(info.input_shape)"), expect="ok"),
    Case("api-list-of-batches", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, [torch.randn(4, *info.input_shape) for _ in range(3)])\n"
        "assert q.input_shape == tuple(info.input_shape)"), expect="ok"),
    Case("api-list-of-pairs", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, [(torch.randn(4, *info.input_shape), torch.zeros(4)) for _ in range(3)])\n"
        "assert q.input_shape == tuple(info.input_shape)"), expect="ok"),
    Case("api-generator-of-batches", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, (torch.randn(4, *info.input_shape) for _ in range(3)))\n"
        "assert q.input_shape == tuple(info.input_shape)"), expect="ok"),
    Case("api-calibration-of-strings", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "edgeslim.quantize(m, ['a', 'b'])")),
    Case("api-empty-loader", "6", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "edgeslim.quantize(m, [])")),
    # 7. signals, stale staging, link loops, planted links
    Case("sigterm-mid-run", "7", _quant("--w-bits", "4", "--algorithm", "brecq", "--iters", "100000"),
         signal_after_stage=True, timeout=120),
    Case("stale-staging-swept", "7", _quant(), expect="ok", prepare=_stale_stage),
    Case("symlink-loop-image-folder", "7", _quant(data=["--calib-data", "{d}/loop", "--data", "{d}/loop",
                                                        "--calib-size", "4"]), expect="ok", timeout=60),
    Case("symlink-loop-walked-once", "7", api=(
        "from edgeslim.data import Preprocess, open_dataset\n"
        "ds = open_dataset('{d}/loop', Preprocess((3, 8, 8), (0, 0, 0), (1, 1, 1)))\n"
        "assert len(ds) == 6 and ds.classes == ['cats', 'dogs'], (len(ds), ds.classes)"), expect="ok", timeout=60),
    Case("symlink-loop-fidelity", "7", _quant("--task", "fidelity", "--mean", "0.5", "--std", "0.5",
                                              data=["--calib-data", "{d}/loop", "--data", "{d}/loop"]),
         expect="ok", timeout=60),
    Case("planted-export-tmp-link", "7", api=(
        "m, info = edgeslim.build_model('digits_cnn')\n"
        "q = edgeslim.quantize(m, torch.randn(4, *info.input_shape))\n"
        "edgeslim.export_onnx(q, '{d}/out/m.onnx')\n"
        "edgeslim.export_fp32_onnx(m, info.input_shape, '{d}/out/f.onnx')"), expect="ok",
         prepare=lambda d: (_plant_link("m.onnx.tmp", "victim_m")(d), _plant_link("f.onnx.tmp", "victim_f")(d))),
    Case("planted-qat-checkpoint-link", "7", ["qat", *TINY, *TRAIN, "--max-steps", "1", "--calib-size", "8",
                                              "--w-bits", "8", "--a-bits", "8", *OUT], expect="ok",
         prepare=_plant_link("checkpoint.pt.tmp", "victim_ckpt"), timeout=180),
]


# ---------------------------------------------------------------------------------------------- running


API_PRELUDE = textwrap.dedent('''
    import sys, traceback
    import numpy as np, torch
    import edgeslim
    from edgeslim.errors import EdgeslimError
    try:
    {body}
    except EdgeslimError as exc:
        print(f"edgeslim: error: {{exc}}", file=sys.stderr)
        sys.exit(2)
''')


def _snapshot(root: Path, skip: Path | None) -> dict[str, tuple]:
    """Every path under ``root`` except ``skip``'s subtree: (kind, size, hash) without following links."""
    found = {}
    for cur, dirs, files in os.walk(root, followlinks=False):
        curp = Path(cur)
        if skip is not None and (curp == skip or skip in curp.parents):
            dirs[:] = []
            continue
        for name in files + [x for x in dirs if (curp / x).is_symlink()]:
            p = curp / name
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                found[str(p)] = ("link", os.readlink(p))
            else:
                found[str(p)] = ("file", p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
        for name in dirs:
            if skip is None or curp / name != skip:
                found[str(curp / name) + "/"] = ("dir",)
    return found


def _listing(out: Path) -> set[str]:
    if not out.is_dir():
        return set()
    return {str(p.relative_to(out)) for p in out.rglob("*")}


def _run_process(cmd: list[str], cwd: Path, case: Case, out: Path) -> tuple[int | None, str, bool]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("EDGESLIM_REPLAY_ROOT", str(ROOT)))
    env.pop("EDGESLIM_DEBUG", None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    signalled = False
    deadline = time.monotonic() + case.timeout
    if case.signal_after_stage:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".staging-") for p in (out.iterdir() if out.is_dir() else [])):
                time.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                signalled = True
                break
            time.sleep(0.1)
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err, signalled
    return proc.returncode, err, signalled


def classify(case: Case, rc: int | None, err: str, signalled: bool, new_in_out: set[str], outside: list[str],
             staging: list[str]) -> tuple[str, str]:
    """(category, reason) of one finished case."""
    if outside:
        return "outside", f"changed outside --out: {', '.join(sorted(outside)[:3])}"
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("edgeslim: error:")]
    if rc is None:
        return "traceback", "hang: ran past its time limit"
    if case.expect == "ok" and rc != 0 and "AssertionError" in err:  # it ran, and its result is wrong
        return "silent", f"wrong result: {err.strip().splitlines()[-1][:150]}"
    if "Traceback (most recent call last)" in err or "internal error" in err:
        return "traceback", (lines[-1] if lines else err.strip().splitlines()[-1] if err.strip() else "traceback")
    if staging:
        return "leftover", f"staging folder(s) left: {', '.join(staging)}"
    if case.signal_after_stage:
        if not signalled:
            return "silent", "the run ended before a staging folder appeared"
        return ("clean", f"exit {rc} after SIGTERM") if rc != 0 and not new_in_out else \
            ("leftover", f"exit {rc}, left {sorted(new_in_out)[:3]}")
    if case.expect == "ok":
        if rc == 0:
            return "clean", "ok"
        if rc == 2 and len(lines) == 1:
            return "silent", f"refused what must work: {lines[0]}"
        return "traceback", f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    if rc == 0:
        return "silent", "accepted (exit 0)"
    if rc == 2 and len(lines) == 1:
        if new_in_out:
            return "leftover", f"{lines[0]} -- left {', '.join(sorted(new_in_out)[:3])}"
        return "clean", lines[0]
    return "traceback", f"exit {rc}: {(err.strip().splitlines() or [''])[-1][:200]}"


def run_case(case: Case, inputs: Path, verbose: bool = False) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="edgeslim-replay-") as tmp:
        d = Path(tmp) / "w"
        shutil.copytree(inputs, d, symlinks=True)
        if case.prepare:
            case.prepare(d)
        out = d / case.out
        before_out = _listing(out) if case.out != "onnxdir" else set()
        out_existed = out.exists() or out.is_symlink()
        before = _snapshot(d, out if case.out not in ("onnxdir", "images") else None)
        if case.api is not None:
            body = textwrap.indent(case.api.replace("{d}", str(d)), "    ")
            cmd = [sys.executable, "-c", API_PRELUDE.format(body=body)]
        else:
            cmd = [sys.executable, "-m", "edgeslim", *[a.replace("{d}", str(d)) for a in case.argv]]
        rc, err, signalled = _run_process(cmd, d, case, out)
        after = _snapshot(d, out if case.out not in ("onnxdir", "images") else None)
        if case.out in ("onnxdir", "images"):  # --out is an input folder: anything new or changed there counts
            outside = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        else:
            outside = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        if out.is_dir() and not os.access(out, os.W_OK):
            out.chmod(0o755)
        new_in_out = (_listing(out) - before_out) if out.is_dir() and case.out not in ("onnxdir", "images") \
            and case.api is None else set()  # API cases write their own files there
        staging = sorted(n for n in _listing(out) if Path(n).name.startswith(".staging-")) if out.is_dir() else []
        if not out_existed and out.is_dir() and case.expect == "error" and case.api is None:
            new_in_out.add("(the --out folder itself, created by a refused run)")
        cat, why = classify(case, rc, err, signalled, new_in_out, outside, staging)
        if verbose:
            print(f"--- {case.name}: rc={rc}\n{err.strip()[-1500:]}\n")
        return cat, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains this (comma-separated: any of these)")
    ap.add_argument("-v", action="store_true", help="print each case's stderr")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--root", help="replay against the edgeslim package in this source tree (e.g. an older commit's "
                    "`git archive`; default: this checkout)")
    args = ap.parse_args(argv)
    if args.root:
        os.environ["EDGESLIM_REPLAY_ROOT"] = str(Path(args.root).resolve())
    cases = [c for c in CASES if any(k in c.name for k in args.k.split(","))]
    totals = dict.fromkeys(CATEGORIES, 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-replay-inputs-") as tmp:
        inputs = Path(tmp) / "in"
        build_inputs(inputs)
        for case in cases:
            t0 = time.perf_counter()
            cat, why = run_case(case, inputs, args.v)
            totals[cat] += 1
            rows.append({"case": case.name, "item": case.item, "outcome": cat, "detail": why,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{cat:<10} [{case.item}] {case.name:<32} {why[:150]}", flush=True)
    print("\ntotals: " + ", ".join(f"{k} {v}" for k, v in totals.items()) + f" (of {len(cases)} cases)")
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "cases": rows}, indent=1))
    return 1 if any(v for k, v in totals.items() if k != "clean") else 0


if __name__ == "__main__":
    sys.exit(main())
