"""Capture a model as a ``torch.fx.GraphModule`` (the one model IR) and record tensor shapes."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import EdgeslimError

__all__ = ["capture", "annotate_shapes"]


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape.

    Raises a one-line ``EdgeslimError`` when the model cannot be traced (data-dependent control flow,
    unsupported Python constructs) instead of fx's multi-page traceback.
    """
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = fx.symbolic_trace(model.eval())
        except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgeslimError(
                f"model {type(model).__name__} cannot be traced by torch.fx ({reason[:160]}): remove "
                "data-dependent Python control flow from forward(), or export it to ONNX and pass the .onnx file"
            ) from None
    annotate_shapes(gm, input_shape)
    return gm


class _ValueProp(fx.Interpreter):
    """Runs the graph once and records, per node, what the passes and the lowering read: the output's shape and
    dtype (``meta['shape']``, ``meta['dtype']``, ``meta['is_tensor']``: a single tensor, not a tuple), the constants
    (``meta['const']``: nodes that do not depend on the model input, such as anchor tables) and Python values
    derived from shapes (``meta['value']``).

    A plain ``fx.Interpreter``: torch's ``ShapeProp`` records the same shapes but imports its symbolic-shape
    machinery (sympy) on its first node, 0.8 s of every command's start here."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        inputs = n.all_input_nodes
        n.meta["const"] = n.op == "get_attr" or (n.op != "placeholder" and bool(inputs)
                                                  and all(a.meta.get("const") for a in inputs))
        if n.meta["const"] or not isinstance(result, torch.Tensor):
            n.meta["value"] = result
        else:
            n.meta.pop("value", None)
        n.meta["is_tensor"] = isinstance(result, torch.Tensor)
        n.meta["shape"] = tuple(result.shape) if n.meta["is_tensor"] else None
        n.meta["dtype"] = result.dtype if n.meta["is_tensor"] else None
        return result


def annotate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Run one example batch (batch size 1) through ``gm`` and store ``meta['shape']`` per node
    (and ``meta['dtype']``, ``meta['const']`` / ``meta['value']``, see ``_ValueProp``)."""
    x = torch.zeros((1, *input_shape))
    try:
        with torch.no_grad():
            _ValueProp(gm).run(x)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeslimError(
            f"model does not run on an input of shape {tuple(x.shape)} ({first[:160]}): "
            "check --input-shape / the model's expected input size"
        ) from None
    return gm
