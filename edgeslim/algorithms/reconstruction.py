"""Learned rounding on calibration data: AdaRound (layer by layer) and BRECQ (block by block).

AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020) chooses, for
every weight, whether to round down or up. Each weight gets a variable ``V``; the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1) relaxes the choice, the
relaxed weight is ``s * clamp(floor(w / s) + h(V))``, and

    loss = || f_q(x_q) - f(x) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

is minimized with Adam on cached inputs. ``beta`` anneals from 20 to 2 after a warm-up without the regularizer,
which pushes every ``h`` to 0 or 1; the final rounding is ``h >= 0.5``. The output ``f(x)`` is the float model's
(every quantizer off); the input ``x_q`` is what the quantized model, with earlier units already
reconstructed, feeds the unit ("asymmetric reconstruction"), so errors do not pile up.

BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021)
takes a residual block as the unit: the loss is the block's output error, so rounding inside the block can
compensate across its layers. When activations are quantized it also learns the step sizes of the block's
activation quantizers (LSQ gradients, Esser et al. 2020) jointly with the rounding, as its released code and
QDrop do. With ``fisher`` the squared error is weighted per element by the squared gradient of the
KL divergence between the quantized and the float model's predictions with respect to the block output (the
diagonal Fisher approximation of BRECQ's section 3.2).

Units come from the model's own structure (``units``): a block is the innermost module that holds a residual
add or a concatenation; other weighted layers are grouped by the innermost module holding 2 to 4 of them, or
stand alone. A unit whose reconstructed error on the calibration images is not below round-to-nearest's is
put back (``UnitReport.kept``), so reconstruction never makes a unit worse on the data it saw.

The result is only a choice of codes on the existing grid (``QuantConv2d.set_rounding``) and, for BRECQ, new
activation scales: lowering, the integer engine and the ONNX export use them unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from tqdm import tqdm

from ..config import Reconstruction
from ..errors import EdgeslimError
from ..graph import ops
from ..quant import primitives as P
from ..quant.modules import ActQuant, QuantConv2d, QuantLinear
from . import ptq

__all__ = ["ZETA", "GAMMA", "MAX_GROUP_LAYERS", "Unit", "UnitReport", "layer_units", "block_units", "rectified_sigmoid",
           "init_rounding_variable", "beta_at", "reconstruct"]


ZETA, GAMMA = 1.1, -0.1
MAX_GROUP_LAYERS = 4  # a plain (non-residual) module holding more weighted layers is reconstructed layer by layer


@dataclass
class Unit:
    """A contiguous run of graph nodes reconstructed together: one layer (AdaRound) or one block (BRECQ)."""

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    output: fx.Node
    layers: list[str]


@dataclass
class UnitReport:
    unit: str
    layers: list[str]
    mse_rtn: float  # calibration images, round-to-nearest (sum over channels, mean over the rest)
    mse: float  # after reconstruction (or mse_rtn when not kept)
    kept: bool
    act_scales: int  # activation step sizes learned
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- units


def _scopes(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Enclosing module paths, outermost first (``layer1``, ``layer1.0``); a module node's own path is excluded."""
    if node.op == "call_module":
        parts = str(node.target).split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]
    stack = node.meta.get("nn_module_stack") or {}
    names = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return [n for n in names if n]


def _integer_weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = ops.module(gm, node)
    return isinstance(mod, (QuantConv2d, QuantLinear)) and not mod.spec.is_float


def _with_output_quant(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    last = nodes[-1]
    if len(last.users) == 1:
        (user,) = last.users
        if isinstance(ops.module(gm, user), ActQuant):
            return nodes + [user]
    return nodes


def _make_unit(gm: fx.GraphModule, name: str, nodes: list[fx.Node]) -> Unit | None:
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1 or outputs[-1] is not nodes[-1]:
        return None
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    layers = [str(n.target) for n in nodes if _integer_weighted(gm, n)]
    return Unit(name, nodes, inputs, nodes[-1], layers)


def _layer_unit(gm: fx.GraphModule, node: fx.Node, output_quant: bool) -> Unit:
    """One layer as a unit, with its output quantizer when asked for and possible."""
    if output_quant:
        unit = _make_unit(gm, str(node.target), _with_output_quant(gm, [node]))
        if unit is not None:
            return unit
    return _make_unit(gm, str(node.target), [node])


def layer_units(gm: fx.GraphModule, *, output_quant: bool = False) -> list[Unit]:
    """One unit per integer-weight conv / linear (AdaRound); ``output_quant`` adds the layer's output quantizer."""
    return [_layer_unit(gm, n, output_quant) for n in ptq.weighted_nodes(gm) if _integer_weighted(gm, n)]


def block_units(gm: fx.GraphModule) -> list[Unit]:
    """BRECQ's units: residual / merge blocks, small plain modules, and single layers, in graph order."""
    graph_nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(graph_nodes)}
    weighted = [n for n in ptq.weighted_nodes(gm) if _integer_weighted(gm, n)]
    merges = {_scopes(gm, n)[-1] for n in graph_nodes if ops.kind(gm, n) in ("add", "cat") and _scopes(gm, n)}
    owner: dict[fx.Node, str | None] = {}
    for w in weighted:
        blocks = [s for s in _scopes(gm, w) if s in merges]
        owner[w] = blocks[-1] if blocks else None
    free = [w for w in weighted if owner[w] is None]
    for w in free:
        counts = {s: sum(1 for v in free if s in _scopes(gm, v)) for s in _scopes(gm, w)}
        groups = [s for s, c in counts.items() if 2 <= c <= MAX_GROUP_LAYERS]
        owner[w] = groups[-1] if groups else None

    units: list[Unit] = []
    done: set[fx.Node] = set()
    for w in weighted:
        if w in done:
            continue
        scope = owner[w]
        unit = None
        if scope is not None:
            members = [n for n in graph_nodes if n.op not in ("placeholder", "output")
                       and (scope in _scopes(gm, n) or str(n.target) == scope)]
            lo, hi = min(order[n] for n in members), max(order[n] for n in members)
            span = _with_output_quant(gm, graph_nodes[lo:hi + 1])
            mine = {v for v in weighted if owner[v] == scope}
            if all(v in mine for v in span if v in owner):
                unit = _make_unit(gm, scope, span)
            if unit is not None:
                done |= mine
        if unit is None:
            unit = _layer_unit(gm, w, output_quant=True)
            done.add(w)
        units.append(unit)
    return units


# ----------------------------------------------------------------------------- running pieces of the graph


class _Runner(fx.Interpreter):
    """Runs a graph prefix (to collect a unit's inputs) or a unit's nodes alone (to train it)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def prefix(self, x: torch.Tensor, targets: list[fx.Node]) -> list[torch.Tensor]:
        last = max(self.order[t] for t in targets)
        self.env = {}
        for n in self.module.graph.nodes:
            if self.order[n] > last or n.op == "output":
                break
            self.env[n] = x if n.op == "placeholder" else self.run_node(n)
        return [self.env[t] for t in targets]

    def unit(self, unit: Unit, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.env = {}
        for n, v in zip(unit.inputs, inputs):
            self.env[n] = v
        for n in unit.nodes:
            self.env[n] = self.run_node(n)
        return self.env[unit.output]


def _batches(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


def _collect(runner: _Runner, x: torch.Tensor, targets: list[fx.Node], size: int = 128) -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = [[] for _ in targets]
    with torch.no_grad():
        for xb in _batches(x, size):
            for acc, v, t in zip(out, runner.prefix(xb, targets), targets):
                if not isinstance(v, torch.Tensor):
                    raise EdgeslimError(f"{t.name} feeds a reconstruction unit but is not a tensor: run without "
                                        "--algorithm adaround / brecq for this model")
                acc.append(v.detach())
    return [torch.cat(v) for v in out]


def _error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions (BRECQ's ``lp_loss``)."""
    d = (out - target).pow(2)
    if weight is not None:
        d = d * weight
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _unit_error(runner: _Runner, unit: Unit, inputs: list[torch.Tensor], target: torch.Tensor,
                size: int = 256) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(target), size):
            out = runner.unit(unit, [v[i:i + size] for v in inputs])
            total += float(_error(out, target[i:i + size])) * len(out)
            n += len(out)
    return total / max(n, 1)


# ----------------------------------------------------------------------------- the optimization


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding_variable(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac``: the relaxed weight starts at the float weight."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def beta_at(it: int, settings: Reconstruction) -> float | None:
    """Regularizer exponent at iteration ``it``; None during the warm-up (no regularizer)."""
    start = int(settings.warmup * settings.iters)
    if it < start:
        return None
    rel = (it - start) / max(1, settings.iters - start)
    hi, lo = settings.beta
    return lo + (hi - lo) * max(0.0, 1.0 - rel)


class _SoftWeights:
    """Patches a layer so its fake-quant weights are the relaxed ``s * clamp(floor(w / s) + h(V))``."""

    def __init__(self, mod: QuantConv2d | QuantLinear) -> None:
        self.mod = mod
        _, frac = P.grid_floor(mod.weight.detach(), mod.w_scale, mod.w_axis)
        self.v = nn.Parameter(init_rounding_variable(frac))
        mod.fq_weight = self.weights  # instance attribute: shadows the method until ``restore``

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def weights(self) -> torch.Tensor:
        m = self.mod
        return P.fake_quantize_soft(m.weight, m.w_scale, m.w_zero_point, m.w_qmin, m.w_qmax, m.w_axis, self.h())

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def restore(self) -> None:
        del self.mod.fq_weight

    def hard(self) -> torch.Tensor:
        return self.v.detach() >= 0  # h(V) >= 0.5


class _LSQ(nn.Module):
    """Fake quantization with a trainable step size (LSQ, Esser et al. 2020) on an activation quantizer's grid."""

    def __init__(self, aq: ActQuant) -> None:
        super().__init__()
        self.scale = nn.Parameter(aq.scale.detach().clone())
        self.zero_point, self.qmin, self.qmax = aq.zero_point, aq.qmin, aq.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.fake_quantize_lsq(x, self.scale.clamp_min(1e-8), self.zero_point, self.qmin, self.qmax)


class _LearnedScale:
    """Puts an LSQ quantizer in an activation quantizer's slot (``ActQuant.set_quantizer``) until ``restore``."""

    def __init__(self, aq: ActQuant) -> None:
        self.aq = aq
        self.original = aq.scale.detach().clone()
        self.lsq = _LSQ(aq)
        self.scale = self.lsq.scale
        aq.set_quantizer(self.lsq)

    def restore(self, keep: bool) -> None:
        self.aq.set_quantizer(None)
        self.aq.scale.copy_(self.scale.detach().clamp_min(1e-8) if keep else self.original)


def _fisher_weights(gm: fx.GraphModule, runner: _Runner, unit: Unit, x: torch.Tensor,
                    ref_logits: torch.Tensor, size: int = 128) -> torch.Tensor:
    """Squared gradient of KL(float || quantized predictions) w.r.t. the unit's output, per calibration image."""
    grads = []
    nodes = list(gm.graph.nodes)
    start = nodes.index(unit.output)
    for i in range(0, len(x), size):
        with torch.no_grad():
            (out,) = runner.prefix(x[i:i + size], [unit.output])
        out = out.detach().requires_grad_(True)
        env = dict(runner.env)
        env[unit.output] = out
        runner.env = env
        with torch.enable_grad():
            logits = None
            for n in nodes[start + 1:]:
                if n.op == "output":
                    logits = runner.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
                    break
                runner.env[n] = runner.run_node(n)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise EdgeslimError("--fisher needs a classifier (one N x classes output): drop --fisher")
            ref = ref_logits[i:i + size]
            loss = nn.functional.kl_div(torch.log_softmax(logits, 1), torch.softmax(ref, 1), reduction="batchmean")
            (g,) = torch.autograd.grad(loss, out)
        grads.append(g.detach().pow(2) * len(out))  # per-image gradient scale (batchmean divides by the batch)
    w = torch.cat(grads)
    return w / w.mean().clamp_min(1e-20)


def _train(runner: _Runner, unit: Unit, inputs: list[torch.Tensor], target: torch.Tensor,
           soft: list[_SoftWeights], scales: list[_LearnedScale], settings: Reconstruction,
           weight: torch.Tensor | None, gen: torch.Generator, bar: tqdm) -> None:
    opt = torch.optim.Adam([s.v for s in soft], lr=settings.lr) if soft else None
    opt_a = torch.optim.Adam([s.scale for s in scales], lr=settings.act_lr) if scales else None
    n = len(target)
    for it in range(settings.iters):
        idx = torch.randint(n, (min(settings.batch_size, n),), generator=gen)
        out = runner.unit(unit, [v[idx] for v in inputs])
        loss = _error(out, target[idx], None if weight is None else weight[idx])
        beta = beta_at(it, settings)
        if beta is not None and soft:
            loss = loss + settings.reg_weight * sum(s.regularizer(beta) for s in soft)
        for o in (opt, opt_a):
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        for o in (opt, opt_a):
            if o is not None:
                o.step()
        if (it + 1) % 50 == 0 or it + 1 == settings.iters:
            bar.update(50 if (it + 1) % 50 == 0 else (it + 1) % 50)
            bar.set_postfix_str(f"{unit.name} loss {float(loss.detach()):.4g}", refresh=False)


def reconstruct(gm: fx.GraphModule, calib: torch.Tensor, *, method: str, settings: Reconstruction = Reconstruction(),
                progress: bool = False) -> list[UnitReport]:
    """AdaRound (``method="adaround"``) or BRECQ (``"brecq"``) on a frozen fake-quant model, in place.

    ``calib`` holds the calibration images (N, C, H, W). Units are processed in graph order; each sees the
    quantized model's inputs with the earlier units already reconstructed.
    """
    if method not in ("adaround", "brecq"):
        raise EdgeslimError(f"invalid reconstruction method {method!r}: use adaround or brecq")
    if len(calib) == 0:
        raise EdgeslimError("calibration data is empty: pass a --calib-data folder with images")
    units = layer_units(gm) if method == "adaround" else block_units(gm)
    runner = _Runner(gm)
    gen = torch.Generator().manual_seed(settings.seed)
    frozen = [(p, p.requires_grad) for p in gm.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    ref_logits = None
    if settings.fisher:
        with ptq.mode(gm, "off"), torch.no_grad():
            ref_logits = torch.cat([gm(xb) for xb in _batches(calib, 256)])
    reports = []
    bar = tqdm(total=len(units) * settings.iters, desc=method, unit="it", disable=not progress, mininterval=0.5,
               leave=False)
    try:
        for unit in units:
            t0 = time.perf_counter()
            with ptq.mode(gm, "off"):
                (target,) = _collect(runner, calib, [unit.output])
            inputs = _collect(runner, calib, unit.inputs)
            weight = _fisher_weights(gm, runner, unit, calib, ref_logits) if settings.fisher else None
            before = _unit_error(runner, unit, inputs, target)
            mods = [ops.module(gm, n) for n in unit.nodes if _integer_weighted(gm, n)]
            learn = method == "brecq" and settings.learn_act
            aqs = [ops.module(gm, n) for n in unit.nodes if learn and _learnable(ops.module(gm, n))]
            soft = [_SoftWeights(m) for m in mods]
            scales = [_LearnedScale(a) for a in aqs]
            try:
                with torch.enable_grad():
                    _train(runner, unit, inputs, target, soft, scales, settings, weight, gen, bar)
            finally:
                for s in soft:
                    s.restore()
            for s in scales:
                s.restore(keep=True)
            for m, s in zip(mods, soft):
                m.set_rounding(s.hard())
            after = _unit_error(runner, unit, inputs, target)
            kept = after < before or not math.isfinite(before)
            if not kept:  # never worse than round-to-nearest on the calibration images
                for m in mods:
                    m.set_rounding(None)
                for s in scales:
                    s.aq.scale.copy_(s.original)
            reports.append(UnitReport(unit.name, unit.layers, before, after if kept else before, kept,
                                      len(scales) if kept else 0, time.perf_counter() - t0))
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        ptq.refresh_input_scales(gm)
    return reports


def _learnable(mod: nn.Module) -> bool:
    return (isinstance(mod, ActQuant) and not mod.spec.is_float and not mod.spec.pow2 and mod.mode == "quant"
            and mod.aq is None)
