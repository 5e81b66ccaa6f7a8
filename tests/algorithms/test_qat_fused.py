"""The fused fake-quantizer of QAT (``quant.qat._FakeQuant``) against a frozen copy of the plain formulas it
replaced (``TrainableQuantizer.forward`` / ``code`` at cebb983): every method and level set, per tensor and
per channel, with a zero point, at the rounding ties of the range ends, without gradients, after an in-place op
on the output, and through SGD steps of a small QAT model.

Tolerances: forward values are compared exactly. The straight-through input gradient is ``g`` where the plain
graph computes ``(g * s) / s`` (two float32 roundings, at most 2^-23 relative: ``rtol=2.5e-7``). The learned
scale's gradient is a sum over the tensor that both sides accumulate in float32 in different orders (the plain
graph as two reductions, the fused path as two dot products): they may differ by the rounding of those sums,
checked as at most ``1e-5`` times the sum of the absolute terms (84 float32 epsilons; the blocked reductions of
the 1,440 terms here lose a few). EWGS (with a delta), DSQ and DAQ evaluate the plain graph's own backward
formulas, so their gradients are compared exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgeslim.algorithms import ptq, qat
from edgeslim.config import PTQConfig, QATConfig
from edgeslim.quant.qat import METHODS, QUANTIZERS, LevelSet, TrainableQuantizer, _pass_band, soft_gradient

EXACT = dict(rtol=0.0, atol=0.0)
GRAD_X = dict(rtol=2.5e-7, atol=0.0)


# -- the plain formulas, frozen (cebb983, quant/qat.py) --------------------------------------------

class _OldEWGSRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, q, inside, delta):
        ctx.save_for_backward(t - q, inside, delta)
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        diff, inside, delta = ctx.saved_tensors
        return g * (1 + delta * torch.sign(g) * diff) * inside, None, None, None


def _old_code(q: TrainableQuantizer, t: torch.Tensor) -> torch.Tensor:
    lv = q.levels
    td = t.detach()
    hard = lv.round(td)
    if not (q.training and torch.is_grad_enabled() and t.requires_grad):
        return hard
    r = torch.round(td) if lv.uniform else td
    inside = (r >= lv.qmin) & (r <= lv.qmax)
    if q.method == "ewgs" and not q.hutchinson and float(q.delta) != 0.0:
        return _OldEWGSRound.apply(t, hard, inside, q.delta)
    if q.method in ("dsq", "daq") and not q.hutchinson:
        clamped = t.clamp(lv.qmin, lv.qmax)
        lo, hi = lv.neighbours(clamped.detach())
        soft = soft_gradient(q.method, clamped, lo, hi, alpha=q.alpha, gamma=q.gamma)
        return hard + (soft - soft.detach()) * inside
    return hard + (t - td) * inside


def _old_forward(q: TrainableQuantizer, x: torch.Tensor) -> torch.Tensor:
    s = q.scale.abs().clamp_min(1e-8)
    if q.grad_scale is None:
        q.grad_scale = 1.0 / (max(1, x[0].numel()) * q.qp) ** 0.5
    if q.method != "ste" and q.training and torch.is_grad_enabled():
        s = s.detach() + (s - s.detach()) * q.grad_scale
    s, zp = q._shape(s, x), q._shape(q.zero_point, x)
    t = x / s + zp
    return (_old_code(q, t) - zp) * s


# -- cases ---------------------------------------------------------------------------------------------------

def _case(kind: str, method: str, variant: str, bits: int = 3):
    """(quantizer, input): ``act`` unsigned per tensor, ``signed`` signed per tensor, ``zp`` unsigned with a zero
    point (uniform only), ``channel`` signed per output channel (weights). Scales are powers of two, so ``x / s`` is
    exact and the planted ties (``k + 0.5`` at both range ends, and the ends themselves) reach the rounding."""
    g = torch.Generator().manual_seed(hash((kind, method, variant, bits)) % 1000)
    signed = variant in ("signed", "channel")
    lv = LevelSet(kind, bits, signed)
    if variant == "channel":
        x = torch.randn(6, 4, 3, 3, generator=g) * 2
        scale = torch.tensor([0.25, 0.5, 0.125, 0.25, 1.0, 0.5])
        zp, axis, numel = torch.zeros(6), 0, x.numel()
        unit = scale[:, None, None, None]
    else:
        x = torch.randn(8, 5, 6, 6, generator=g) * 3
        scale, zp = torch.tensor(0.25), torch.tensor(3.0 if variant == "zp" else 0.0)
        axis, numel, unit = None, None, scale
    ends = [lv.qmin - 0.5, lv.qmin, lv.qmax, lv.qmax + 0.5, lv.qmin + 0.5, lv.qmax - 0.5, lv.qmin - 1.5, lv.qmax + 1.5]
    ties = torch.tensor(ends * 4, dtype=torch.float32)
    flat = x.reshape(-1).clone()
    picks = torch.randperm(flat.numel(), generator=g)[:ties.numel()]
    u = unit.expand_as(x).reshape(-1)[picks]
    flat[picks] = (ties - float(zp.reshape(-1)[0])) * u  # t = x / s + zp lands exactly on the planted value
    x = flat.reshape(x.shape)
    q = TrainableQuantizer(lv, method, scale, zp, axis, numel=numel).train()
    if method == "ewgs":
        q.delta.fill_(0.3)
    if method == "dsq":
        q.alpha = 0.1
    return q, x


def _run(q: TrainableQuantizer, x: torch.Tensor, g: torch.Tensor, forward, inplace: bool = False):
    q = copy.deepcopy(q)
    x = x.detach().clone().requires_grad_(True)
    y = forward(q, x)
    if inplace:
        y.mul_(2.0)
    y.backward(g)
    return y.detach(), x.grad, (None if q.scale.grad is None else q.scale.grad.clone()), q


def _scale_bound(q: TrainableQuantizer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1e-5 times the sum of |terms| of the scale gradient (per scale), through the LSQ gradient scaling."""
    s = q._shape(q.scale.detach().abs(), x)
    zp = q._shape(q.zero_point, x)
    t = x / s + zp
    code = q.levels.round(t)
    terms = (g * (code - zp)).abs() + (g * (t - zp)).abs()
    return 1e-5 * terms.sum_to_size(s.shape).reshape(q.scale.shape) * q.grad_scale + 1e-12


VARIANTS = ["act", "signed", "zp", "channel"]


@pytest.mark.parametrize("kind", QUANTIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_matches_plain_formulas(kind, method):
    for variant in VARIANTS:
        if variant == "zp" and kind != "uniform":
            continue  # non-uniform level sets are symmetric (``attach`` keeps zero points uniform)
        for bits in (2, 4):
            q, x = _case(kind, method, variant, bits)
            g = torch.randn(x.shape, generator=torch.Generator().manual_seed(bits))
            y0, gx0, gs0, _ = _run(q, x, g, _old_forward)
            y1, gx1, gs1, q1 = _run(q, x, g, lambda m, v: m(v))
            assert TrainableQuantizer.fused
            torch.testing.assert_close(y1, y0, **EXACT)
            straight = method in ("ste", "lsq")
            torch.testing.assert_close(gx1, gx0, **(GRAD_X if straight else EXACT))
            if method == "ste":
                assert gs0 is None and gs1 is None
            elif straight:
                assert ((gs1 - gs0).abs() <= _scale_bound(q1, x, g)).all(), (variant, bits, gs1, gs0)
            else:
                torch.testing.assert_close(gs1, gs0, **EXACT)


def test_ewgs_before_delta_is_straight_through():
    q, x = _case("uniform", "ewgs", "signed", 4)
    q.delta.zero_()
    g = torch.randn_like(x)
    y0, gx0, gs0, _ = _run(q, x, g, _old_forward)
    y1, gx1, gs1, q1 = _run(q, x, g, lambda m, v: m(v))
    torch.testing.assert_close(y1, y0, **EXACT)
    torch.testing.assert_close(gx1, gx0, **GRAD_X)
    assert ((gs1 - gs0).abs() <= _scale_bound(q1, x, g)).all()


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_pass_band_reproduces_the_rounded_range(kind):
    """``lo < t < hi`` is exactly ``round(t)`` (uniform) or ``t`` (level sets) inside ``[qmin, qmax]``, including
    the ties ``k + 0.5`` and every float next to the ends, for both parities of the ends."""
    sets = [LevelSet(kind, b, sg) for b in (2, 3, 4, 8 if kind == "uniform" else 4) for sg in (True, False)]
    if kind == "uniform":
        sets += [LevelSet("uniform", 8, True, qmin=-127, qmax=127), LevelSet("uniform", 4, False, qmin=1, qmax=14)]
    for lv in sets:
        lo, hi = _pass_band(lv)
        centres = torch.tensor([lv.qmin - 0.5, lv.qmin, lv.qmax, lv.qmax + 0.5], dtype=torch.float32)
        ulp = torch.nextafter(centres, centres + 1) - centres
        steps = torch.arange(-64, 65, dtype=torch.float32)
        t = (centres[:, None] + steps * ulp[:, None]).reshape(-1)  # 64 float steps either side of each end
        r = torch.round(t) if lv.uniform else t
        inside = (r >= lv.qmin) & (r <= lv.qmax)
        passed = torch.ops.aten.hardtanh_backward(torch.ones_like(t), t, lo, hi) != 0
        assert torch.equal(passed, inside), (lv, t[passed != inside])


def test_near_ties_of_an_inexact_scale():
    """Inputs one float away from ``(k + 0.5) s`` with ``s = 0.3``: some round differently through ``x * (1 / s)``
    (what torch's fake-quant kernels compute) than through ``x / s``; the fused path keeps ``x / s``."""
    k = torch.arange(-9, 9, dtype=torch.float32) + 0.5
    base = k * 0.3
    x = torch.cat([torch.nextafter(base, base + 1), torch.nextafter(base, base - 1), base]).reshape(2, 3, 3, 3)
    s = torch.tensor(0.3)
    assert (torch.round(x / s) != torch.round(x * (1 / s))).any()  # the case is real
    for method in ("lsq", "ste"):
        q = TrainableQuantizer(LevelSet("uniform", 4, True), method, s, torch.tensor(0.0), None).train()
        g = torch.randn_like(x)
        y0, gx0, _, _ = _run(q, x, g, _old_forward)
        y1, gx1, _, _ = _run(q, x, g, lambda m, v: m(v))
        torch.testing.assert_close(y1, y0, **EXACT)
        torch.testing.assert_close(gx1, gx0, **GRAD_X)
        with torch.no_grad():
            torch.testing.assert_close(q(x), _old_forward(q, x), **EXACT)


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_values_without_gradients(kind):
    for variant in VARIANTS:
        if variant == "zp" and kind != "uniform":
            continue
        q, x = _case(kind, "lsq", variant, 4)
        with torch.no_grad():
            torch.testing.assert_close(q(x), _old_forward(q, x), **EXACT)
        q.eval()
        torch.testing.assert_close(q(x), _old_forward(q, x), **EXACT)  # eval mode, the scale still learns
        assert q(x).requires_grad


def test_inplace_op_on_the_output_and_second_backward():
    q, x = _case("uniform", "lsq", "zp", 4)
    g = torch.randn_like(x)
    y0, gx0, gs0, _ = _run(q, x, g, _old_forward, inplace=True)
    y1, gx1, gs1, q1 = _run(q, x, g, lambda m, v: m(v), inplace=True)
    torch.testing.assert_close(y1, y0, **EXACT)
    torch.testing.assert_close(gx1, gx0, **GRAD_X)
    assert ((gs1 - gs0).abs() <= 2 * _scale_bound(q1, x, g)).all()
    q2 = copy.deepcopy(q)
    xr = x.clone().requires_grad_(True)
    y = q2(xr)
    y.backward(g, retain_graph=True)
    first = (xr.grad.clone(), q2.scale.grad.clone())
    y.backward(g)
    torch.testing.assert_close(xr.grad, 2 * first[0], **EXACT)
    torch.testing.assert_close(q2.scale.grad, 2 * first[1], **EXACT)


def test_hutchinson_keeps_the_plain_graph():
    q, x = _case("apot", "ewgs", "signed", 3)
    q.hutchinson = True
    xr = x.clone().requires_grad_(True)
    y = q(xr)
    assert q.last_output is y
    (gy,) = torch.autograd.grad((y ** 2).sum(), xr, create_graph=True)  # twice differentiable, as before
    assert gy.requires_grad


@pytest.fixture(scope="module")
def frozen_tiny():
    """The tiny ResNet after PTQ (prepare, calibrate, freeze: what ``api.quantize`` hands to ``qat.attach``)."""
    from conftest import make_tiny_resnet

    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = ptq.prepare(make_tiny_resnet(), (3, 16, 16), PTQConfig(4, 4))
    ptq.calibrate(gm, lambda: [calib])
    ptq.freeze(gm, PTQConfig(4, 4))
    return gm


@pytest.mark.parametrize("method", ["lsq", "ste"])
def test_sgd_steps_of_a_small_qat_model_match_the_plain_path(frozen_tiny, method):
    """Three gradient steps of a W4A4 QAT model (``qat.attach`` on the frozen PTQ graph) with the fused and the plain
    quantizers: same losses and parameters to float rounding."""
    start = copy.deepcopy(frozen_tiny)
    qat.attach(start, QATConfig(4, 4, method=method))
    runs = []
    for fused in (True, False):
        model = copy.deepcopy(start).train()
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        losses = []
        TrainableQuantizer.fused = fused
        try:
            for _ in range(3):
                x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 5, (16,), generator=gen)
                loss = F.cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(0.01 * g)  # plain SGD (torch.optim would import torch._dynamo: seconds)
                losses.append(float(loss.detach()))
        finally:
            TrainableQuantizer.fused = True
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l1, p1), (l0, p0) = runs
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
