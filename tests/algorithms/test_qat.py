"""Quantization-aware training: level sets, estimators against torch / numpy oracles, finishing into the PTQ
modules, export, the shift-add engine, resuming, torchrun replicas and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeslim import api
from edgeslim.algorithms import ptq, qat
from edgeslim.config import PTQConfig, QATConfig
from edgeslim.engine import ops as eops
from edgeslim.engine import run as erun
from edgeslim.eval import ort as ort_eval
from edgeslim.export.onnx_qdq import save_onnx, to_onnx
from edgeslim.lower import lower
from edgeslim.quant.modules import QuantConv2d
from edgeslim.quant.qat import LevelSet, TrainableQuantizer, soft_gradient
from edgeslim.train.checkpoint import Checkpoint, params_digest
from edgeslim.train.data import TrainData

from helpers import expect_error as _expect_error, run_cli as _run


# -- level sets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_level_sets(bits):
    u = LevelSet("uniform", bits, True)
    assert u.levels.tolist() == list(range(-(1 << (bits - 1)), 1 << (bits - 1)))
    for kind in ("pot", "apot"):
        s, un = LevelSet(kind, bits, True), LevelSet(kind, bits, False)
        assert len(un.levels) == 1 << bits and len(set(un.levels.tolist())) == 1 << bits
        assert len(s.levels) == (1 << bits) - 1 and s.levels.tolist() == sorted(-v for v in s.levels.tolist())
        ints = [int(v) for v in un.levels.tolist()]
        assert all(v == float(int(v)) for v in un.levels.tolist())
        terms = max(bin(v).count("1") for v in ints)
        if kind == "pot":
            assert terms == 1  # every level is 0 or a power of two
        else:
            assert terms <= math.ceil(bits / 2)  # sums of at most n powers of two (seed 004 eq. 4)
    assert LevelSet("pot", 3, False).levels.tolist() == [0, 1, 2, 4, 8, 16, 32, 64]


# -- forward values and gradients ---------------------------------------------------------------------------

def _quantizer(levels, method, scale, zp=0.0, axis=None, numel=None):
    q = TrainableQuantizer(levels, method, torch.as_tensor(scale, dtype=torch.float32),
                           torch.as_tensor(zp, dtype=torch.float32), axis, numel=numel)
    return q.train()


def test_uniform_lsq_matches_torch_learnable_fake_quant():
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 5, 5) * 2).requires_grad_(True)
    q = _quantizer(LevelSet("uniform", 4, False), "lsq", 0.3, zp=5.0)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_(True)
    sr = torch.tensor([0.3], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xr, sr, torch.tensor([5.0]), 0, 15, q.grad_scale)
    ref.backward(g)
    assert torch.equal(y.detach(), ref.detach())
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=0)  # (1/s)*s: one float rounding
    assert torch.allclose(q.scale.grad.reshape(1), sr.grad, rtol=1e-4)
    # per output channel, as weights are trained
    w = torch.randn(6, 3, 3, 3).requires_grad_(True)
    s = w.detach().abs().amax(dim=(1, 2, 3)) / 7
    qw = _quantizer(LevelSet("uniform", 4, True), "lsq", s, zp=torch.zeros(6), axis=0, numel=w.numel())
    yw = qw(w)
    gw = torch.randn_like(yw)
    yw.backward(gw)
    wr, swr = w.detach().clone().requires_grad_(True), s.clone().requires_grad_(True)
    refw = torch._fake_quantize_learnable_per_channel_affine(wr, swr, torch.zeros(6), 0, -8, 7, qw.grad_scale)
    refw.backward(gw)
    assert torch.equal(yw.detach(), refw.detach())
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-6, atol=0)
    assert torch.allclose(qw.scale.grad, swr.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["pot", "apot"])
def test_nonuniform_forward_and_gradients_match_numpy(kind):
    torch.manual_seed(1)
    levels = LevelSet(kind, 3, True)
    x = (torch.randn(2000) * 3).requires_grad_(True)
    q = _quantizer(levels, "lsq", 0.1, numel=2000)
    y = q(x)
    y.sum().backward()
    t = x.detach().numpy() / 0.1
    lv = levels.levels.numpy()
    nearest = lv[np.argmin(np.abs(t[:, None] - lv[None, :]) + 1e-6 * (lv[None, :] > t[:, None]), axis=1)]
    np.testing.assert_allclose(y.detach().numpy(), nearest * np.float32(0.1), rtol=1e-6)
    inside = (t >= lv[0]) & (t <= lv[-1])
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(np.float32))
    # APoT / LSQ clipping gradient: level - t inside the range, the end level outside, times the gradient scale
    ds = np.where(inside, nearest - t, nearest).sum() * q.grad_scale
    assert float(q.scale.grad) == pytest.approx(ds, rel=1e-3)


def test_ste_passes_inside_the_range_and_keeps_scales():
    q = _quantizer(LevelSet("uniform", 2, False), "ste", 0.5)
    assert not q.scale.requires_grad
    x = torch.tensor([-1.0, 0.2, 0.7, 1.4, 2.0, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # inside [0, 3 * 0.5]


def test_ewgs_backward_is_the_scaled_gradient():
    q = _quantizer(LevelSet("uniform", 3, False), "ewgs", 0.25)
    q.delta.fill_(0.3)
    x = torch.tensor([0.1, 0.33, 0.6, 0.9, 1.7, 3.0], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, -1.0, 2.0, 1.0])
    q(x).backward(g)
    t = x.detach().numpy() / 0.25
    qv = np.clip(np.round(t), 0, 7)
    inside = (t >= 0) & (t <= 7)
    expect = g.numpy() * (1 + 0.3 * np.sign(g.numpy()) * (t - qv)) * inside
    np.testing.assert_allclose(x.grad.numpy(), expect, rtol=1e-6)


@pytest.mark.parametrize("method", ["dsq", "daq"])
def test_soft_estimators_backward_equals_numpy_derivative(method):
    levels = LevelSet("uniform", 4, False)
    q = _quantizer(levels, method, 1.0)
    q.alpha = 0.1
    x = torch.linspace(0.05, 14.9, 301).requires_grad_(True)
    y = q(x)
    assert torch.equal(y.detach(), torch.round(x.detach()).clamp(0, 15))  # the forward stays the hard level
    y.sum().backward()
    r = x.detach().numpy().astype(np.float64) - np.floor(x.detach().numpy())
    if method == "dsq":
        k = math.log(2 / 0.1 - 1)
        expect = k * (1 - np.tanh(k * (r - 0.5)) ** 2) / (2 * math.tanh(k / 2))
    else:
        d = 2 * r - 1
        beta = 2.0 / np.maximum(np.abs(d), 2.0 / 50)
        sig = 1 / (1 + np.exp(-beta * d))
        expect = 2 * beta * sig * (1 - sig)
    np.testing.assert_allclose(x.grad.numpy(), expect, rtol=2e-4, atol=1e-5)
    assert soft_gradient(method, torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1.0]), alpha=0.1,
                         gamma=2.0).item() == pytest.approx(0.5)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    a = torch.tensor([0.5, 2.0, 3.0, 1.5])
    y = torch.randn(4, requires_grad=True) * 1.0
    z = torch.randn(3, requires_grad=True) * 1.0
    loss = (a * y ** 2).sum() + (z ** 3).sum()
    est = qat.hutchinson_trace(loss, [y, z], torch.Generator().manual_seed(0))
    assert est[0][0] == pytest.approx(float(2 * a.sum()))
    assert est[1][0] == pytest.approx(float((6 * z.detach()).sum()), rel=1e-5)
    assert est[0][1] == pytest.approx(float((2 * a * y.detach()).abs().mean()), rel=1e-6)


# -- finishing into the PTQ modules, export, engine ---------------------------------------------------------

def _trained(tiny_model, tiny_calib, cfg, plan=None, steps=4):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(w_bits=cfg.w_bits, a_bits=cfg.a_bits, calibrator="mse"),
                     plan=plan)
    gm = q.model
    qat.attach(gm, cfg)
    data = TrainData(tiny_calib, torch.arange(len(tiny_calib)) % 5, torch.zeros(3))
    qat.train(gm, None, data, cfg, evaluate=lambda m: 0.0, progress=False)
    return gm


def test_finish_uniform_keeps_the_function_and_exports_within_one_lsb(tiny_model, tiny_calib, tmp_path):
    cfg = QATConfig(4, 4, method="lsq", epochs=None, max_steps=4, batch_size=16, lr=0.01)
    gm = _trained(tiny_model, tiny_calib, cfg)
    gm.eval()
    with torch.no_grad():
        before = gm(tiny_calib)
    learned = {n: float(m.wq.scale.detach().abs().mean()) for n, m in gm.named_modules() if isinstance(m, QuantConv2d)}
    info = qat.finish(gm)
    assert info["exportable"] and not qat.quantizers(gm)
    ptq.set_mode(gm, "quant")
    for n, m in gm.named_modules():
        if isinstance(m, QuantConv2d):
            assert float(m.w_scale.mean()) == pytest.approx(learned[n])
    with torch.no_grad():
        after = gm(tiny_calib)
    out_scale = float([m for m in ptq.act_quants(gm)][-1].scale)
    assert float((after - before).abs().max()) <= out_scale + 1e-6  # int32 bias rounding only
    sess = ort_eval.session(save_onnx(to_onnx(lower(gm, (3, 16, 16))), tmp_path / "m.onnx"))
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: tiny_calib.numpy()})[0]
    assert np.abs(onnx_out - after.numpy()).max() <= out_scale * 1.01


def test_qat_starts_from_the_adaround_model(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(w_bits=3, a_bits=8, algorithms=("adaround",), iters=30))
    gm = q.model
    assert any(getattr(m, "round_up", None) is not None for m in gm.modules())
    with torch.no_grad():
        ref = gm(tiny_calib)
    codes = {n: m.weight_int() for n, m in gm.named_modules() if isinstance(m, QuantConv2d)}
    qat.attach(gm, QATConfig(3, 8, method="lsq"))
    gm.eval()
    assert all(getattr(m, "round_up", None) is None for m in gm.modules())
    for n, m in gm.named_modules():
        if isinstance(m, QuantConv2d):
            assert torch.equal(m.weight_int(), codes[n])  # the learned codes, now as round-to-nearest of the weights
    with torch.no_grad():
        out = gm(tiny_calib)
    assert float((out - ref).abs().max()) <= float(ptq.act_quants(gm)[-1].scale) + 1e-6  # float vs int32 bias


def test_pot_weights_export_as_level_codes_and_run_as_shifts(tiny_model, tiny_calib, tmp_path):
    cfg = QATConfig(4, 8, quantizer="pot", a_quantizer="uniform", method="lsq", epochs=None, max_steps=3,
                    batch_size=16, lr=0.01)
    gm = _trained(tiny_model, tiny_calib, cfg)
    info = qat.finish(gm)
    assert info["exportable"], info["reason"]
    ptq.set_mode(gm, "quant")
    allowed = {int(v) for v in LevelSet("pot", 4, True).levels.tolist()}
    for name, m in gm.named_modules():
        if isinstance(m, QuantConv2d):
            codes = m.weight_int()
            assert set(codes.unique().tolist()) <= allowed, name
            assert info["levels"][name]["kind"] == "pot"
    graph = lower(gm, (3, 16, 16))
    convs = [n for n in graph.nodes if n.op == "QLinearConv"]
    assert convs and all(eops.shift_terms(n.arrays["w"]) == 1 for n in convs)
    x = tiny_calib.numpy()
    plain = erun.run(graph, x, return_codes=True)
    shifted = erun.run(graph, x, return_codes=True, shift_add=True)
    for k in plain:
        np.testing.assert_array_equal(plain[k], shifted[k])
    sess = ort_eval.session(save_onnx(to_onnx(graph), tmp_path / "m.onnx"))
    with torch.no_grad():
        ref = gm(tiny_calib).numpy()
    out_scale = float(ptq.act_quants(gm)[-1].scale)
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x})[0] - ref).max() <= out_scale * 1.01


def test_shift_add_conv_equals_integer_conv():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 4, 7, 7))
    w = np.asarray(LevelSet("apot", 4, True).levels.numpy()[rng.integers(0, 15, (6, 4, 3, 3))], np.int64)
    bias = rng.integers(-500, 500, 6)
    ref, _ = eops.conv_acc(x, 128, w, 0, bias, pads=(1, 1, 1, 1), strides=(2, 2))
    np.testing.assert_array_equal(eops.conv_acc_shift(x, 128, w, bias, pads=(1, 1, 1, 1), strides=(2, 2)), ref)
    assert eops.shift_terms(w) == 2


def test_nonuniform_activations_are_not_exported(tiny_model, tiny_calib):
    cfg = QATConfig(2, 2, quantizer="apot", method="ste", epochs=None, max_steps=2, batch_size=16)
    gm = _trained(tiny_model, tiny_calib, cfg)
    info = qat.finish(gm)
    assert not info["exportable"] and "--a-quantizer uniform" in info["reason"]
    with torch.no_grad():
        assert torch.isfinite(gm(tiny_calib)).all()  # the PyTorch model still runs with its APoT activations


# -- training, resuming, replicas ---------------------------------------------------------------------------

def test_resume_after_a_crash_gives_the_same_weights(tiny_model, tiny_calib, tmp_path):
    cfg = QATConfig(4, 4, method="ewgs", epochs=3, batch_size=16, lr=0.01, ewgs_every=2)
    data = TrainData(tiny_calib, torch.arange(len(tiny_calib)) % 5, torch.zeros(3))

    def fresh():
        gm = api.quantize(tiny_model, tiny_calib, PTQConfig(w_bits=4, a_bits=4)).model
        qat.attach(gm, cfg)
        return gm

    whole = fresh()
    qat.train(whole, None, data, cfg, evaluate=lambda m: 0.0, checkpoint=Checkpoint(tmp_path / "a.pt"), progress=False)

    class Crash(Exception):
        pass

    def crash_in_epoch_2(m, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        return 0.0

    broken = fresh()
    with pytest.raises(Crash):
        qat.train(broken, None, data, cfg, evaluate=crash_in_epoch_2, checkpoint=Checkpoint(tmp_path / "b.pt"),
                  progress=False)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 1
    resumed = fresh()
    r = qat.train(resumed, None, data, cfg, evaluate=lambda m: 0.0, checkpoint=Checkpoint(tmp_path / "b.pt"),
                  resume=True, progress=False)
    assert r["resumed_from_epoch"] == 1 and len(r["history"]) == 3
    assert any(float(q.delta) > 0 for q in qat.quantizers(resumed))  # EWGS's delta was estimated and kept
    assert params_digest(resumed) == params_digest(whole)
    assert params_digest(resumed) != params_digest(fresh())


@pytest.mark.slow  # ~7 s on an idle 2-core machine: over the fast suite's budget
def test_qat_cli_learns_digits_and_writes_summary(capsys, tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)  # digits_cnn starts from random weights
    code, stdout, err = _run(capsys, "qat", "digits_cnn", "--random-init", "--train-data", "sklearn-digits", "--train-split", "train",
                             "--data", "sklearn-digits", "--data-split", "test", "--w-bits", "4", "--a-bits", "4",
                             "--max-steps", "200", "--batch-size", "64", "--lr", "0.1", "--no-augment",
                             "--calib-size", "128", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["qat"]["top1"] > 0.6 and s["qat"]["top1"] > s["ptq"]["top1"] + 0.2  # random init: training did the work
    assert abs(s["onnx"]["top1"] - s["qat"]["top1"]) <= 2 / 360
    assert s["history"][-1]["steps"] == 200 and "fp32" in s and s["training"]["diverged"] is None
    assert {"checkpoint.pt", "qat_model.pt", "model_int8.onnx", "encodings.json"} <= {p.name for p in out.iterdir()}
    _expect_error(capsys, tmp_path / "x", ["qat", "digits_cnn", "--random-init", "--train-data", "sklearn-digits", "--data",
                                           "sklearn-digits", "--max-steps", "1", "--out", out], "--resume")
    _expect_error(capsys, tmp_path / "x", ["qat", "digits_cnn", "--random-init", "--train-data", "sklearn-digits", "--data",
                                           "sklearn-digits", "--max-steps", "5", "--resume", "--out", out],
                  "differs in config (augment false -> true, batch_size 64 -> 128, lr 0.1 -> 0.001, max_steps 200 -> 5)")


@pytest.mark.parametrize("argv, match", [
    (["--method", "magic"], "--method"),
    (["--quantizer", "log"], "--quantizer"),
    (["--w-bits", "1"], "--w-bits"),
    (["--lr", "-1"], "--lr"),
    (["--resume"], "no checkpoint"),
])
def test_qat_cli_errors(capsys, tmp_path, argv, match):
    _expect_error(capsys, tmp_path, ["qat", "digits_cnn", "--random-init", "--train-data", "sklearn-digits", "--data", "sklearn-digits",
                                     "--max-steps", "1", "--out", tmp_path / "run", *argv], match)


@pytest.mark.slow  # ~10-22 s on an idle 2-core machine: over the fast suite's budget
def test_torchrun_two_processes_keep_identical_replicas(tmp_path, image_folder, user_model):  # noqa: F811
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(user_model.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edgeslim", "qat", "usermodels:tiny", "--input-shape", "3,8,8",
           "--train-data", str(image_folder), "--data", str(image_folder), "--max-steps", "4", "--batch-size", "4",
           "--calib-size", "8", "--method", "ewgs", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    rep = s["training"]["replicas"]
    assert rep["world_size"] == 2 and rep["identical"] and len(set(rep["digests"])) == 1
    assert s["training"]["steps"] == 4
