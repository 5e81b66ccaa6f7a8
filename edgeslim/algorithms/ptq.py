"""Post-training quantization as separate steps: ``prepare`` -> ``calibrate`` -> ``freeze``.

``prepare`` captures the model, runs the graph passes (``graph.passes``), swaps weighted
modules for fake-quant ones and puts an ``ActQuant`` on every activation edge the integer graph needs.
The caller owns the calibration loop if they want (``calibrate`` is a plain no-grad loop).

Where quantizers go (the rule the lowering and the exporter rely on):
* the model input, and any float tensor entering conv / linear / add / cat / pooling, is quantized;
* the output of every conv, linear, add, cat and average pool gets its own quantizer (residual adds and
  concatenations *requantize* their inputs to a fresh output scale, as QLinearAdd / QLinearConcat do);
* with fusion on, a ReLU right after a conv or an add is absorbed: the quantizer goes after the ReLU
  and its scale replaces the producer's (Lee et al., ETRI). With fusion off, both get a quantizer;
* any other elementwise activation (SiLU, sigmoid, leaky ReLU, ...) is a table on codes: its input and its
  output each get a quantizer (the conv before a SiLU keeps its own output quantizer);
* max pooling, slicing, zero padding, flatten, reshape / transpose, splits and nearest upsampling keep their
  input's scale and need none;
* a final fully connected layer whose output is the model output keeps a float output: its int32
  accumulator is dequantized (QGemm with float output), so logits are not rounded to 8 bits.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn
from tqdm import tqdm

from ..config import MixedPlan, PTQConfig
from ..errors import EdgeslimError
from ..graph import ops
from ..graph.capture import annotate_shapes, capture
from ..graph.passes import fold_bn, fuse_conv_act, fuse_gated_activations
from ..quant.modules import MODES, ActQuant, ConvAct, GatedSiLU, QuantConv2d, QuantLinear, QuantSpec
from ..quant.observers import all_finite
from ..quant.precision import Precision, highest
from .cle import equalize

__all__ = ["WEIGHTED", "REQUANTIZING", "prepare", "op_name", "weighted_nodes", "layer_names", "plan_names",
           "weight_spec", "act_spec", "assign_precisions", "apply_plan", "act_quants", "calibrate", "freeze",
           "refresh_input_scales", "input_quant", "set_mode", "mode"]


WEIGHTED: dict[type, Callable] = {
    nn.Conv2d: QuantConv2d.from_float,
    ConvAct: QuantConv2d.from_float,
    nn.Linear: QuantLinear.from_float,
}
REQUANTIZING = ("conv", "linear", "add", "mul", "cat", "avgpool", "lut")


def prepare(model: nn.Module, input_shape: tuple[int, ...], config: PTQConfig,
            plan: MixedPlan | None = None) -> fx.GraphModule:
    """FP32 model -> fake-quant GraphModule with observers in ``observe`` mode.

    ``plan`` gives per-layer precisions (mixed precision); without it every layer uses ``config``'s bits.
    """
    gm = capture(copy.deepcopy(model).eval(), input_shape)
    passes = [fuse_gated_activations, fold_bn, fuse_conv_act] if config.fuse else [fuse_gated_activations, fold_bn]
    if "cle" in config.algorithms:
        passes.append(equalize)
    for graph_pass in passes:
        gm = graph_pass(gm)
    annotate_shapes(gm, input_shape)
    _swap_weighted(gm, config)
    _gate_silu(gm, config)
    _insert_act_quants(gm, config)  # copies shapes onto the new nodes: no run that would feed the observers
    if plan is not None:
        plan.check_patterns(plan_names(gm))
        assign_precisions(gm, config, plan)
    return gm


# ----------------------------------------------------------------------------- mixed precision

def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The name plans use for ``node``: the module path for modules (``layer1.0.conv1``), else the
    enclosing module's path and the node name (``layer1.0.add``)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()), None) if stack else None
    if isinstance(scope, tuple):  # (qualified name, type) in torch's fx tracer
        scope = scope[0]
    return f"{scope}.{node.name}" if scope else node.name


def weighted_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(ops.module(gm, n), (QuantConv2d, QuantLinear))]


def layer_names(gm: fx.GraphModule) -> list[str]:
    """Weighted layers (conv / linear) in graph order: what sensitivity sweeps and searches choose among."""
    return [op_name(gm, n) for n in weighted_nodes(gm)]


def _consumers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The compute nodes that read ``node``'s tensor (looking through scale-preserving data movement)."""
    found = []
    for user in node.users:
        k = ops.kind(gm, user)
        if k == "pass":
            found += _consumers(gm, user)
        elif k not in ("output", "quant", "meta"):
            found.append(user)
    return found


def _producers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The compute node whose output ``node`` quantizes (looking back through data movement)."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node) and ops.kind(gm, src) == "pass" and ops.tensor_args(src):
        src = ops.tensor_args(src)[0]
    return [src] if isinstance(src, fx.Node) and ops.kind(gm, src) not in ("placeholder", "quant", "meta") else []


def plan_names(gm: fx.GraphModule) -> list[str]:
    """Every name a plan rule can match: weighted layers and the other ops that read a quantized tensor."""
    names = layer_names(gm)
    for node in gm.graph.nodes:
        if ops.kind(gm, node) == "quant":
            names += [op_name(gm, c) for c in _consumers(gm, node)]
    return list(dict.fromkeys(names))


def weight_spec(config: PTQConfig, p: Precision, *, depthwise: bool = False) -> QuantSpec:
    if p.is_float:
        return QuantSpec(bits=p.bits, fmt=p.kind)
    return QuantSpec(bits=config.weight_bits(p.bits, depthwise=depthwise), symmetric=config.w_symmetric,
                     per_channel=config.granularity == "channel", pow2=config.pow2)


def act_spec(config: PTQConfig, p: Precision) -> QuantSpec:
    if p.is_float:
        return QuantSpec(bits=p.bits, fmt=p.kind)
    return QuantSpec(bits=p.bits, symmetric=config.symmetric, pow2=config.pow2)


def assign_precisions(gm: fx.GraphModule, config: PTQConfig, plan: MixedPlan | None) -> None:
    """Set every weighted layer's weight spec and every activation quantizer's spec from ``plan``.

    A quantizer takes the highest precision asked for by the layers that read it (Jang et al. keeps a
    layer in FP32 by running it on FP32 inputs; its output is quantized again for the next layer).
    """
    plan, default = plan or MixedPlan(), config.default_precision
    for node in weighted_nodes(gm):
        mod = ops.module(gm, node)
        spec = weight_spec(config, plan.precision_of(op_name(gm, node), default).w, depthwise=ops.is_depthwise(mod))
        if mod.spec != spec:
            mod.set_weight_spec(spec, use_mse=config.calibrator == "mse")
    for node in gm.graph.nodes:
        if ops.kind(gm, node) != "quant":
            continue
        asked = [plan.precision_of(op_name(gm, c), default).a for c in _consumers(gm, node)]
        if not asked:  # a model output: it keeps the precision of the op that produced it (an FP32 head stays FP32)
            asked = [plan.precision_of(op_name(gm, p), default).a for p in _producers(gm, node)]
        ops.module(gm, node).spec = act_spec(config, highest(asked) or default.a)
    for node in gm.graph.nodes:  # a SiLU's gate follows its output quantizer (an FP32 SiLU has a float gate)
        mod = ops.module(gm, node)
        if isinstance(mod, GatedSiLU):
            outs = [ops.module(gm, u) for u in node.users if isinstance(ops.module(gm, u), ActQuant)]
            mod.gate.spec = outs[0].spec if outs else act_spec(config, default.a)


def apply_plan(gm: fx.GraphModule, config: PTQConfig, plan: MixedPlan | None) -> fx.GraphModule:
    """Re-freeze a calibrated model under another plan, reusing the calibration statistics (no data pass).

    Observers keep the FP32 activation statistics they collected, so a sensitivity sweep or a search
    calibrates once and evaluates many plans.
    """
    assign_precisions(gm, config, plan)
    return freeze(gm, config)


def _swap_weighted(gm: fx.GraphModule, config: PTQConfig) -> None:
    for node in gm.graph.nodes:
        mod = ops.module(gm, node)
        make = WEIGHTED.get(type(mod))
        if make is not None:
            spec = weight_spec(config, config.default_precision.w, depthwise=ops.is_depthwise(mod))
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name,
                    make(mod, spec, use_mse=config.calibrator == "mse"))


def _gate_silu(gm: fx.GraphModule, config: PTQConfig) -> None:
    """Every SiLU becomes ``GatedSiLU`` (its sigmoid gate quantized on its own, as integer runtimes run it).

    An ``nn.SiLU`` module called once is swapped in place, so plans and layer groups name it by the model's own
    path (``model.2.cv1.act``, inside ``model.2.*``); a functional or shared SiLU gets a module of its own,
    ``silu_<node>``."""
    spec = act_spec(config, config.default_precision.a)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in list(gm.graph.nodes):
        if ops.kind(gm, node) != "lut" or ops.lut_name(gm, node)[0] != "silu" or isinstance(ops.module(gm, node), GatedSiLU):
            continue
        if node.op == "call_module" and calls[str(node.target)] == 1:
            parent, _, attr = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, GatedSiLU(spec, config.calibrator))
            continue
        name = f"silu_{node.name}"
        gm.add_submodule(name, GatedSiLU(spec, config.calibrator))
        with gm.graph.inserting_after(node):
            gated = gm.graph.call_module(name, (ops.tensor_args(node)[0],))
        gated.meta.update(node.meta)
        node.replace_all_uses_with(gated)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _insert_act_quants(gm: fx.GraphModule, config: PTQConfig) -> None:
    spec = act_spec(config, config.default_precision.a)
    graph, quantized, counter = gm.graph, set(), [0]

    def add_quant_after(node: fx.Node, users: Iterable[fx.Node] | None = None) -> fx.Node:
        name = f"aq_{counter[0]}_{node.name}"
        counter[0] += 1
        gm.add_submodule(name, ActQuant(spec, config.calibrator))
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        q.meta.update(shape=node.meta.get("shape"), is_tensor=True)
        targets = list(node.users) if users is None else list(users)
        for user in targets:
            if user is not q:
                user.replace_input_with(node, q)
        quantized.add(q)
        return q

    for node in list(graph.nodes):
        k = ops.kind(gm, node)
        if k == "placeholder":
            quantized.add(add_quant_after(node))
        elif k in REQUANTIZING:
            for arg in ops.tensor_args(node):
                if arg not in quantized:
                    add_quant_after(arg, [node])
            user = next(iter(node.users)) if len(node.users) == 1 else None
            fusable = config.fuse and k == "add" and user is not None and ops.kind(gm, user) == "act"
            float_logits = k == "linear" and user is not None and user.op == "output"
            if not (fusable or float_logits):
                add_quant_after(node)
        elif k == "act":
            src = node.args[0]
            if src in quantized or ops.kind(gm, src) == "add":
                add_quant_after(node)
        elif k == "pass" and ops.tensor_args(node) and ops.tensor_args(node)[0] in quantized:
            quantized.add(node)
    graph.lint()
    gm.recompile()


def act_quants(gm: fx.GraphModule) -> list[ActQuant]:
    return [m for m in gm.modules() if isinstance(m, ActQuant)]


def calibrate(gm: fx.GraphModule, batches: Callable[[], Iterable[torch.Tensor]], *,
              progress: bool = False, total: int | None = None) -> fx.GraphModule:
    """Run the calibration images through ``gm``: a min/max pass, then a histogram pass if needed.

    ``batches`` is called once per pass and yields float NCHW tensors; ``progress`` shows a bar per pass, with
    ``total`` batches (else the iterable's length hint; a later pass knows the count of the first) so it has an ETA.
    Ranges are observed on the float network (weights unquantized), as onnxruntime and TensorRT calibrate.
    """
    quants = act_quants(gm)
    passes = ["observe"] + (["histogram"] if any(q.observer.needs_histogram for q in quants) else [])
    weighted = [m for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    enabled = [m.quant_enabled for m in weighted]
    for m in weighted:  # ranges of the FP32 network, as onnxruntime and TensorRT calibrate (measured: observing
        m.quant_enabled = False  # with fake-quant weights cost yolov5n 2.5 dB of output SQNR)
    try:
        _calibration_passes(gm, quants, passes, batches, progress, total)
    finally:
        for m, on in zip(weighted, enabled):
            m.quant_enabled = on
    return gm


def _calibration_passes(gm, quants, passes, batches, progress, total: int | None = None) -> None:
    for mode in passes:
        for q in quants:
            q.mode = mode
        seen = count = 0
        it = batches()
        total = total or operator.length_hint(it, 0) or None
        with torch.no_grad():
            for x in tqdm(it, total=total, desc=f"calibrating ({mode})", unit="batch", disable=not progress,
                          mininterval=0.5, leave=False):
                count += 1
                if not all_finite(x):
                    raise EdgeslimError("NaN/inf in the calibration images: check the data and its normalization")
                gm(x)
                seen += len(x)
        if seen == 0:
            raise EdgeslimError("calibration data is empty: pass a --calib-data folder with images")
        total = count  # the next pass has as many batches


def freeze(gm: fx.GraphModule, config: PTQConfig) -> fx.GraphModule:
    """Turn observed ranges into scales / zero points; set each weighted layer's input scale (int32 bias)."""
    quants = act_quants(gm)
    ranges = [q.real_range() if not q.spec.is_float else (torch.tensor(0.0), torch.tensor(0.0)) for q in quants]
    if config.scale == "global":
        amax = max(max(abs(float(lo)), abs(float(hi))) for (lo, hi), q in zip(ranges, quants) if not q.spec.is_float)
        ranges = [(torch.tensor(-amax), torch.tensor(amax))] * len(quants)
    for q, (lo, hi) in zip(quants, ranges):
        q.freeze(lo, hi, force_signed=config.scale == "global")
    refresh_input_scales(gm)
    return gm


def refresh_input_scales(gm: fx.GraphModule) -> None:
    """Copy each weighted layer's input scale from its input quantizer (the int32 bias scale is
    input scale x weight scale); called by ``freeze`` and after activation scales are learned (BRECQ)."""
    for node in gm.graph.nodes:
        mod = ops.module(gm, node)
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            src = input_quant(gm, node)  # float input (mixed precision): float bias, no int32 codes
            mod.input_scale.fill_(0.0) if src.spec.is_float else mod.input_scale.copy_(src.scale)


def input_quant(gm: fx.GraphModule, node: fx.Node) -> ActQuant:
    """The ActQuant that fixes the scale of ``node``'s first tensor input (walking back through pass-throughs)."""
    src = ops.tensor_args(node)[0]
    while ops.kind(gm, src) == "pass":
        src = ops.tensor_args(src)[0]
    mod = ops.module(gm, src)
    if not isinstance(mod, ActQuant):
        raise EdgeslimError(f"internal: no quantizer found before {node.name}")
    return mod


def set_mode(gm: fx.GraphModule, mode: str) -> None:
    """Switch every quantizer of ``gm`` for good: ``quant`` simulates the integer model, ``off`` runs the
    (BN-folded) float model, ``observe`` / ``histogram`` collect activation statistics (``MODES``; weights are
    float in ``off`` only). For a switch that ends, use ``mode``."""
    if mode not in MODES:
        raise EdgeslimError(f"unknown quantization mode {mode!r}: use one of {', '.join(MODES)}")
    for q in act_quants(gm):
        q.mode = mode
    for m in gm.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.quant_enabled = mode != "off"


@contextmanager
def mode(gm: fx.GraphModule, name: str) -> Iterator[fx.GraphModule]:
    """``with mode(gm, "off"): ...`` runs the block with every quantizer in mode ``name`` (as ``set_mode``) and
    puts back each quantizer's previous mode on exit, also when the block raises."""
    quants = act_quants(gm)
    weighted = [m for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    before = [q.mode for q in quants], [m.quant_enabled for m in weighted]
    set_mode(gm, name)
    try:
        yield gm
    finally:
        for q, was in zip(quants, before[0]):
            q.mode = was
        for m, was in zip(weighted, before[1]):
            m.quant_enabled = was
