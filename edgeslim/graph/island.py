"""One fx node as a small ONNX model: the float island of an op that has no integer lowering.

The lowering keeps such an op in float between DequantizeLinear / QuantizeLinear; this module writes the
op itself, whatever it is (PReLU, a multiplication of two tensors, exp, a bilinear resize, box decoding
arithmetic...), by exporting a one-node ``GraphModule`` with torch's ONNX exporter. Constant operands
(anchor tables, folded constants: ``meta['const']``) become initializers of the island; Python values derived
from shapes are taken from ``meta['value']``. The result is serialized ONNX, which the exporter inlines
and the integer engine evaluates with ONNX's reference implementation, so the IntGraph stays torch-free.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import weakref

import torch
from torch import fx, nn

from ..errors import EdgeslimError

__all__ = ["node_to_onnx"]

ISLAND_OPSET = 17


def node_to_onnx(gm: fx.GraphModule, node: fx.Node, inputs: list[fx.Node], *, dynamic_batch: bool) -> bytes:
    """Serialized ONNX model computing ``node`` from the float tensors ``inputs`` (named as those nodes);
    its single output is named ``node.name``."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(a.name) for a in inputs}

    def bring(arg):
        if not isinstance(arg, fx.Node):
            return arg
        if arg in env:
            return env[arg]
        if "value" not in arg.meta:
            raise EdgeslimError(f"internal: float island {node.name} reads {arg.name}, which is neither an input nor "
                                "a constant")
        value = arg.meta["value"]
        if isinstance(value, torch.Tensor):
            name = f"c{len(env)}"
            root.register_buffer(name, value.detach().clone())
            env[arg] = graph.get_attr(name)
            return env[arg]
        return value

    args = fx.node.map_aggregate(node.args, bring)
    kwargs = fx.node.map_aggregate(node.kwargs, bring)
    if node.op == "call_module":
        root.add_module("op", gm.get_submodule(node.target))
        out = graph.call_module("op", args, kwargs)
    else:
        out = graph.create_node(node.op, node.target, args, kwargs)
    graph.output(out)
    island = fx.GraphModule(root, graph).eval()
    examples = tuple(torch.zeros(a.meta["shape"], dtype=a.meta.get("dtype") or torch.float32)
                     for a in inputs)
    names = [a.name for a in inputs]
    axes = {n: {0: "N"} for n in [*names, node.name]} if dynamic_batch else None
    key = _island_key(island, examples, names, dynamic_batch)
    done = _EXPORTED.setdefault(gm, {})
    if node.name not in done or done[node.name][0] != key:
        done[node.name] = key, _export(island, node, examples, names, axes)
    return done[node.name][1]


# each model's islands as last exported, one per node (gone with the model): a search lowers the same model once
# per candidate plan, and each island is the same ONNX every time (torch.onnx.export takes ~10 ms per island);
# a training step that changes an island's weights replaces its entry
_EXPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _island_key(island: fx.GraphModule, examples: tuple, names: list[str], dynamic: bool) -> tuple:
    """Everything the export of one node's ``island`` depends on besides the node: its code, its modules (their
    repr: type and settings), the content of every parameter and buffer (constants, and weights a training step may
    have changed), the input names, shapes and dtypes."""
    tensors = tuple((k, str(v.dtype), tuple(v.shape),
                     hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest())
                    for k, v in island.state_dict().items())
    return (island.code, repr(island), tensors, tuple(names),
            tuple((tuple(x.shape), str(x.dtype)) for x in examples), dynamic)


def _export(island: fx.GraphModule, node: fx.Node, examples: tuple, names: list[str], axes) -> bytes:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(island, examples, buf, dynamo=False, input_names=names, output_names=[node.name],
                              opset_version=ISLAND_OPSET, dynamic_axes=axes, do_constant_folding=True)
    except Exception as exc:
        raise EdgeslimError(f"operation {node.name} has no integer form and torch.onnx cannot export it as a float "
                            f"island ({str(exc).splitlines()[0][:160]})") from None
    return buf.getvalue()
