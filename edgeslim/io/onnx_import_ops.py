"""Handlers of the ONNX compute ops and ``OPS``, the importer's one op-name -> handler table.

Conv / ConvTranspose, Gemm and MatMul with a constant matrix, BatchNormalization, activations, pooling and
softmax become ``nn`` modules named after their ONNX node (so BN folding and module swaps see them);
element-wise arithmetic and reductions are torch calls. A handler takes ``(importer, node, inputs, attrs)`` and
returns the node's output values in order; constant inputs fold through the same code (``Importer.call`` and
``module`` fold when every input is a constant). The shape / data-movement handlers are in ``onnx_import_fold``,
the driver in ``onnx_import``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .onnx_import_fold import (
    Val, norm_axis, fold_cast, fold_concat, fold_constant, fold_constant_of_shape, fold_expand, fold_flatten, fold_gather, fold_identity, fold_pad, fold_range,
    fold_depth_to_space, fold_reshape, fold_resize, fold_space_to_depth, fold_shape, fold_size, fold_slice, fold_split, fold_squeeze, torch_pads, fold_transpose, fold_unsqueeze, fold_where,
)

__all__ = ["OPS"]


if TYPE_CHECKING:
    from .onnx_import import Importer


def _padded(im: Importer, x: Val, begins: list[int], ends: list[int], value: float = 0.0) -> Val:
    return im.call(F.pad, x, torch_pads([0, 0, *begins], [0, 0, *ends]), mode="constant", value=value)


def _window_pads(im: Importer, x: Val, at: dict, k: list[int], s: list[int], d: list[int]):
    """Begin / end pads of a conv or pool window, resolving ``auto_pad`` from the (static) input size."""
    n = len(k)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(at.get("pads", [0] * 2 * n))
        return pads[:n], pads[n:]
    if auto == "VALID":
        return [0] * n, [0] * n
    size = im.shape(x)[2:]
    begins, ends = [], []
    for i in range(n):
        total = max((-(-size[i] // s[i]) - 1) * s[i] + (k[i] - 1) * d[i] + 1 - size[i], 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins, ends


def _load(mod: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    ref = next(t for t in tensors.values() if t is not None)
    if ref.is_floating_point():
        mod.to(ref.dtype)
    for name, t in tensors.items():
        if t is not None:
            getattr(mod, name).copy_(t.reshape(getattr(mod, name).shape))
    return mod


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _conv(im, node, ins, at):
    x, w, b = (ins + [None, None])[:3]
    wt = im.weight(w, "weight")
    bt = im.weight(b, "bias") if b is not None else None
    n, k = wt.dim() - 2, list(wt.shape[2:])
    if n not in _CONV:
        raise im.error(f"has {n} spatial dimensions: only 1 to 3 are supported")
    s, d, group = list(at.get("strides", [1] * n)), list(at.get("dilations", [1] * n)), int(at.get("group", 1))
    begins, ends = _window_pads(im, x, at, k, s, d)
    if begins != ends:  # torch convs pad symmetrically: pad first
        x, begins = _padded(im, x, begins, ends), [0] * n
    mod = _CONV[n](wt.shape[1] * group, wt.shape[0], k, stride=s, padding=begins, dilation=d, groups=group,
                   bias=bt is not None)
    y = im.module(_load(mod, weight=wt, bias=bt), x)
    if bt is None:
        im.bias_free[node.output[0]] = mod
    return [y]


def _conv_transpose(im, node, ins, at):
    x, w, b = (ins + [None, None])[:3]
    wt = im.weight(w, "weight")
    bt = im.weight(b, "bias") if b is not None else None
    n, k = wt.dim() - 2, list(wt.shape[2:])
    if n not in _CONV_T:
        raise im.error(f"has {n} spatial dimensions: only 1 to 3 are supported")
    s, d, group = list(at.get("strides", [1] * n)), list(at.get("dilations", [1] * n)), int(at.get("group", 1))
    op = list(at.get("output_padding", [0] * n))
    size, auto = im.shape(x)[2:], at.get("auto_pad", "NOTSET")
    if "output_shape" in at or auto in ("SAME_UPPER", "SAME_LOWER"):  # ONNX ConvTranspose: total padding
        target = list(at["output_shape"])[-n:] if "output_shape" in at else [size[i] * s[i] for i in range(n)]
        total = [s[i] * (size[i] - 1) + op[i] + (k[i] - 1) * d[i] + 1 - target[i] for i in range(n)]
        for i in range(n):  # an output_shape beyond the full output: no padding, the rest is output padding
            if total[i] < 0:
                op[i], total[i] = op[i] - total[i], 0
                if op[i] >= max(s[i], d[i]):
                    raise im.error(f"has output_shape {target} that needs output padding {op[i]} on spatial axis "
                                   f"{i}, beyond torch's limit (less than the stride or dilation)")
        upper = auto == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in total]
        ends = [t - t // 2 if upper else t // 2 for t in total]
    elif auto == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = list(at.get("pads", [0] * 2 * n))
        begins, ends = pads[:n], pads[n:]
    sym = begins == ends
    mod = _CONV_T[n](wt.shape[0], wt.shape[1] * group, k, stride=s, padding=begins if sym else 0,
                     output_padding=op, groups=group, bias=bt is not None, dilation=d)
    y = im.module(_load(mod, weight=wt, bias=bt), x)
    if not sym:  # asymmetric: no padding, then crop
        full = im.shape(y)[2:]
        y = im.call(operator.getitem, y, (slice(None), slice(None),
                                          *(slice(begins[i], full[i] - ends[i]) for i in range(n))))
    return [y]


def _linear(im, node, x: Val, weight: torch.Tensor, bias: torch.Tensor | None) -> Val:
    mod = _load(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight=weight, bias=bias)
    if bias is None and (node.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]):
        im.bias_free[node.output[0]] = mod  # the node's output is this Linear's: a following Add may be its bias
    return im.module(mod, x)


def _gemm(im, node, ins, at):
    a, b, c = (ins + [None])[:3]
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    if at.get("transA", 0):
        a = im.call(torch.transpose, a, 0, 1)
    if b.const and not a.const:  # Y = A W^T + bias: nn.Linear
        w = im.weight(b, "weight")
        w = (w if at.get("transB", 0) else w.t()) * alpha
        bias = None
        if c is not None and c.const:
            ct = im.same(c)
            if ct.dim() <= 1 or (ct.dim() == 2 and ct.shape[0] == 1):
                bias = (ct.reshape(-1) * beta).expand(w.shape[0]).clone()
        y = _linear(im, node, a, w, bias)
        if c is not None and bias is None:
            y = im.call(torch.add, y, im.call(torch.mul, c, beta) if beta != 1 else c)
        return [y]
    y = im.call(torch.matmul, a, im.call(torch.transpose, b, 0, 1) if at.get("transB", 0) else b)
    if alpha != 1:
        y = im.call(torch.mul, y, alpha)
    if c is not None:
        y = im.call(torch.add, y, im.call(torch.mul, c, beta) if beta != 1 else c)
    return [y]


def _matmul(im, node, ins, at):
    a, b = ins
    if b.const and not a.const and b.ex[0].dim() == 2:
        return [_linear(im, node, a, im.weight(b, "weight").t(), None)]
    return [im.call(torch.matmul, a, b)]


def _batch_norm(im, node, ins, at):
    x, scale, bias, mean, var = ins[:5]
    if at.get("training_mode", 0):
        raise im.error("is in training mode: export the model in eval mode")
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(im.rank(x))
    if cls is None:
        raise im.error(f"has a rank-{im.rank(x)} input: only ranks 2 to 5 are supported")
    w = im.weight(scale, "scale")
    mod = cls(w.numel(), eps=float(at.get("epsilon", 1e-5)))
    _load(mod, weight=w, bias=im.weight(bias, "bias"), running_mean=im.weight(mean, "mean"),
          running_var=im.weight(var, "variance"))
    return [im.module(mod, x)]


def _channel_vector(c: torch.Tensor, n: int, rank: int, axis: int) -> torch.Tensor | None:
    """``c`` as a length-``n`` vector when broadcasting it against a rank-``rank`` tensor is along ``axis`` only."""
    shape = [1] * (rank - c.dim()) + list(c.shape)
    axis = norm_axis(axis, rank)
    if len(shape) != rank or shape[axis] != n or any(s != 1 for i, s in enumerate(shape) if i != axis):
        return None
    return c.reshape(n).clone()


def _as_bias(c: torch.Tensor, mod: nn.Module, rank: int) -> torch.Tensor | None:
    """``c`` as the bias of ``mod`` (a bias-less Linear or conv) when adding it is exactly adding a bias."""
    if isinstance(mod, nn.Linear):
        return _channel_vector(c, mod.out_features, rank, -1)
    return _channel_vector(c, mod.out_channels, rank, 1) if rank > 1 else None


def _binary(fn: Callable, *, commutative: bool = False) -> Callable:
    def handler(im, node, ins, at):
        a, b = ins
        names = list(node.input)
        if commutative and a.const and not b.const:
            a, b, names = b, a, names[::-1]
        kwargs = {}
        if fn is torch.div and not a.ex[0].is_floating_point():
            kwargs["rounding_mode"] = "trunc"  # ONNX integer Div truncates
        if fn is torch.add and b.const and names[0] in im.bias_free and im.uses[names[0]] == 1 \
                and names[0] not in im.outputs:  # MatMul / Conv without bias, then Add(bias): fold it in
            mod = im.bias_free.pop(names[0])
            bias = _as_bias(im.same(b), mod, im.rank(a))
            if bias is not None:
                exs = im._examples(torch.add, (a, b), {})
                mod.bias = nn.Parameter(bias.to(mod.weight.dtype))
                return [Val(a.node, exs)]
        if b.const and not a.const and b.ex[0].numel() == 1 and b.ex[0].dim() <= im.rank(a):
            b = im.same(b).reshape(()).item()  # x + 0.5 rather than a buffer
        return [im.call(fn, a, b, **kwargs)]
    return handler


def _variadic(fn: Callable) -> Callable:
    def handler(im, node, ins, at):
        y = ins[0]
        for v in ins[1:]:
            y = im.call(fn, y, v)
        return [y]
    return handler


def _unary(fn: Callable) -> Callable:
    return lambda im, node, ins, at: [im.call(fn, ins[0])]


def _act(factory: Callable[[dict], nn.Module]) -> Callable:
    return lambda im, node, ins, at: [im.module(factory(at), ins[0])]


def _hard_sigmoid(im, node, ins, at):
    alpha, beta = float(at.get("alpha", 0.2)), float(at.get("beta", 0.5))
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5):
        return [im.module(nn.Hardsigmoid(), ins[0])]
    y = im.call(torch.add, im.call(torch.mul, ins[0], alpha), beta)
    return [im.call(torch.clamp, y, 0.0, 1.0)]


def _prelu(im, node, ins, at):
    """PRelu: ``nn.PReLU`` for one slope or one per channel; any other broadcast slope as ``where(x < 0, ...)``."""
    x, slope = ins
    s = im.weight(slope, "slope")
    if s.numel() > 1 and (im.rank(x) < 2 or _channel_vector(s, s.numel(), im.rank(x), 1) is None):
        return [im.call(torch.where, im.call(torch.lt, x, 0), im.call(torch.mul, x, slope), x)]
    return [im.module(_load(nn.PReLU(s.numel()), weight=s.reshape(-1)), x)]


def _lrn(im, node, ins, at):
    """LRN: ``nn.LocalResponseNorm``. ONNX centres an even window one channel later than torch does, so an even
    ``size`` runs on the channels reversed (which mirrors the window) and reverses them back."""
    x, size = ins[0], int(at["size"])
    if im.rank(x) < 3:
        raise im.error(f"has a rank-{im.rank(x)} input: LRN needs N x C x spatial")
    mod = nn.LocalResponseNorm(size, float(at.get("alpha", 1e-4)), float(at.get("beta", 0.75)),
                               float(at.get("bias", 1.0)))
    if size % 2:
        return [im.module(mod, x)]
    y = im.module(mod, im.call(torch.flip, x, [1]))
    return [im.call(torch.flip, y, [1])]


def _dropout(im, node, ins, at):
    """Dropout at inference is the identity (the mask output all true). ``training_mode=1`` is refused unless
    ``ratio`` is 0, where training computes the identity too."""
    x = ins[0]
    training = ins[2] if len(ins) > 2 else None
    if training is not None:
        if not training.const:
            raise im.error("has training_mode computed at run time: export the model in eval mode")
        if bool(im.same(training).reshape(-1)[0]):
            ratio = im.number(ins[1], "ratio") if len(ins) > 1 else None
            if (0.5 if ratio is None else ratio) != 0:
                raise im.error("is in training mode (training_mode=1, random outputs): export the model in eval mode")
    outs = [Val(x.node, x.ex)]
    if len(node.output) > 1 and node.output[1]:
        outs.append(im.call(torch.ones_like, x, dtype=torch.bool))
    return outs


def _clip(im, node, ins, at):
    x = ins[0]
    if im.opset < 11:
        lo, hi = at.get("min"), at.get("max")
        lo = None if lo is not None and lo <= -3.4e38 else lo
        hi = None if hi is not None and hi >= 3.4e38 else hi
    else:
        lo = im.number(ins[1], "min") if len(ins) > 1 else None
        hi = im.number(ins[2], "max") if len(ins) > 2 else None
    if lo == 0 and hi == 6:
        return [im.module(nn.ReLU6(), x)]
    if lo == 0 and hi is None:
        return [im.module(nn.ReLU(), x)]
    if lo is None and hi is None:
        return [Val(x.node, x.ex)]
    return [im.call(torch.clamp, x, min=lo, max=hi)]


def _softmax(cls: type) -> Callable:
    def handler(im, node, ins, at):
        x = ins[0]
        rank = im.rank(x)
        axis = norm_axis(int(at.get("axis", -1 if im.opset >= 13 else 1)), rank)
        if im.opset >= 13 or axis == rank - 1:
            return [im.module(cls(dim=axis), x)]
        if axis == 0:  # before opset 13: softmax over the input flattened to 2-D at ``axis``
            raise im.error("normalizes over axis 0 (opset < 13): re-export with axis >= 1")
        y = im.module(cls(dim=-1), im.call(torch.flatten, x, axis))
        return [im.call(torch.reshape, y, [-1, *im.shape(x)[1:]])]
    return handler


def _pool_padding(im, x, at, k, s, d, *, fill: float | None):
    """Window padding for a torch pool: symmetric and at most half the window, else padded first with
    ``fill`` (None: refuse)."""
    begins, ends = _window_pads(im, x, at, k, s, d)
    if begins == ends and all(p <= ((kk - 1) * dd + 1) // 2 for p, kk, dd in zip(begins, k, d)):
        return x, begins
    if fill is None:
        raise im.error("has asymmetric padding with count_include_pad=0: not supported")
    return _padded(im, x, begins, ends, fill), [0] * len(k)


def _max_pool(im, node, ins, at):
    if len(node.output) > 1 and node.output[1] and im.uses[node.output[1]]:
        raise im.error("has its Indices output used: not supported")
    x, k = ins[0], list(at["kernel_shape"])
    n = len(k)
    s, d = list(at.get("strides", [1] * n)), list(at.get("dilations", [1] * n))
    x, pad = _pool_padding(im, x, at, k, s, d, fill=-math.inf)
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[n]
    return [im.module(cls(tuple(k), tuple(s), tuple(pad), tuple(d), ceil_mode=bool(at.get("ceil_mode", 0))), x)]


def _avg_pool(im, node, ins, at):
    x, k = ins[0], list(at["kernel_shape"])
    n = len(k)
    s, d = list(at.get("strides", [1] * n)), list(at.get("dilations", [1] * n))
    if any(v != 1 for v in d):
        raise im.error("has dilations: not supported")
    include = bool(at.get("count_include_pad", 0))
    x, pad = _pool_padding(im, x, at, k, s, d, fill=0.0 if include else None)
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[n]
    mod = cls(tuple(k), tuple(s), tuple(pad), ceil_mode=bool(at.get("ceil_mode", 0)), count_include_pad=include)
    return [im.module(mod, x)]


def _global_pool(avg: bool) -> Callable:
    def handler(im, node, ins, at):
        n = im.rank(ins[0]) - 2
        avg_cls = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
        max_cls = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}
        return [im.module((avg_cls if avg else max_cls)[n](1), ins[0])]
    return handler


def _reduce(fn: Callable) -> Callable:
    def handler(im, node, ins, at):
        x = ins[0]
        rank = im.rank(x)
        axes = at.get("axes")
        if axes is None and len(ins) > 1:
            axes = im.ints(ins[1], "axes")
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return [Val(x.node, x.ex)]
            axes = list(range(rank))
        axes = sorted(norm_axis(a, rank) for a in axes)
        if fn is torch.mean and rank == 4 and axes == [2, 3] and keep:
            return [im.module(nn.AdaptiveAvgPool2d(1), x)]
        return [im.call(fn, x, axes, keepdim=keep)]
    return handler


OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _batch_norm, "LRN": _lrn,
    "Relu": _act(lambda at: nn.ReLU()), "Sigmoid": _act(lambda at: nn.Sigmoid()), "Tanh": _act(lambda at: nn.Tanh()),
    "HardSwish": _act(lambda at: nn.Hardswish()),
    "LeakyRelu": _act(lambda at: nn.LeakyReLU(float(at.get("alpha", 0.01)))),
    "Elu": _act(lambda at: nn.ELU(float(at.get("alpha", 1.0)))),
    "Gelu": _act(lambda at: nn.GELU(approximate=at.get("approximate", "none"))),
    "HardSigmoid": _hard_sigmoid, "PRelu": _prelu, "Clip": _clip,
    "Softmax": _softmax(nn.Softmax), "LogSoftmax": _softmax(nn.LogSoftmax),
    "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool(True), "GlobalMaxPool": _global_pool(False),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "Add": _binary(torch.add, commutative=True), "Mul": _binary(torch.mul, commutative=True),
    "Sub": _binary(torch.sub), "Div": _binary(torch.div), "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "Where": fold_where,
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Erf": _unary(torch.erf), "Not": _unary(torch.logical_not),
    "Reshape": fold_reshape, "Flatten": fold_flatten, "Transpose": fold_transpose, "Squeeze": fold_squeeze, "Unsqueeze": fold_unsqueeze,
    "Concat": fold_concat, "Split": fold_split, "Slice": fold_slice, "Gather": fold_gather, "Expand": fold_expand, "Pad": fold_pad,
    "DepthToSpace": fold_depth_to_space, "SpaceToDepth": fold_space_to_depth,
    "Resize": fold_resize, "Upsample": fold_resize, "Identity": fold_identity, "Dropout": _dropout,
    "Constant": fold_constant, "Shape": fold_shape, "Size": fold_size, "Cast": fold_cast, "ConstantOfShape": fold_constant_of_shape,
    "Range": fold_range,
}
