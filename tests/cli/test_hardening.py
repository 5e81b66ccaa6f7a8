"""Issue 21's bad inputs, one test per fixed item: one ``edgeslim: error:`` line, exit 2, ``--out`` and the inputs
untouched (``tests/hardening_replay.py`` replays the whole table in subprocesses)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeslim
from edgeslim.cli import main
from edgeslim.errors import EdgeslimError
from tests.hardening_replay import (
    USER_MODEL,
    corrupt_member,
    dead_pid,
    encrypted,
    npy_header,
    onnx_short_initializer,
    png16,
    png_folder,
    qdq_bare_constant,
    qdq_empty_constant,
    unknown_method,
    yaml_bomb,
    zip_with,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def d(tmp_path):
    """A folder with the tiny user model, an image folder and a labelled .npz."""
    rng = np.random.default_rng(0)
    (tmp_path / "usermodels.py").write_text(USER_MODEL)
    png_folder(tmp_path / "images", rng)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8),
             y=(np.arange(40) % 2).astype(np.int64))
    return tmp_path


def _tiny(d):
    return [f"{d}/usermodels.py:tiny", "--input-shape", "3,8,8"]


def _quantize(d, *extra, data=None, out=None):
    data = data or d / "images"
    return ["quantize", *_tiny(d), "--calib-data", data, "--data", data, "--calib-size", "8",
            "--out", out or d / "out", *extra]


def _train(d, verb, *extra, data=None):
    return [verb, *_tiny(d), "--train-data", data or d / "d.npz", "--data", d / "d.npz", "--out", d / "out", *extra]


def _state(paths) -> dict:
    """Everything under ``paths`` (files with their hashes), to assert nothing changed."""
    found = {}
    for root in map(Path, paths):
        if not root.exists() and not root.is_symlink():
            found[str(root)] = None
        elif root.is_file():
            found[str(root)] = hashlib.sha1(root.read_bytes()).hexdigest()
        else:
            found[str(root)] = "dir"
            for p in sorted(root.rglob("*")):
                found[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


def expect_error(capsys, argv, needle, *, out=None, inputs=()):
    """Run the CLI: exit 2, exactly one line ``edgeslim: error: ...`` holding ``needle``, no traceback, ``out`` and
    ``inputs`` unchanged. Returns the line."""
    watched = [p for p in [out, *inputs] if p is not None]
    before = _state(watched)
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("edgeslim")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgeslim: error:"), err
    assert "Traceback" not in err and "internal error" not in lines[0], err
    assert needle in lines[0], lines[0]
    assert _state(watched) == before
    return lines[0]


# ------------------------------------------------------------------------------------------ item 3: silent results


def test_int64_state_dict_for_a_float_model_is_refused(capsys, d):
    ns: dict = {}
    exec(USER_MODEL, ns)
    torch.save({k: v.round().to(torch.int64) for k, v in ns["tiny"]().state_dict().items()}, d / "int64.pt")
    expect_error(capsys, _quantize(d, "--weights", d / "int64.pt"), "integer tensors", out=d / "out",
                 inputs=[d / "int64.pt"])


def test_16_bit_png_decodes_to_unit_floats(d):
    from edgeslim.data import Preprocess, open_dataset
    from edgeslim.data.inputs import InputSpec, open_inputs

    png16(d / "png16", np.random.default_rng(0))
    want = sorted([40000 / 65535, 41000 / 65535, 42000 / 65535] * 2)
    gray = open_dataset(d / "png16", Preprocess((1, 8, 8), (0.0,), (1.0,))).load_all()
    assert sorted(gray.reshape(6, -1).mean(axis=1)) == pytest.approx(want, abs=1e-6)  # full precision, no saturation
    rgb = open_dataset(d / "png16", Preprocess((3, 4, 4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).load_all()
    assert rgb.shape == (6, 3, 4, 4) and sorted((rgb[:, 0].reshape(6, -1).mean(axis=1) * 0.25 + 0.5)) == \
        pytest.approx(want, abs=1e-5)
    x = open_inputs(d / "png16", (1, 8, 8), InputSpec((8, 8), "GRAY", (0.0,), (1.0,), resize="letterbox"))
    assert sorted(x.reshape(6, -1).mean(axis=1)) == pytest.approx(want, abs=1e-6)


def test_zero_pixel_images_are_refused(capsys, d):
    np.savez(d / "zero.npz", x=np.zeros((4, 0, 0, 3), np.uint8), y=np.zeros(4, np.int64))
    expect_error(capsys, _quantize(d, data=d / "zero.npz"), "at least one pixel", out=d / "out")
    np.save(d / "zero.npy", np.zeros((4, 0, 5, 3), np.uint8))
    expect_error(capsys, _quantize(d, "--mean", "0.5", "--std", "0.5", data=d / "zero.npy"), "at least one pixel",
                 out=d / "out")


@pytest.mark.parametrize("flag,value", [("--kd-temperature", "0"), ("--kd-temperature", "-2"), ("--lr", "nan"),
                                        ("--kd-weight", "1.5")])
def test_qat_float_options_are_checked(capsys, d, flag, value):
    expect_error(capsys, _train(d, "qat", "--kd", flag, value), flag, out=d / "out")


@pytest.mark.parametrize("verb,flag,value", [("prune", "--epochs", "-1"), ("prune", "--sparsity", "1"),
                                             ("factorize", "--lr", "inf"), ("plan", "--max-drop", "-1")])
def test_lightening_float_options_are_checked(capsys, d, verb, flag, value):
    expect_error(capsys, _train(d, verb, flag, value), flag, out=d / "out")


def test_fractional_lightening_epochs_pass_the_checks():
    from edgeslim.cli import build_parser
    from edgeslim.cli.checks import check_numbers

    args = build_parser().parse_args(["prune", "m", "--train-data", "t", "--data", "t", "--out", "o",
                                      "--epochs", "0.5"])
    check_numbers(args)  # "fractions allowed": 0.5 epochs is not "less than 1"


# ------------------------------------------------------------------------------------------ item 5: --out


@pytest.mark.parametrize("case,needle", [("file", "existing file"), ("below-file", "which is a file"),
                                         ("read-only", "read-only")])
def test_unusable_out_is_refused_up_front(capsys, d, case, needle):
    if case == "file":
        out = d / "out"
        out.write_text("keep me")
    elif case == "below-file":
        (d / "plain").write_text("keep me")
        out = d / "plain" / "run"
    else:
        out = d / "out"
        out.mkdir()
        out.chmod(0o555)
    try:
        expect_error(capsys, _quantize(d, out=out), needle, out=out if case != "below-file" else d / "plain")
    finally:
        if out.is_dir():
            out.chmod(0o755)


# ------------------------------------------------------------------------------------------ item 5: damaged data


@pytest.mark.parametrize("mutate,needle", [(corrupt_member, "damaged"), (unknown_method, "compression"),
                                           (encrypted, "password")])
def test_damaged_zip_members_are_one_line(capsys, d, mutate, needle):
    zip_with(d / "bad.zip", d / "images", mutate)
    expect_error(capsys, _quantize(d, data=d / "bad.zip"), needle, out=d / "out", inputs=[d / "bad.zip"])
    expect_error(capsys, _quantize(d, "--task", "fidelity", "--mean", "0.5", "--std", "0.5", data=d / "bad.zip"),
                 needle, out=d / "out")


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_damaged_npz_is_one_line(capsys, d, damage):
    raw = bytearray((d / "d.npz").read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[200] ^= 0xFF
    (d / "bad.npz").write_bytes(bytes(raw))
    expect_error(capsys, _quantize(d, data=d / "bad.npz"), "bad.npz", out=d / "out")
    expect_error(capsys, _train(d, "qat", data=d / "bad.npz"), "bad.npz", out=d / "out")


def test_npy_headers_declaring_terabytes_are_refused_before_allocating(capsys, d):
    npy_header(d / "huge.npy", (1 << 40, 3, 8, 8))
    line = expect_error(capsys, _quantize(d, data=d / "huge.npy"), "TiB", out=d / "out")
    assert "memory" in line
    import zipfile

    with zipfile.ZipFile(d / "huge.npz", "w") as zf:
        zf.write(d / "huge.npy", "x.npy")
        zf.write(d / "huge.npy", "y.npy")
    expect_error(capsys, _quantize(d, data=d / "huge.npz"), "TiB", out=d / "out")


def test_yaml_alias_bomb_is_refused_quickly(d):
    from edgeslim.data.detection import open_detection

    yaml_bomb(d / "bomb", np.random.default_rng(0))
    t0 = time.perf_counter()
    with pytest.raises(EdgeslimError, match="alias"):
        open_detection(d / "bomb", "val", imgsz=32)
    assert time.perf_counter() - t0 < 10


def test_absurd_input_shape_is_refused_with_its_size(capsys, d):
    argv = ["quantize", f"{d}/usermodels.py:tiny", "--input-shape", "3,100000,100000", "--calib-data", d / "images",
            "--data", d / "images", "--out", d / "out"]
    line = expect_error(capsys, argv, "GiB per input", out=d / "out")
    assert "--input-shape" in line


@pytest.mark.parametrize("name,content", [
    ("float_bits", {"layers": {"0": "int8.5"}}), ("list", [["0", "int8"]]), ("empty_bits", {"layers": {"0": ""}}),
    ("unicode_digit", {"layers": {"0": "int\u0668"}}), ("superscript", {"layers": {"0": "int\u00b2"}}),
    ("bits_list", {"layers": {"0": [8]}}), ("bool", {"layers": {"0": True}}), ("deep", None)])
def test_malformed_plan_json_is_one_line(capsys, d, name, content):
    path = d / f"plan_{name}.json"
    path.write_text(json.dumps(content) if content is not None else '{"layers": ' + "[" * 100000 + "]" * 100000 + "}")
    expect_error(capsys, _quantize(d, "--plan", path), "plan", out=d / "out", inputs=[path])


@pytest.mark.parametrize("name,content,needle", [
    ("float_bits", {"name": "t", "bits": [8.5]}, "bits"), ("list", [1, 2], "not an object"),
    ("empty_bits", {"name": "t", "bits": []}, "bits"), ("unicode", {"name": "t", "bits": ["\u0668"]}, "bits"),
    ("ops_string", {"name": "t", "int_ops": "conv"}, "int_ops"),
    ("acc_string", {"name": "t", "accumulator_bits": "32"}, "accumulator_bits"), ("deep", None, "nested")])
def test_malformed_target_json_is_one_line(capsys, d, name, content, needle):
    path = d / f"target_{name}.json"
    path.write_text(json.dumps(content) if content is not None else "[" * 100000 + "]" * 100000)
    expect_error(capsys, _train(d, "plan", "--target", path, "--max-drop", "1"), needle, out=d / "out")


@pytest.mark.parametrize("backbone", ["bogus:abc", "shufflenet_v2:abc", "mobilenet_v2:-1"])
def test_bad_backbone_is_one_line(capsys, d, backbone):
    expect_error(capsys, _train(d, "plan", "--backbone", backbone, "--max-drop", "1"), "--backbone", out=d / "out")


def test_onnx_initializer_shorter_than_its_dims_is_one_line(capsys, d):
    onnx_short_initializer(d / "short.onnx")
    np.savez(d / "calib.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    expect_error(capsys, ["quantize", d / "short.onnx", "--calib-data", d / "calib.npz", "--data", d / "calib.npz",
                          "--out", d / "out"], "initializer", out=d / "out", inputs=[d / "short.onnx"])


def test_qdq_files_with_constants(d):
    from edgeslim.engine.run import run

    qdq_bare_constant(d / "qdq.onnx")  # a float weight from a bare Constant: a float island, computed
    y = run(edgeslim.import_qdq(d / "qdq.onnx"), np.ones((1, 3, 8, 8), np.float32))["out"]
    assert y.shape == (1, 4, 8, 8) and np.isfinite(y).all()
    qdq_empty_constant(d / "empty.onnx")  # a Constant without its value attribute: one EdgeslimError
    with pytest.raises(EdgeslimError, match="Constant"):
        edgeslim.import_qdq(d / "empty.onnx")


# ------------------------------------------------------------------------------------------ item 6: the API


def _digits():
    model, info = edgeslim.build_model("digits_cnn")
    return model, info, torch.randn(16, *info.input_shape, generator=torch.Generator().manual_seed(0))


def test_api_refuses_a_function_for_a_module():
    with pytest.raises(EdgeslimError, match="nn.Module"):
        edgeslim.quantize(lambda x: x, torch.zeros(2, 1, 8, 8))
    with pytest.raises(EdgeslimError, match="nn.Module"):
        edgeslim.export_fp32_onnx(lambda x: x, (1, 8, 8), "/tmp/never.onnx")


def test_api_export_to_a_missing_folder_or_onto_a_folder(tmp_path):
    model, info, calib = _digits()
    q = edgeslim.quantize(model, calib)
    with pytest.raises(EdgeslimError, match="mkdir"):
        edgeslim.export_onnx(q, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(EdgeslimError, match="is a folder"):
        edgeslim.export_onnx(q, tmp_path)
    with pytest.raises(EdgeslimError, match="is a folder"):
        edgeslim.export_fp32_onnx(model, info.input_shape, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _scales(q) -> list[float]:
    return [float(p.scale) for _, p in sorted(q.intgraph.qparams.items())]


def test_api_takes_a_dataloader_and_iterables_of_batches_or_pairs():
    model, info, calib = _digits()
    want = _scales(edgeslim.quantize(model, calib, batch_size=4))
    ds = torch.utils.data.TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    for data in (loader, [calib[i:i + 4] for i in range(0, 16, 4)],
                 [(calib[i:i + 4], torch.zeros(4)) for i in range(0, 16, 4)],
                 (calib[i:i + 4].numpy() for i in range(0, 16, 4))):
        q = edgeslim.quantize(model, data)
        assert q.input_shape == tuple(info.input_shape) and _scales(q) == want
    with pytest.raises(EdgeslimError, match="empty"):
        edgeslim.quantize(model, [])
    with pytest.raises(EdgeslimError, match="calibration"):
        edgeslim.quantize(model, ["a", "b"])


def test_api_calibrate_takes_a_dataloader():
    from edgeslim.algorithms import ptq
    from edgeslim.api import calibrate

    model, info, calib = _digits()
    gm = ptq.prepare(model, tuple(info.input_shape), edgeslim.PTQConfig())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(16)), batch_size=8)
    assert calibrate(gm, loader) is gm


# ------------------------------------------------------------------------------------------ item 7: leftovers, links


def test_stale_staging_of_dead_processes_is_swept(capsys, d):
    out = d / "out"
    stale, live, foreign = out / f".staging-{dead_pid()}-abc", out / f".staging-{os.getpid()}-abc", out / "keep"
    for p in (stale, live, foreign):
        p.mkdir(parents=True)
        (p / "model_int8.onnx").write_bytes(b"half")
    expect_error(capsys, _quantize(d, "--seed", "-1"), "--seed")
    assert not stale.exists() and live.exists() and foreign.exists()


def test_sigterm_mid_run_leaves_no_staging_folder(d):
    out = d / "out"
    argv = _quantize(d, "--w-bits", "4", "--algorithm", "brecq", "--iters", "100000")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim", *map(str, argv)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.is_dir() and any(out.iterdir())):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert any(p.name.startswith(".staging-") for p in out.iterdir())
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err and "interrupted" in err
    assert not out.exists()  # the staging folder is gone, and so is the --out folder the run created


def test_symlink_loop_in_an_image_folder_is_walked_once(d):
    from edgeslim.data import Preprocess, open_dataset
    from edgeslim.data.files import walk_folder

    os.symlink("..", d / "images" / "cats" / "up")
    files, _ = walk_folder(d / "images")
    assert len(files) == 12
    assert len(open_dataset(d / "images", Preprocess((3, 8, 8), (0, 0, 0), (1, 1, 1)))) == 12


def test_export_never_writes_through_a_planted_tmp_link(d):
    model, info, calib = _digits()
    q = edgeslim.quantize(model, calib)
    (d / "out").mkdir()
    for name in ("m.onnx.tmp", "f.onnx.tmp", "plan.json.tmp"):
        os.symlink(d / f"victim-{name}", d / "out" / name)
    edgeslim.export_onnx(q, d / "out" / "m.onnx")
    edgeslim.export_fp32_onnx(model, info.input_shape, d / "out" / "f.onnx")
    edgeslim.MixedPlan((("conv1", "int8"),)).save(d / "out" / "plan.json")
    assert not list(d.glob("victim-*"))
    assert {p.name for p in (d / "out").iterdir()} == {"m.onnx", "f.onnx", "plan.json", "m.onnx.tmp", "f.onnx.tmp",
                                                      "plan.json.tmp"}
    import onnx

    onnx.checker.check_model(onnx.load(str(d / "out" / "m.onnx")))
    assert oct((d / "out" / "m.onnx").stat().st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize("text", ["int\u0668", "\u0668", "int\u00b2", "w\u0664a8"])
def test_non_ascii_digits_are_not_bit_widths(text):
    from edgeslim.quant.precision import LayerPrecision

    with pytest.raises(EdgeslimError, match="invalid precision"):
        LayerPrecision.parse(text)


def test_fewer_data_classes_than_the_model_predicts_warns(capsys, d):
    code = main(["quantize", "digits_cnn", "--random-init", "--calib-data", str(d / "images"), "--data",
                 str(d / "images"), "--calib-size", "8", "--simulate-size", "0", "--out", str(d / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: the model predicts 10 classes but --data has 2 (cats, dogs)" in err


def test_calibration_set_larger_than_memory_is_refused_up_front(capsys, d, monkeypatch):
    import edgeslim.data.limits as limits

    monkeypatch.setattr(limits, "machine_memory_bytes", lambda: 40 << 10)  # 40 images of 3x8x8 need 30 KiB
    expect_error(capsys, _quantize(d, "--calib-size", "40", data=d / "d.npz"), "lower --calib-size", out=d / "out")


def test_16_bit_gray_detection_images_keep_their_precision():
    from PIL import Image

    from edgeslim.data.detection import letterbox

    x, r, pad = letterbox(Image.fromarray(np.full((10, 20), 40000, np.uint16)), 32)
    assert x.shape == (3, 32, 32) and r == 1.6 and pad == (0, 8)
    assert x[:, 16, 16] == pytest.approx([40000 / 65535] * 3, abs=1e-6) and x[0, 0, 0] == pytest.approx(114 / 255)
