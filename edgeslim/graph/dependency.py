"""Channel dependency groups: which channels of which layers must be removed together.

Channel pruning (TTA guideline G5: structured pruning is the kind that buys speed, He et al. 2017; Li et al.
2017) deletes whole output filters. Deleting filter ``i`` of a conv also deletes channel ``i`` of the BN
after it, and input channel ``i`` of every layer that reads it; a residual add ties the channels of all of
its inputs together (index by index), a concatenation shifts them by the preceding inputs' widths, a
depthwise conv passes them through. This module follows every tensor's channel axis through the
``torch.fx`` graph (BN not folded), with one union-find element per channel:

* a Conv2d / Linear output creates fresh channels; its input channels are recorded as a member (``in``);
* BatchNorm, elementwise activations, pooling, dropout, resizing keep channel ``i`` as channel ``i``;
* ``add`` / ``mul`` / ``sub`` / ``div`` unite channel ``i`` of every full-width input;
* ``cat`` on the channel axis concatenates the inputs' channels (offsets per input);
* a depthwise conv (``groups == in == out``) is a member (``dw``) and passes its channels through;
* ``flatten`` (or ``view(n, -1)``) before a Linear maps channel ``c`` to features ``c*HW .. c*HW+HW-1``;
* zero padding of the channel axis (the option-A shortcut), channel slicing, grouped convs, the model's
  input and output and every op not in the tables below make the channels they touch **unprunable**.

A ``ChannelGroup`` collects the channels that touch the same layers the same way; its channels are the
units a pruner removes. ``remove_channels`` then rebuilds the layers physically (a smaller dense model).

>>> gm = capture(resnet20(), (3, 32, 32))
>>> [g.name for g in find_groups(gm) if g.prunable][:2]
['layer1.0.conv1', 'layer1.1.conv1']
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import EdgeslimError
from . import ops
from .capture import annotate_shapes

__all__ = ["MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "ROLES", "Member", "ChannelGroup", "find_groups",
           "remove_channels"]


# How each op maps channels (style rule 7: one flat table per kind of fx target).
MODULE_RULES: dict[type, str] = {
    nn.Conv2d: "conv", nn.Linear: "linear", nn.BatchNorm2d: "bn", nn.BatchNorm1d: "bn",
    nn.MaxPool2d: "same", nn.AvgPool2d: "same", nn.AdaptiveAvgPool2d: "same", nn.AdaptiveMaxPool2d: "same",
    nn.Dropout: "same", nn.Identity: "same", nn.Upsample: "same", nn.Flatten: "flatten",
}
FUNCTION_RULES: dict[object, str] = {
    operator.add: "elementwise", operator.iadd: "elementwise", torch.add: "elementwise",
    operator.sub: "elementwise", torch.sub: "elementwise", operator.mul: "elementwise",
    torch.mul: "elementwise", operator.truediv: "elementwise", torch.div: "elementwise",
    torch.cat: "cat", torch.concat: "cat",
    F.max_pool2d: "same", F.avg_pool2d: "same", F.adaptive_avg_pool2d: "same", F.adaptive_max_pool2d: "same",
    F.dropout: "same", F.interpolate: "same",
    torch.flatten: "flatten", torch.reshape: "flatten",
    F.pad: "pad", operator.getitem: "getitem",
}
METHOD_RULES: dict[str, str] = {
    "add": "elementwise", "sub": "elementwise", "mul": "elementwise", "div": "elementwise",
    "flatten": "flatten", "view": "flatten", "reshape": "flatten", "contiguous": "same", "clone": "same",
    "mean": "mean",
}
ROLES = ("out", "dw", "bn", "in")  # member roles, in the order a group lists them per layer


@dataclass(frozen=True)
class Member:
    """One layer's share of a group.

    ``role``: ``out`` (Conv2d / Linear output filters: weight axis 0 and bias), ``in`` (weight axis 1),
    ``bn`` (BatchNorm affine parameters and running statistics), ``dw`` (a depthwise conv: weight axis 0,
    bias, and ``in = out = groups``). Channel ``j`` of the group is ``indices[j*count:(j+1)*count]`` of
    that axis; ``count`` is 1 except for a Linear after a flatten (``H*W`` features per channel).
    """

    module: str
    role: str
    count: int
    indices: tuple[int, ...]

    def of(self, channels) -> list[int]:
        """The axis indices of this member that belong to the group's ``channels``."""
        return [i for j in channels for i in self.indices[j * self.count:(j + 1) * self.count]]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together: removing channel ``j`` removes ``m.of([j])`` from every member ``m``."""

    name: str
    members: tuple[Member, ...]
    size: int
    prunable: bool
    reason: str = ""

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role in ("out", "dw")]


class _Tracker:
    """Union-find over channels; ``ids[node]`` holds the element of each channel of a node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.parent, self.ids = gm, [], {}
        self.pos: dict[tuple[str, str, int], int] = {}  # (module, role, axis index) -> element
        self.reasons: dict[int, str] = {}
        self.order: dict[str, int] = {}  # module -> first use, for readable group order

    def fresh(self, n: int, reason: str = "") -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = np.arange(start, start + n)
        if reason:
            self.mark(ids, reason)
        return ids

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def mark(self, ids: np.ndarray, reason: str) -> None:
        for e in ids.tolist():
            self.reasons.setdefault(e, reason)

    def place(self, ids: np.ndarray, module: str, role: str) -> None:
        self.order.setdefault(module, len(self.order))
        for i, e in enumerate(ids.tolist()):
            key = (module, role, i)
            if key in self.pos:  # a module called twice: both calls share its weights
                self.union(np.array([self.pos[key]]), np.array([e]))
            else:
                self.pos[key] = e

    def get(self, node) -> np.ndarray | None:
        return self.ids.get(node) if isinstance(node, fx.Node) else None

    def unknown(self, node: fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            if self.get(a) is not None:
                self.mark(self.get(a), reason)
        shape = node.meta.get("shape")
        if shape is not None and len(shape) >= 2:
            self.ids[node] = self.fresh(shape[1], reason)

    # ---- the rules --------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        shape = node.meta.get("shape")
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                self.ids[node] = self.fresh(shape[1], "model input")
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                if self.get(a) is not None:
                    self.mark(self.get(a), "model output")
            return
        if node.op == "get_attr":
            return self.unknown(node, f"constant tensor {node.target}")
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            rule = MODULE_RULES.get(type(mod))
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
        else:
            rule = METHOD_RULES.get(node.target)
        if rule is None and ops.kind(self.gm, node) in ("act", "lut"):
            rule = "same"  # elementwise activation
        if rule is None and ops.kind(self.gm, node) == "meta":
            return  # x.size(0) and friends: Python values, no channels
        x = self.get(node.args[0]) if node.args else None
        label = f"{node.name} ({getattr(node.target, '__name__', node.target)})"
        if rule is None or shape is None or (x is None and rule not in ("cat", "elementwise")):
            return self.unknown(node, f"{label} does not map channels one to one")
        getattr(self, "_" + rule)(node, x, shape, label)

    def _conv(self, node, x, shape, label) -> None:
        mod, name = self.gm.get_submodule(node.target), str(node.target)
        if mod.groups == 1:
            self.place(x, name, "in")
            self.ids[node] = self.fresh(mod.out_channels)
            self.place(self.ids[node], name, "out")
        elif mod.groups == mod.in_channels == mod.out_channels:
            self.place(x, name, "dw")
            self.ids[node] = x
        else:
            self.unknown(node, f"grouped conv {name} (groups={mod.groups})")

    def _linear(self, node, x, shape, label) -> None:
        if len(node.args[0].meta.get("shape") or ()) != 2:
            return self.unknown(node, f"{label} reads a tensor with more than 2 axes")
        name = str(node.target)
        self.place(x, name, "in")
        self.ids[node] = self.fresh(self.gm.get_submodule(node.target).out_features)
        self.place(self.ids[node], name, "out")

    def _bn(self, node, x, shape, label) -> None:
        self.place(x, str(node.target), "bn")
        self.ids[node] = x

    def _same(self, node, x, shape, label) -> None:
        if len(shape) < 2 or shape[1] != len(x):
            return self.unknown(node, f"{label} changes the channel axis")
        self.ids[node] = x

    def _mean(self, node, x, shape, label) -> None:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        ndim = len(node.args[0].meta["shape"])
        dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
        if any(d % ndim in (0, 1) for d in dims):
            return self.unknown(node, f"{label} reduces the channel axis")
        self._same(node, x, shape, label)

    def _elementwise(self, node, x, shape, label) -> None:
        full = []
        for a in node.args:
            if not isinstance(a, fx.Node) or a.meta.get("shape") is None:
                continue
            s = a.meta["shape"]
            if len(s) == len(shape) and len(shape) >= 2 and s[1] == shape[1] and self.get(a) is not None:
                full.append(self.get(a))
            elif not (len(s) == len(shape) and s[1] == 1) and int(np.prod(s)) != 1:
                return self.unknown(node, f"{label} broadcasts a tensor of shape {tuple(s)} over channels")
        if not full:
            return self.unknown(node, f"{label} has no full-width input")
        for other in full[1:]:
            self.union(full[0], other)
        self.ids[node] = full[0]

    def _cat(self, node, x, shape, label) -> None:
        parts = [self.get(a) for a in node.args[0]]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if any(p is None for p in parts):
            return self.unknown(node, f"{label} concatenates a tensor without channels")
        if dim % len(shape) == 1:
            self.ids[node] = np.concatenate(parts)
        else:  # concatenation along batch or space: channel i of every input is channel i of the output
            for p in parts[1:]:
                self.union(parts[0], p)
            self.ids[node] = parts[0]

    def _flatten(self, node, x, shape, label) -> None:
        src = node.args[0].meta["shape"]
        if tuple(shape) == tuple(src):
            self.ids[node] = x
            return
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):  # view((n, -1)), torch.reshape(x, (n, -1))
            sizes = tuple(sizes[0])
        if node.target in ("view", "reshape", torch.reshape):
            ok = len(sizes) == 2 and sizes[1] == -1  # view(n, -1): the width follows the channels
        else:
            start = node.kwargs.get("start_dim", sizes[0] if sizes else (1 if node.op == "call_module" else 0))
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            if node.op == "call_module":
                mod = self.gm.get_submodule(node.target)
                start, end = mod.start_dim, mod.end_dim
            ok = start == 1 and end == -1
        if not ok or len(shape) != 2 or shape[1] != int(np.prod(src[1:])):
            return self.unknown(node, f"{label} reshapes the channel axis")
        self.ids[node] = np.repeat(x, int(np.prod(src[2:])))

    def _pad(self, node, x, shape, label) -> None:
        pad = tuple(node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else ()))
        k = 2 * (len(shape) - 2)  # F.pad lists the last axis first: axis 1 is pair k, k+1
        front, back = (pad[k], pad[k + 1]) if len(pad) > k + 1 else (0, 0)
        if (front, back) == (0, 0) and len(pad) <= k + 2:
            self.ids[node] = x
            return
        reason = f"{label} pads the channel axis (e.g. an option-A shortcut)"
        if min(front, back) < 0 or len(pad) > k + 2:
            return self.unknown(node, reason)
        self.mark(x, reason)
        self.ids[node] = np.concatenate([self.fresh(front, reason), x, self.fresh(back, reason)])

    def _getitem(self, node, x, shape, label) -> None:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if isinstance(idx[0], slice) and all(isinstance(i, slice) for i in idx):
            if len(idx) < 2 or idx[1] == slice(None):
                return self._same(node, x, shape, label)
            if len(shape) >= 2:
                self.mark(x, f"{label} slices the channel axis")
                self.ids[node] = x[idx[1]]
                return
        self.unknown(node, f"{label} indexes the channel axis")

    def groups(self) -> list[ChannelGroup]:
        comps: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        for key, e in self.pos.items():
            comps[self.find(e)].append(key)
        reasons: dict[int, dict[str, None]] = defaultdict(dict)
        for e, r in self.reasons.items():
            reasons[self.find(e)][r] = None
        layer = lambda k: (self.order[k[0]], ROLES.index(k[1]))  # noqa: E731
        by_sig: dict[tuple, list[int]] = defaultdict(list)
        for root, keys in comps.items():
            counts: dict[tuple[str, str], int] = defaultdict(int)
            for m, role, _ in keys:
                counts[(m, role)] += 1
            by_sig[(tuple(sorted(counts.items(), key=lambda kv: layer(kv[0]))), root in reasons)].append(root)
        out, names = [], defaultdict(int)
        for (sig, blocked), roots in sorted(by_sig.items(), key=lambda kv: (layer(kv[0][0][0][0]), min(kv[1]))):
            first = sig[0][0]
            roots.sort(key=lambda r: min(i for m, role, i in comps[r] if (m, role) == first))
            members = []
            for (m, role), count in sig:
                idx = [sorted(i for mm, rr, i in comps[r] if (mm, rr) == (m, role)) for r in roots]
                members.append(Member(m, role, count, tuple(i for chunk in idx for i in chunk)))
            prod = next((k for k, _ in sig if k[1] in ("out", "dw")), None)
            name = prod[0] if prod else f"{first[0]}:{first[1]}"
            names[name] += 1
            name = name if names[name] == 1 else f"{name}#{names[name]}"
            why = "; ".join(dict.fromkeys(r for root in roots for r in reasons.get(root, {})))
            out.append(ChannelGroup(name, tuple(members), len(roots), not blocked, why))
        return out


def find_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of a captured model (``capture(model, input_shape)``, BN not folded)."""
    tracker = _Tracker(gm)
    for node in gm.graph.nodes:
        tracker.visit(node)
    return tracker.groups()


def remove_channels(gm: fx.GraphModule, groups: list[ChannelGroup],
                    removed: dict[str, list[int]]) -> fx.GraphModule:
    """A copy of ``gm`` with channels ``removed[group.name]`` (positions in the group) physically deleted.

    Conv2d / BatchNorm / Linear modules are rebuilt with fewer channels and the kept weights, under their
    original names (state_dict keys stay readable); the graph itself is unchanged.
    """
    by_name = {g.name: g for g in groups}
    drop: dict[tuple[str, str], set[int]] = defaultdict(set)
    for name, chans in removed.items():
        g = by_name.get(name)
        if g is None or not g.prunable:
            raise EdgeslimError(f"channel group {name!r} is {'unknown' if g is None else 'not prunable'}: "
                                "prune only groups that find_groups reports as prunable")
        if len(set(chans)) >= g.size or any(not 0 <= j < g.size for j in chans):
            raise EdgeslimError(f"group {name!r} has {g.size} channels: remove between 0 and {g.size - 1} of them")
        for m in g.members:
            drop[(m.module, m.role)].update(m.of(sorted(set(chans))))
    new = copy.deepcopy(gm)
    for module in dict.fromkeys(m for m, _ in drop):
        get = lambda role: drop.get((module, role), set())  # noqa: E731
        _set_module(new, module, _shrink(new.get_submodule(module), get("out") | get("dw") | get("bn"),
                                         get("in") | get("dw")))
    new.recompile()
    placeholder = next(n for n in new.graph.nodes if n.op == "placeholder")
    return annotate_shapes(new, tuple(placeholder.meta["shape"][1:]))


def _keep(n: int, drop: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _param(t: torch.Tensor | None, dim: int, keep: torch.Tensor):
    if t is None:
        return None
    kept = t.detach().index_select(dim, keep.to(t.device)).clone()
    return nn.Parameter(kept, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else kept


def _shrink(mod: nn.Module, out_drop: set[int], in_drop: set[int]) -> nn.Module:
    new = copy.deepcopy(mod)
    if isinstance(mod, nn.Conv2d):
        keep_out = _keep(mod.out_channels, out_drop)
        new.weight = _param(mod.weight, 0, keep_out)
        new.bias = _param(mod.bias, 0, keep_out)
        new.out_channels = len(keep_out)
        if mod.groups == 1:
            keep_in = _keep(mod.in_channels, in_drop)
            new.weight = _param(new.weight, 1, keep_in)
            new.in_channels = len(keep_in)
        else:  # depthwise: in = out = groups
            new.in_channels = new.groups = len(keep_out)
    elif isinstance(mod, nn.Linear):
        keep_out, keep_in = _keep(mod.out_features, out_drop), _keep(mod.in_features, in_drop)
        new.weight = _param(_param(mod.weight, 0, keep_out), 1, keep_in)
        new.bias = _param(mod.bias, 0, keep_out)
        new.out_features, new.in_features = len(keep_out), len(keep_in)
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        keep = _keep(mod.num_features, out_drop)
        new.weight, new.bias = _param(mod.weight, 0, keep), _param(mod.bias, 0, keep)
        for buf in ("running_mean", "running_var"):
            if getattr(mod, buf) is not None:
                setattr(new, buf, _param(getattr(mod, buf), 0, keep))
        new.num_features = len(keep)
    return new


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, mod)
