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

The importer is three modules: this one (reading and validation, the graph builder ``Importer`` with its value
bookkeeping, the dynamic-batch retry), ``onnx_import_ops`` (the compute-op handlers and the ``OPS`` table) and
``onnx_import_fold`` (``Val``, attribute parsing, and the shape / data-movement handlers that fold constants).
"""

from __future__ import annotations

import keyword
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from ..errors import EdgeslimError
from .onnx_import_fold import BatchDependent, Val, attrs_of, as_tensor, torch_dtype
from .onnx_import_ops import OPS

__all__ = ["import_onnx", "Importer"]


_RESERVED = {"meta", "training", "graph", "code", "forward"}  # GraphModule attributes a submodule must not shadow

def import_onnx(path_or_model: str | Path | onnx.ModelProto,
                input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """Read a float ONNX model into a ``torch.fx.GraphModule`` that computes the same function.

    ``forward`` takes the ONNX graph inputs positionally (initializers excluded) and returns one tensor, or a
    tuple in ONNX output order. ``gm.meta`` holds ``onnx_input_shape`` (the first input without its batch
    dimension), ``onnx_path``, ``onnx_dynamic_batch``, ``onnx_input_names`` / ``onnx_output_names`` and
    ``onnx_metadata`` (the file's ``metadata_props``). Unsupported ops are all named in one
    ``EdgeslimError``. ``input_shape`` (C, H, W) fixes the first input's dynamic dimensions other than the batch
    (files exported with a dynamic height / width); shapes are folded at that size.

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
        try:
            gm = Importer(model, label, dynamic_batch=True, input_shape=input_shape).run()
        except BatchDependent:
            gm = Importer(model, label, dynamic_batch=False, input_shape=input_shape).run()
    except (EdgeslimError, RecursionError, MemoryError):
        raise
    except Exception as exc:  # a malformed graph the checks above did not foresee: still one line, never raw
        raise EdgeslimError(f"{label}: cannot be imported ({type(exc).__name__}: {_one_line(exc)}): check the "
                            "file with onnx.checker.check_model") from None
    gm.meta["onnx_path"] = None if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    inits = {i.name for i in model.graph.initializer}
    gm.meta["onnx_input_names"] = [i.name for i in model.graph.input if i.name not in inits]
    gm.meta["onnx_output_names"] = [o.name for o in model.graph.output]
    gm.meta["onnx_metadata"] = {p.key: p.value for p in model.metadata_props}
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


def _subst(obj, k: int):
    """``obj`` with every ``Val`` replaced by its example for batch variant ``k``."""
    if isinstance(obj, Val):
        return obj.ex[k]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_subst(o, k) for o in obj)
    if isinstance(obj, dict):
        return {key: _subst(v, k) for key, v in obj.items()}
    return obj


def _vals(obj) -> list[Val]:
    if isinstance(obj, Val):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [v for o in obj for v in _vals(o)]
    if isinstance(obj, dict):
        return [v for o in obj.values() for v in _vals(o)]
    return []


class Importer:
    def __init__(self, model: onnx.ModelProto, label: str, *, dynamic_batch: bool,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.model, self.label = model, label
        gr = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph, self.root = fx.Graph(), nn.Module()
        self.attr_names: set[str] = set()
        self.const_nodes: dict[int, tuple[Val, fx.Node]] = {}
        self.bias_free: dict[str, nn.Module] = {}  # ONNX value -> the bias-less conv / linear that produced it
        inits = {t.name: self._initializer(t) for t in gr.initializer}
        inputs = [i for i in gr.input if i.name not in inits]
        if not inputs:
            raise EdgeslimError(f"{label}: the ONNX graph has no inputs: export the model with its input tensor")
        shapes = [self._input_dims(i, input_shape if k == 0 else None) for k, i in enumerate(inputs)]
        self.nvar = 2 if dynamic_batch and any(d and d[0] is None for d in shapes) else 1
        self.dynamic_batch = self.nvar == 2
        self.vals: dict[str, Val] = {name: Val(None, (t,) * self.nvar) for name, t in inits.items()}
        for vi, dims in zip(inputs, shapes):
            node = self.graph.placeholder(self.unique(_sanitize(vi.name) or "x"))
            dtype = self._dtype(vi.type.tensor_type.elem_type, f"input '{vi.name}'")
            ex = tuple(torch.zeros([b if d is None else d for d in dims[:1]] + dims[1:], dtype=dtype)
                       for b in (1, 2)[:self.nvar])
            self.vals[vi.name] = Val(node, ex)
        self.input_shape = tuple(shapes[0][1:])
        self.outputs = [o.name for o in gr.output]
        self.uses = Counter(i for n in gr.node for i in n.input if i)
        self.uses.update(self.outputs)
        self.node: onnx.NodeProto | None = None
        self.base = "x"

    def _dtype(self, elem_type: int, what: str) -> torch.dtype:
        try:
            return torch_dtype(elem_type)
        except Exception:  # bfloat16 / float8 / int4 / string: numpy or torch has no such dtype
            name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
                else str(elem_type)
            raise EdgeslimError(f"{self.label}: {what} has element type {name}, which edgeslim does not import: "
                                "export the model in float32") from None

    def _initializer(self, t: onnx.TensorProto) -> torch.Tensor:
        self._dtype(t.data_type, f"initializer '{t.name}'")
        try:
            return as_tensor(numpy_helper.to_array(t))
        except Exception as exc:  # missing external data, a truncated raw buffer, ...
            raise EdgeslimError(f"{self.label}: initializer '{t.name}' cannot be read ({type(exc).__name__}: "
                                f"{_one_line(exc)}): save the model with its weights (onnx.save)") from None

    def _input_dims(self, vi: onnx.ValueInfoProto, given: tuple[int, ...] | None = None) -> list[int | None]:
        if not vi.type.HasField("tensor_type"):
            raise EdgeslimError(f"{self.label}: input '{vi.name}' is not a tensor (a sequence, map or optional): "
                                "only tensor inputs are supported")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise EdgeslimError(f"{self.label}: input '{vi.name}' has no declared shape: export it with a fixed "
                                "input size")
        dims: list[int | None] = []
        rank = len(tt.shape.dim)
        dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in list(tt.shape.dim)[1:])
        if given is not None and dynamic and len(given) != rank - 1:
            raise EdgeslimError(f"{self.label}: input '{vi.name}' has {rank} dimensions but --input-shape gives "
                                f"{len(given)}: pass the {rank - 1} dimensions after the batch")
        for k, d in enumerate(tt.shape.dim):
            fixed = d.HasField("dim_value") and d.dim_value > 0
            if fixed:  # a fixed size is imported as it is (--input-shape may still run the graph at another)
                dims.append(int(d.dim_value))
            elif k > 0 and given is not None:
                dims.append(int(given[k - 1]))
            elif fixed:
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(None)
            else:
                raise EdgeslimError(
                    f"{self.label}: input '{vi.name}' has a dynamic dimension {k} ('{d.dim_param or '?'}'): pass "
                    "--input-shape C,H,W (the size to quantize at), or re-export the model with a fixed input size")
        return dims

    # ------------------------------------------------------------------ the walk
    def run(self) -> fx.GraphModule:
        with torch.no_grad():
            for index, node in enumerate(self.model.graph.node):
                self.node = node
                self.base = _sanitize(node.name, node.op_type.lower()) or f"{node.op_type.lower()}_{index}"
                ins = [self.value(name) if name else None for name in node.input]
                try:
                    outs = OPS[_op_key(node)](self, node, ins, attrs_of(node))
                except (EdgeslimError, BatchDependent):
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

    def value(self, name: str) -> Val:
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
                raise BatchDependent from None
        return (first, *rest)

    def call(self, target: Callable | str, *args, **kwargs) -> Val:
        """``target(*args, **kwargs)``: folded when every ``Val`` argument is a constant, else an fx node.
        A string target is a tensor method called on the first argument."""
        fn = target if callable(target) else (lambda x, *a, **kw: getattr(x, target)(*a, **kw))
        exs = self._examples(fn, args, kwargs)
        if all(v.const for v in _vals((args, kwargs))):
            return Val(None, exs)
        op = "call_function" if callable(target) else "call_method"
        fx_args = self._fx(args)
        node = self.graph.create_node(op, target, fx_args, self._fx(kwargs), name=self.base)
        return Val(node, exs)

    def module(self, mod: nn.Module, *inputs: Val) -> Val:
        mod.eval()
        exs = self._examples(mod, inputs, {})
        if all(v.const for v in inputs):
            return Val(None, exs)
        name = self.unique(self.base)
        self.root.add_module(name, mod)
        return Val(self.graph.call_module(name, self._fx(inputs)), exs)

    def _fx(self, obj):
        if isinstance(obj, Val):
            return self.arg(obj)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._fx(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._fx(v) for k, v in obj.items()}
        return obj

    def arg(self, v: Val) -> fx.Node | object:
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

    def same(self, v: Val):
        """The example shared by every batch variant (a batch-dependent constant cannot be baked in)."""
        first = v.ex[0]
        for other in v.ex[1:]:
            if isinstance(first, torch.Tensor):
                if first.shape != other.shape or not torch.equal(first, other):
                    raise BatchDependent
            elif first != other:
                raise BatchDependent
        return first

    def weight(self, v: Val, what: str) -> torch.Tensor:
        if not v.const:
            raise self.error(f"has a {what} computed at run time: only constant {what}s are supported")
        return self.same(v)

    def ints(self, v: Val | None, what: str) -> list[int] | None:
        if v is None:
            return None
        if not v.const:
            raise self.error(f"has its {what} computed from tensor values at run time: edgeslim folds only shapes "
                             "and constants")
        return [int(i) for i in torch.as_tensor(self.same(v)).reshape(-1).tolist()]

    def number(self, v: Val | None, what: str) -> float | None:
        if v is None or (v.const and torch.as_tensor(v.ex[0]).numel() == 0):
            return None
        if not v.const:
            raise self.error(f"has its {what} computed at run time: only constants are supported")
        return torch.as_tensor(self.same(v)).reshape(-1)[0].item()

    def rank(self, v: Val) -> int:
        return v.ex[0].dim()

    def shape(self, v: Val) -> list[int]:
        return list(v.ex[0].shape)
