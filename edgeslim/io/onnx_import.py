"""ONNX (float) -> ``torch.fx.GraphModule``: bring a model exported elsewhere into edgeslim's pipeline.

    gm = import_onnx("model.onnx")            # or an onnx.ModelProto
    q = edgeslim.quantize(gm, calib)           # capture, fold_bn, module swaps work as on a traced model

The graph is written node by node into a ``torch.fx.Graph``. Weighted ops become real modules
(``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear`` for Gemm / MatMul with a constant matrix,
``nn.BatchNorm2d``), and so do activations, pooling and softmax, each named after its ONNX node, so the
passes that look for module types (BN folding, conv / linear swaps) see an imported model as they see a traced
one. Element-wise and data-movement ops are ``call_function`` nodes on torch functions; Slice, Split and
contiguous Gather become plain slicing (``x[:, a:b]``), which the lowering treats as scale-preserving.

Shapes are folded at import. Every ONNX value carries an example tensor (zeros of the declared input shapes),
so ``Shape -> Gather -> Concat -> Reshape`` chains, ``Constant`` nodes and arithmetic on constants evaluate to
constants. A symbolic batch dimension is evaluated at two batch sizes (1 and 2): the one Reshape entry that
differs between them becomes ``-1``, so the imported model keeps its dynamic batch. Where a
batch-dependent shape reaches a tensor op in any other way, the model is imported for batch 1
(``gm.meta["onnx_dynamic_batch"]`` is then False). Other dynamic dimensions are refused.

Semantics follow the ONNX operator specification (https://onnx.ai/onnx/operators/), including the opset
differences between 7 and 21 (Clip / Pad / Slice / Split / Squeeze / Unsqueeze / Reduce* arguments that moved
from attributes to inputs, Softmax's 2-D coercion before opset 13, Resize's coordinate modes).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn

from ..errors import EdgeslimError


@dataclass(eq=False)
class _Val:
    """One ONNX value: an fx node, or a folded constant (``node is None``); one example per batch variant."""

    node: fx.Node | None
    ex: tuple

    @property
    def const(self) -> bool:
        return self.node is None


_RESERVED = {"meta", "training", "graph", "code", "forward"}  # GraphModule attributes a submodule must not shadow


class _BatchDependent(Exception):
    """A shape that depends on the batch size reached a tensor op: import again for batch 1."""


def import_onnx(path_or_model: str | Path | onnx.ModelProto) -> fx.GraphModule:
    """Read a float ONNX model into a ``torch.fx.GraphModule`` that computes the same function.

    ``forward`` takes the ONNX graph inputs positionally (initializers excluded) and returns one tensor, or a
    tuple in ONNX output order. ``gm.meta`` holds ``onnx_input_shape`` (the first input without its batch
    dimension), ``onnx_path`` and ``onnx_dynamic_batch``. Unsupported ops are all named in one
    ``EdgeslimError``.

    >>> gm = import_onnx("resnet20.onnx")  # doctest: +SKIP
    >>> gm(torch.zeros(2, 3, 32, 32)).shape  # doctest: +SKIP
    torch.Size([2, 10])
    """
    model, label = _read(path_or_model)
    unsupported = Counter(_op_key(n) for n in model.graph.node if _op_key(n) not in OPS)
    if unsupported:
        count = sum(unsupported.values())
        raise EdgeslimError(
            f"{label}: unsupported ONNX op(s) {', '.join(sorted(unsupported))} ({count} node{'s' * (count > 1)}); "
            f"supported: {', '.join(sorted(OPS))}; export the model without them or open an issue")
    try:
        gm = _Importer(model, label, dynamic_batch=True).run()
    except _BatchDependent:
        gm = _Importer(model, label, dynamic_batch=False).run()
    gm.meta["onnx_path"] = None if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return gm


def _read(path_or_model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, "ONNX model"
    path = Path(path_or_model)
    if not path.exists():
        raise EdgeslimError(f"ONNX file '{path}' does not exist: check the path")
    if not path.is_file():
        raise EdgeslimError(f"ONNX file '{path}' is not a file: pass the path of a .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise EdgeslimError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {_one_line(exc)}): pass a "
                            "file written by torch.onnx.export or onnx.save") from None
    return model, str(path)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__


def _sanitize(text: str, prefix: str = "n") -> str:
    """A Python identifier from an ONNX name (``/layer1/conv/Conv`` -> ``layer1_conv_Conv``)."""
    name = re.sub(r"\W+", "_", text).strip("_")
    return f"{prefix}_{name}" if name and name[0].isdigit() else name


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def _torch_dtype(onnx_type: int) -> torch.dtype:
    return _tensor(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _subst(obj, k: int):
    """``obj`` with every ``_Val`` replaced by its example for batch variant ``k``."""
    if isinstance(obj, _Val):
        return obj.ex[k]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_subst(o, k) for o in obj)
    if isinstance(obj, dict):
        return {key: _subst(v, k) for key, v in obj.items()}
    return obj


def _vals(obj) -> list[_Val]:
    if isinstance(obj, _Val):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [v for o in obj for v in _vals(o)]
    if isinstance(obj, dict):
        return [v for o in obj.values() for v in _vals(o)]
    return []


class _Importer:
    def __init__(self, model: onnx.ModelProto, label: str, *, dynamic_batch: bool) -> None:
        self.model, self.label = model, label
        gr = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph, self.root = fx.Graph(), nn.Module()
        self.attr_names: set[str] = set()
        self.const_nodes: dict[int, tuple[_Val, fx.Node]] = {}
        self.bias_free: dict[str, nn.Module] = {}  # ONNX value -> the bias-less conv / linear that produced it
        inits = {t.name: _tensor(numpy_helper.to_array(t)) for t in gr.initializer}
        inputs = [i for i in gr.input if i.name not in inits]
        if not inputs:
            raise EdgeslimError(f"{label}: the ONNX graph has no inputs: export the model with its input tensor")
        shapes = [self._input_dims(i) for i in inputs]
        self.nvar = 2 if dynamic_batch and any(d[0] is None for d in shapes) else 1
        self.dynamic_batch = self.nvar == 2
        self.vals: dict[str, _Val] = {name: _Val(None, (t,) * self.nvar) for name, t in inits.items()}
        for vi, dims in zip(inputs, shapes):
            node = self.graph.placeholder(self.unique(_sanitize(vi.name) or "x"))
            dtype = _torch_dtype(vi.type.tensor_type.elem_type)
            ex = tuple(torch.zeros([b if d is None else d for d in dims[:1]] + dims[1:], dtype=dtype)
                       for b in (1, 2)[:self.nvar])
            self.vals[vi.name] = _Val(node, ex)
        self.input_shape = tuple(d for d in shapes[0][1:])
        self.outputs = [o.name for o in gr.output]
        self.uses = Counter(i for n in gr.node for i in n.input if i)
        self.uses.update(self.outputs)
        self.node: onnx.NodeProto | None = None
        self.base = "x"

    def _input_dims(self, vi: onnx.ValueInfoProto) -> list[int | None]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise EdgeslimError(f"{self.label}: input '{vi.name}' has no declared shape: export it with a fixed "
                                "input size")
        dims: list[int | None] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(None)
            else:
                raise EdgeslimError(
                    f"{self.label}: input '{vi.name}' has a dynamic dimension {k} ('{d.dim_param or '?'}'): edgeslim "
                    "folds shapes at import, so re-export the model with a fixed input size (only the batch may vary)")
        return dims

    # ------------------------------------------------------------------ the walk
    def run(self) -> fx.GraphModule:
        with torch.no_grad():
            for index, node in enumerate(self.model.graph.node):
                self.node = node
                self.base = _sanitize(node.name, node.op_type.lower()) or f"{node.op_type.lower()}_{index}"
                ins = [self.value(name) if name else None for name in node.input]
                try:
                    outs = OPS[_op_key(node)](self, node, ins, _attrs(node))
                except (EdgeslimError, _BatchDependent):
                    raise
                except Exception as exc:  # an attribute combination or shape the handler did not foresee
                    raise self.error(f"cannot be imported ({type(exc).__name__}: {_one_line(exc)})") from None
                for name, val in zip(node.output, outs):
                    if name:
                        self.vals[name] = val
                self._release(node)
            results = [self.arg(self.value(name)) for name in self.outputs]
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxModel")
        gm.meta["onnx_input_shape"] = self.input_shape
        gm.meta["onnx_dynamic_batch"] = self.dynamic_batch
        return gm.eval()

    def value(self, name: str) -> _Val:
        if name not in self.vals:
            raise EdgeslimError(f"{self.label}: ONNX value '{name}' is used before it is computed (or is an output "
                                "edgeslim does not compute, such as MaxPool indices): check the graph order")
        return self.vals[name]

    def _release(self, node: onnx.NodeProto) -> None:
        """Drop examples nobody reads any more (a detector's activations would otherwise all stay alive)."""
        for name in node.input:
            if name:
                self.uses[name] -= 1
                if self.uses[name] == 0 and name in self.vals:
                    self.vals[name].ex = ()

    def error(self, why: str) -> EdgeslimError:
        name = self.node.name or (self.node.output[0] if self.node.output else "?")
        return EdgeslimError(f"{self.label}: ONNX node '{name}' ({self.node.op_type}) {why}")

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.attr_names or keyword.iskeyword(name) or name in _RESERVED or hasattr(fx.GraphModule, name):
            i += 1
            name = f"{base}_{i}"
        self.attr_names.add(name)
        return name

    # ------------------------------------------------------------------ emitting
    def _examples(self, fn: Callable, args, kwargs) -> tuple:
        first = fn(*_subst(args, 0), **_subst(kwargs, 0))
        rest = []
        for k in range(1, self.nvar):
            try:
                rest.append(fn(*_subst(args, k), **_subst(kwargs, k)))
            except Exception:  # works at batch 1 only (a shape baked into the graph)
                raise _BatchDependent from None
        return (first, *rest)

    def call(self, target: Callable | str, *args, **kwargs) -> _Val:
        """``target(*args, **kwargs)``: folded when every ``_Val`` argument is a constant, else an fx node.
        A string target is a tensor method called on the first argument."""
        fn = target if callable(target) else (lambda x, *a, **kw: getattr(x, target)(*a, **kw))
        exs = self._examples(fn, args, kwargs)
        if all(v.const for v in _vals((args, kwargs))):
            return _Val(None, exs)
        op = "call_function" if callable(target) else "call_method"
        fx_args = self._fx(args)
        node = self.graph.create_node(op, target, fx_args, self._fx(kwargs), name=self.base)
        return _Val(node, exs)

    def module(self, mod: nn.Module, *inputs: _Val) -> _Val:
        mod.eval()
        exs = self._examples(mod, inputs, {})
        if all(v.const for v in inputs):
            return _Val(None, exs)
        name = self.unique(self.base)
        self.root.add_module(name, mod)
        return _Val(self.graph.call_module(name, self._fx(inputs)), exs)

    def _fx(self, obj):
        if isinstance(obj, _Val):
            return self.arg(obj)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._fx(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._fx(v) for k, v in obj.items()}
        return obj

    def arg(self, v: _Val) -> fx.Node | object:
        """The fx argument for ``v``: its node, or a buffer (``get_attr``) holding the constant."""
        if not v.const:
            return v.node
        if id(v) in self.const_nodes:
            return self.const_nodes[id(v)][1]
        t = self.same(v)
        if not isinstance(t, torch.Tensor):
            return t
        name = self.unique(f"{self.base}_const")
        self.root.register_buffer(name, t.clone())
        node = self.graph.get_attr(name)
        self.const_nodes[id(v)] = (v, node)
        return node

    def same(self, v: _Val):
        """The example shared by every batch variant (a batch-dependent constant cannot be baked in)."""
        first = v.ex[0]
        for other in v.ex[1:]:
            if isinstance(first, torch.Tensor):
                if first.shape != other.shape or not torch.equal(first, other):
                    raise _BatchDependent
            elif first != other:
                raise _BatchDependent
        return first

    def weight(self, v: _Val, what: str) -> torch.Tensor:
        if not v.const:
            raise self.error(f"has a {what} computed at run time: only constant {what}s are supported")
        return self.same(v)

    def ints(self, v: _Val | None, what: str) -> list[int] | None:
        if v is None:
            return None
        if not v.const:
            raise self.error(f"has its {what} computed from tensor values at run time: edgeslim folds only shapes "
                             "and constants")
        return [int(i) for i in torch.as_tensor(self.same(v)).reshape(-1).tolist()]

    def number(self, v: _Val | None, what: str) -> float | None:
        if v is None or (v.const and torch.as_tensor(v.ex[0]).numel() == 0):
            return None
        if not v.const:
            raise self.error(f"has its {what} computed at run time: only constants are supported")
        return torch.as_tensor(self.same(v)).reshape(-1)[0].item()

    def rank(self, v: _Val) -> int:
        return v.ex[0].dim()

    def shape(self, v: _Val) -> list[int]:
        return list(v.ex[0].shape)


# ---------------------------------------------------------------------- handlers: (importer, node, inputs, attrs)
# Each returns the node's output values in order. Constant inputs fold through the same code (``call`` folds).

def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-axis begins / ends (first axis first) -> ``F.pad``'s pairs, last axis first, trailing zeros cut."""
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    while len(out) > 2 and out[-2:] == [0, 0]:
        out = out[:-2]
    return out


def _padded(im: _Importer, x: _Val, begins: list[int], ends: list[int], value: float = 0.0) -> _Val:
    return im.call(F.pad, x, _torch_pads([0, 0, *begins], [0, 0, *ends]), mode="constant", value=value)


def _window_pads(im: _Importer, x: _Val, at: dict, k: list[int], s: list[int], d: list[int]):
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


def _linear(im, node, x: _Val, weight: torch.Tensor, bias: torch.Tensor | None) -> _Val:
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
    axis = _axis(axis, rank)
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
                return [_Val(a.node, exs)]
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
    x, slope = ins
    s = im.weight(slope, "slope")
    if s.numel() > 1 and _channel_vector(s, s.numel(), im.rank(x), 1) is None:
        raise im.error(f"has a slope of shape {tuple(s.shape)}: only one slope or one per channel is supported")
    return [im.module(_load(nn.PReLU(s.numel()), weight=s.reshape(-1)), x)]


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
        return [_Val(x.node, x.ex)]
    return [im.call(torch.clamp, x, min=lo, max=hi)]


def _softmax(cls: type) -> Callable:
    def handler(im, node, ins, at):
        x = ins[0]
        rank = im.rank(x)
        axis = _axis(int(at.get("axis", -1 if im.opset >= 13 else 1)), rank)
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
                return [_Val(x.node, x.ex)]
            axes = list(range(rank))
        axes = sorted(_axis(a, rank) for a in axes)
        if fn is torch.mean and rank == 4 and axes == [2, 3] and keep:
            return [im.module(nn.AdaptiveAvgPool2d(1), x)]
        return [im.call(fn, x, axes, keepdim=keep)]
    return handler


def _resolve_shape(target: list[int], shape: list[int], allowzero: bool) -> list[int]:
    out = [shape[i] if t == 0 and not allowzero else t for i, t in enumerate(target)]
    if -1 in out:
        known = math.prod(t for t in out if t != -1)
        out[out.index(-1)] = math.prod(shape) // known if known else 0
    return out


def _reshape(im, node, ins, at):
    x, target = ins
    if not target.const:
        raise im.error("has its target shape computed from tensor values at run time: not supported")
    allowzero = bool(at.get("allowzero", 0))
    wanted = [_resolve_shape([int(t) for t in target.ex[k].tolist()], list(x.ex[k].shape), allowzero)
              for k in range(im.nvar)]
    if x.const:
        return [_Val(None, tuple(x.ex[k].reshape(wanted[k]) for k in range(im.nvar)))]
    if all(wanted[k] == list(x.ex[k].shape) for k in range(im.nvar)):
        return [_Val(x.node, x.ex)]
    if im.rank(x) > 2 and all(w == [e.shape[0], math.prod(e.shape[1:])] for w, e in zip(wanted, x.ex)):
        return [im.call(torch.flatten, x, 1)]  # N x K: what the lowering knows as Flatten
    varying = [i for i in range(len(wanted[0])) if any(w[i] != wanted[0][i] for w in wanted)]
    if len(varying) > 1:
        raise _BatchDependent
    final = [-1 if i in varying else t for i, t in enumerate(wanted[0])]  # the batch entry is left to torch
    return [im.call(torch.reshape, x, final)]


def _flatten(im, node, ins, at):
    x = ins[0]
    shape = im.shape(x)
    axis = _axis(int(at.get("axis", 1)), len(shape))
    if axis == 1:
        return [im.call(torch.flatten, x, 1)]
    if axis == 0:
        return [im.call(torch.reshape, x, [1, -1])]
    return [im.call(torch.reshape, x, [-1, math.prod(shape[axis:])])]


def _transpose(im, node, ins, at):
    perm = at.get("perm", list(range(im.rank(ins[0])))[::-1])
    return [im.call(torch.permute, ins[0], list(perm))]


def _axes_of(im, ins, at) -> list[int] | None:
    if "axes" in at:
        return list(at["axes"])
    return im.ints(ins[1], "axes") if len(ins) > 1 else None


def _squeeze(im, node, ins, at):
    x = ins[0]
    rank, axes = im.rank(x), _axes_of(im, ins, at)
    if axes is None:
        axes = [i for i in range(rank) if all(e.shape[i] == 1 for e in x.ex)]
    axes = sorted(_axis(a, rank) for a in axes)
    if not axes:
        return [_Val(x.node, x.ex)]
    return [im.call(torch.squeeze, x, axes[0] if len(axes) == 1 else tuple(axes))]


def _unsqueeze(im, node, ins, at):
    y = ins[0]
    axes = _axes_of(im, ins, at)
    out_rank = im.rank(y) + len(axes)
    for a in sorted(_axis(a, out_rank) for a in axes):
        y = im.call(torch.unsqueeze, y, a)
    return [y]


def _concat(im, node, ins, at):
    vals = [v for v in ins if v is not None and v.ex[0].numel() > 0] or [ins[0]]
    axis = _axis(int(at["axis"]), im.rank(vals[0]))
    if len(vals) == 1:
        return [_Val(vals[0].node, vals[0].ex)]
    return [im.call(torch.cat, vals, axis)]


def _take(im, x: _Val, axis: int, start: int, stop: int | None, step: int = 1) -> _Val:
    index = (*(slice(None),) * axis, slice(start or None, stop, step if step != 1 else None))
    return im.call(operator.getitem, x, index)


def _split(im, node, ins, at):
    x = ins[0]
    axis = _axis(int(at.get("axis", 0)), im.rank(x))
    sizes = at.get("split") or (im.ints(ins[1], "split") if len(ins) > 1 else None)
    dim = im.shape(x)[axis]
    if any(e.shape[axis] != dim for e in x.ex):
        raise im.error("splits the batch dimension: not supported with a dynamic batch")
    if not sizes:
        n = int(at.get("num_outputs", len(node.output)))
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    outs, start = [], 0
    for size in sizes:
        outs.append(_take(im, x, axis, start, start + size if start + size < dim else None))
        start += size
    return outs


def _slice(im, node, ins, at):
    x = ins[0]
    if im.opset < 10:
        starts, ends, axes, steps = at["starts"], at["ends"], at.get("axes"), None
    else:
        starts, ends = im.ints(ins[1], "starts"), im.ints(ins[2], "ends")
        axes = im.ints(ins[3], "axes") if len(ins) > 3 else None
        steps = im.ints(ins[4], "steps") if len(ins) > 4 else None
    rank = im.rank(x)
    axes = [_axis(a, rank) for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * (max(axes) + 1)
    if x.const:  # shape arithmetic (or reversing pads): numpy slicing has ONNX's semantics, negative steps too
        for a, b, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(b, e, st)
        return [_Val(None, tuple(_tensor(e.numpy()[tuple(index)]) for e in x.ex))]
    for a, b, e, st in zip(axes, starts, ends, steps):
        if st <= 0:
            raise im.error("has a negative step on a tensor computed at run time: not supported")
        dims = {ex.shape[a] for ex in x.ex}
        if len(dims) == 1:  # clamp as ONNX does, so the slice reads plainly
            d = dims.pop()
            b = min(max(b + d if b < 0 else b, 0), d)
            e = min(max(e + d if e < 0 else e, 0), d)
            index[a] = slice(b or None, e if e < d else None, st if st != 1 else None)
        else:
            index[a] = slice(b or None, e if e < 2**62 else None, st if st != 1 else None)
    if all(i == slice(None) for i in index):
        return [_Val(x.node, x.ex)]
    return [im.call(operator.getitem, x, tuple(index))]


def _gather(im, node, ins, at):
    data, indices = ins
    axis = _axis(int(at.get("axis", 0)), im.rank(data))
    if not indices.const:
        raise im.error("gathers with indices computed at run time: not supported")
    if data.const:  # shape arithmetic
        return [_Val(None, tuple(_tensor(np.take(d.numpy(), i.numpy(), axis=axis))
                                 for d, i in zip(data.ex, indices.ex)))]
    idx = im.same(indices)
    dims = {e.shape[axis] for e in data.ex}
    if len(dims) != 1:
        raise im.error("gathers along the batch dimension: not supported with a dynamic batch")
    flat = [i % dims.pop() for i in idx.reshape(-1).tolist()]
    if idx.dim() == 0:
        return [im.call(torch.select, data, axis, flat[0])]
    steps = {b - a for a, b in zip(flat, flat[1:])}
    if idx.dim() == 1 and (len(flat) == 1 or (len(steps) == 1 and steps.pop() > 0)):
        step = flat[1] - flat[0] if len(flat) > 1 else 1
        return [_take(im, data, axis, flat[0], flat[-1] + 1, step)]
    if idx.dim() == 1:
        return [im.call(torch.index_select, data, axis, _Val(None, (torch.tensor(flat),) * im.nvar))]
    raise im.error(f"gathers with {idx.dim()}-D indices: only scalar and 1-D indices are supported")


def _pad(im, node, ins, at):
    x = ins[0]
    rank = im.rank(x)
    if im.opset < 11:
        pads, value, axes = list(at["pads"]), float(at.get("value", 0.0)), None
    else:
        pads = im.ints(ins[1], "pads")
        value = im.number(ins[2], "constant value") if len(ins) > 2 else None
        axes = im.ints(ins[3], "axes") if len(ins) > 3 else None
    n = len(pads) // 2
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate([_axis(a, rank) for a in axes] if axes else range(n)):
        begins[a], ends[a] = pads[i], pads[n + i]
    torch_pads = _torch_pads(begins, ends)
    if not any(torch_pads):
        return [_Val(x.node, x.ex)]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        at.get("mode", "constant"))
    if mode is None:
        raise im.error(f"has mode '{at.get('mode')}': only constant, reflect, edge and wrap are supported")
    if mode == "constant":
        return [im.call(F.pad, x, torch_pads, mode="constant", value=float(value or 0.0))]
    if len(torch_pads) // 2 > rank - 2:
        raise im.error(f"pads the batch or channel dimension in mode '{at.get('mode')}': not supported")
    return [im.call(F.pad, x, torch_pads, mode=mode)]


def _onnx_nearest(size: int, out: int, scale: float, ctm: str, rounding: str) -> list[int] | None:
    """Source index of every output position along one axis (ONNX Resize, nearest), in float32 like onnxruntime."""
    x = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    if ctm == "asymmetric":
        o = x / s
    elif ctm == "half_pixel":
        o = (x + np.float32(0.5)) / s - np.float32(0.5)
    elif ctm == "pytorch_half_pixel":
        o = (x + np.float32(0.5)) / s - np.float32(0.5) if out > 1 else np.zeros_like(x)
    elif ctm == "align_corners":
        o = x * np.float32(size - 1) / np.float32(out - 1) if out > 1 else np.zeros_like(x)
    elif ctm == "tf_half_pixel_for_nn":
        o = (x + np.float32(0.5)) / s
    else:
        return None
    rounded = {"round_prefer_floor": lambda v: np.ceil(v - np.float32(0.5)),
               "round_prefer_ceil": lambda v: np.floor(v + np.float32(0.5)),
               "floor": np.floor, "ceil": np.ceil}[rounding](o)
    return np.clip(rounded, 0, size - 1).astype(np.int64).tolist()


def _torch_nearest(size: int, kw: dict, axis: int, mode: str) -> list[int]:
    """The same, measured on ``F.interpolate`` itself (no re-derivation of torch's rounding)."""
    key, val = next(iter(kw.items()))
    one = F.interpolate(torch.arange(size, dtype=torch.float32).reshape(1, 1, size), mode=mode,
                        **{key: (val[axis],)})
    return one.reshape(-1).long().tolist()


def _resize(im, node, ins, at):
    x = ins[0]
    shape, rank = im.shape(x), im.rank(x)
    mode = at.get("mode", "nearest")
    if node.op_type == "Upsample" or im.opset < 11:  # Upsample / Resize-10: scales, asymmetric, floor
        scales = list(at["scales"]) if "scales" in at else [float(v) for v in im.same(ins[1]).reshape(-1)]
        sizes, ctm, rounding = None, "asymmetric", "floor"
    else:
        scales = sizes = None
        if len(ins) > 2 and ins[2] is not None and ins[2].ex[0].numel():
            scales = [float(v) for v in im.weight(ins[2], "scales").reshape(-1)]
        if len(ins) > 3 and ins[3] is not None and ins[3].ex[0].numel():
            if not ins[3].const:
                raise im.error("has its sizes computed from tensor values at run time: not supported")
            per_var = [[int(v) for v in e.reshape(-1)] for e in ins[3].ex]
            sizes = per_var[0]
            if any(p[-(rank - 2):] != sizes[-(rank - 2):] for p in per_var):
                raise _BatchDependent
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        rounding = at.get("nearest_mode", "round_prefer_floor")
    if at.get("antialias", 0) or at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise im.error("uses antialias / keep_aspect_ratio_policy: not supported")
    if "axes" in at:  # opset 18: scales / sizes for the listed axes only
        full_s, full_z = [1.0] * rank, list(shape)
        for i, a in enumerate(_axis(a, rank) for a in at["axes"]):
            if scales:
                full_s[a] = scales[i]
            if sizes:
                full_z[a] = sizes[i]
        scales, sizes = (full_s if scales else None), (full_z if sizes else None)
    if scales:
        if scales[:2] != [1.0, 1.0]:
            raise im.error("resizes the batch or channel dimension: only spatial resizing is supported")
        out = [int(np.float32(shape[i]) * np.float32(scales[i])) for i in range(2, rank)]
        kw, ratio = {"scale_factor": tuple(scales[2:])}, scales[2:]
    elif sizes:
        if sizes[1] != shape[1]:
            raise im.error("resizes the channel dimension: only spatial resizing is supported")
        out = sizes[2:]
        kw, ratio = {"size": tuple(out)}, [o / s for o, s in zip(out, shape[2:])]
    else:
        raise im.error("has neither scales nor sizes")
    if mode == "nearest":
        wanted = [_onnx_nearest(shape[2 + i], out[i], ratio[i], ctm, rounding) for i in range(rank - 2)]
        for torch_mode in ("nearest", "nearest-exact"):
            if all(w == _torch_nearest(shape[2 + i], kw, i, torch_mode) for i, w in enumerate(wanted)):
                y = im.call(F.interpolate, x, mode=torch_mode, **kw)
                break
        else:
            raise im.error(f"uses nearest resizing with coordinate_transformation_mode={ctm}, nearest_mode={rounding}, "
                           "which torch does not compute: re-export with asymmetric / floor (torch's default)")
    elif mode == "linear" and ctm in ("align_corners", "half_pixel", "pytorch_half_pixel") and rank in (3, 4, 5):
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        y = im.call(F.interpolate, x, mode=torch_mode, align_corners=ctm == "align_corners", **kw)
    else:
        raise im.error(f"uses mode={mode}, coordinate_transformation_mode={ctm}: only nearest and linear "
                       "(align_corners / half_pixel) resizing are supported")
    if im.shape(y)[2:] != out:
        raise im.error(f"resizes to {im.shape(y)[2:]} in torch but {out} in ONNX: re-export with sizes, not scales")
    return [y]


def _identity(im, node, ins, at):
    return [_Val(ins[0].node, ins[0].ex)]


def _constant(im, node, ins, at):
    if "value" in at:
        t = _tensor(numpy_helper.to_array(at["value"]))
    elif "value_float" in at or "value_int" in at:
        t = torch.tensor(at.get("value_float", at.get("value_int")),
                         dtype=torch.float32 if "value_float" in at else torch.int64)
    elif "value_floats" in at or "value_ints" in at:
        t = torch.tensor(list(at.get("value_floats", at.get("value_ints", []))),
                         dtype=torch.float32 if "value_floats" in at else torch.int64)
    else:
        raise im.error(f"has attributes {sorted(at)}: only numeric tensors are supported")
    return [_Val(None, (t,) * im.nvar)]


def _shape(im, node, ins, at):
    start, end = int(at.get("start", 0)), at.get("end")
    return [_Val(None, tuple(torch.tensor(list(e.shape)[start:end], dtype=torch.int64) for e in ins[0].ex))]


def _size(im, node, ins, at):
    return [_Val(None, tuple(torch.tensor(e.numel(), dtype=torch.int64) for e in ins[0].ex))]


def _cast(im, node, ins, at):
    x, dtype = ins[0], _torch_dtype(int(at["to"]))
    if x.ex[0].dtype == dtype:
        return [_Val(x.node, x.ex)]
    return [im.call("to", x, dtype)]


def _constant_of_shape(im, node, ins, at):
    value = _tensor(numpy_helper.to_array(at["value"])).reshape(-1) if "value" in at else torch.zeros(1)
    if not ins[0].const:
        raise im.error("has its shape computed from tensor values at run time: not supported")
    return [_Val(None, tuple(torch.full([int(d) for d in e.tolist()], value[0].item(), dtype=value.dtype)
                             for e in ins[0].ex))]


def _range(im, node, ins, at):
    if not all(v.const for v in ins):
        raise im.error("has run-time bounds: not supported")
    return [_Val(None, tuple(torch.arange(ins[0].ex[k].item(), ins[1].ex[k].item(), ins[2].ex[k].item(),
                                          dtype=ins[0].ex[k].dtype) for k in range(im.nvar)))]


def _expand(im, node, ins, at):
    x, shape = ins
    if not shape.const:
        raise im.error("has its shape computed from tensor values at run time: not supported")
    outs = [list(torch.broadcast_shapes(tuple(x.ex[k].shape), tuple(shape.ex[k].tolist()))) for k in range(im.nvar)]
    if x.const:
        return [_Val(None, tuple(x.ex[k].expand(outs[k]).clone() for k in range(im.nvar)))]
    if any(o != outs[0] for o in outs):
        raise _BatchDependent
    return [im.call(torch.broadcast_to, x, outs[0])]


def _where(im, node, ins, at):
    return [im.call(torch.where, *ins)]


OPS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _batch_norm,
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
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "Where": _where,
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Erf": _unary(torch.erf), "Not": _unary(torch.logical_not),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather, "Expand": _expand, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize, "Identity": _identity, "Dropout": _identity,
    "Constant": _constant, "Shape": _shape, "Size": _size, "Cast": _cast, "ConstantOfShape": _constant_of_shape,
    "Range": _range,
}
