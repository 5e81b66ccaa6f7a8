"""Replace a classifier's feature extractor by a light backbone (TTA guideline G1).

The TTA report (section 6.1.1, G1) recommends, when a network's backbone was chosen for accuracy
first, replacing it by a light network such as MobileNet or ShuffleNet, with two cautions: the new backbone's
output must have the tensor size the rest of the network expects (add Conv / DWConv layers where it does
not), and every operation of the light network must be supported by the target (else prefer another light
network). Its case study swaps PoseResNet's ResNet-50 for MobileNetV2 (processing time 1.054 -> 0.704 s,
PCKh 81.4 -> 77.7 after retraining).

``swap_backbone`` does this for classifiers:

1. **Split** the fx graph at the global average pooling that feeds the classifier (``AdaptiveAvgPool2d(1)``,
   ``F.adaptive_avg_pool2d(x, 1)``, a full-size ``avg_pool2d``, ``x.mean((2, 3))``): the nodes the output
   needs that the pooled tensor does not come from form the **head** (pool, flatten, dropout, Linear layers),
   copied with their trained weights into a ``GraphModule``; everything before the pool is discarded.
2. **Build** the light backbone (``BACKBONES``: MobileNetV2, Sandler et al. CVPR 2018; ShuffleNetV2, Ma et
   al. ECCV 2018) with as many stride-2 layers as the original needed to go from the input to its feature
   map, keeping the *last* ones: 5 of 5 at 224x224 is the ImageNet schedule, ResNet-20's 32 -> 8 gives 2 of 5
   with a stride-1 stem (the CIFAR-style adaptation). The classifier's final 1x1 expansion conv (1280 / 1024
   channels) is not built: the channel adapter takes its place.
3. **Adapt** (``Adapter`` rows say what and why): a 1x1 conv + BN (+ the original's final activation, when
   its features end in ReLU / ReLU6) maps the backbone's channels to the ones the head's Linear reads; when
   the original's feature map is smaller than five stride-2 layers reach, 3x3 stride-2 *depthwise* conv + BN
   layers go before it (depthwise like the backbones' own downsampling, so they add no op kind the backbone
   does not already have). A size no stride schedule reaches is left as it is: the head pools globally, so
   any size gives the same output shape (the record says so).
4. **Check the target** (G1's second caution): ``target.unsupported`` on the PTQ-prepared graph lists the ops
   that would stay FP32 (MobileNetV2 and ShuffleNetV2 need depthwise convs, ShuffleNetV2 also concat);
   nothing fails, the record reports them next to the original's.

**The new backbone is randomly initialized**: no pretrained weights can be downloaded here. Only the head keeps
trained weights, so the new model is useless until trained: fine-tune the whole model with distillation from
the original (Hinton et al. 2015), ``finetune(new, data, FinetuneConfig(epochs=...), teacher=original)``. The
accuracy it reaches depends on that training budget (the TTA guideline's case study retrains the whole network).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from ..config import PTQConfig
from ..errors import EdgeslimError
from ..eval.profile import profile
from ..graph import ops
from ..graph.capture import capture
from ..models.mobilenet_v2 import mobilenet_v2_backbone
from ..models.shufflenet_v2 import shufflenet_v2_backbone
from ..targets import Target
from . import ptq

__all__ = ["BACKBONES", "MAX_DOWNSAMPLE", "ACTIVATIONS", "Adapter", "SwapRecord", "SwappedModel", "find_split",
           "extract_head", "downsample_plan", "swap_backbone"]


# name -> builder(in_channels=, width=, downsample=) returning a randomly initialized feature extractor
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": mobilenet_v2_backbone,
    "shufflenet_v2": shufflenet_v2_backbone,
}
MAX_DOWNSAMPLE = 5  # stride-2 layers both backbones have (total stride 32)
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


@dataclass(frozen=True)
class Adapter:
    """One inserted adapter layer group: its module path, what it is, and why it is there."""

    name: str
    layers: str
    in_shape: tuple[int, int, int]  # C, H, W
    out_shape: tuple[int, int, int]
    reason: str


@dataclass(frozen=True)
class SwapRecord:
    backbone: str
    width: float
    input_shape: tuple[int, ...]
    split_node: str  # the original's last feature-extractor node (the global pool's input)
    pool_node: str
    head_modules: tuple[str, ...]  # kept with their trained weights
    feature_shape: tuple[int, int, int]  # the original's features (C, H, W)
    backbone_shape: tuple[int, int, int]  # the new backbone's output (C, H, W), before the adapters
    downsample: int  # stride-2 layers kept in the backbone (of 5)
    adapters: tuple[Adapter, ...]
    params_before: int
    params_after: int
    macs_before: int  # conv + linear MACs for a batch of one
    macs_after: int
    target: str | None
    unsupported_before: dict[str, str] | None  # op name -> kind the target cannot run in integer (stay FP32)
    unsupported: dict[str, str] | None
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


class SwappedModel(nn.Module):
    """``head(adapter(backbone(x)))``: a light backbone, its adapters, and the original's trained head."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.adapter, self.head = backbone, adapter, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.backbone(x)))


# ------------------------------------------------------------------------------------------------ split
def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ``avgpool``-kind node turning (N, C, H, W) into (N, C) or (N, C, 1, 1)."""
    if ops.kind(gm, node) != "avgpool":
        return False
    args = ops.tensor_args(node)
    if not args or args[0].meta.get("shape") is None or node.meta.get("shape") is None:
        return False
    src, out = args[0].meta["shape"], node.meta["shape"]
    return len(src) == 4 and tuple(out) in ((src[0], src[1]), (src[0], src[1], 1, 1))


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += n.all_input_nodes
    return seen


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(ops.module(gm, node), nn.Linear) or (node.op == "call_function"
                                                          and node.target is torch.nn.functional.linear)


def find_split(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """(feature node, global pool node, head nodes in graph order) of a captured classifier.

    The head is every node the output needs that the features do not come from; the split is valid when the
    head reads nothing of the backbone but the features (and constants), and contains a Linear. The pool
    nearest the output wins.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    needed = _ancestors([output])
    for pool in reversed(list(gm.graph.nodes)):
        if pool not in needed or not _is_global_pool(gm, pool):
            continue
        feat = ops.tensor_args(pool)[0]
        backbone = _ancestors([feat])
        head = [n for n in gm.graph.nodes if n in needed and n not in backbone and n.op not in ("get_attr", "output")]
        inside = set(head) | {feat}
        if any(a not in inside and a.op != "get_attr" for n in [*head, output] for a in n.all_input_nodes):
            continue  # the classifier also reads earlier tensors (a skip around the pool): not separable here
        if any(_is_linear(gm, n) for n in head):
            return feat, pool, head
    raise EdgeslimError(f"model {type(gm).__name__} has no global average pool followed by a Linear classifier "
                        "that reads only the pooled features: swap_backbone needs a classifier ending in "
                        "GAP -> flatten -> Linear")


def extract_head(gm: fx.GraphModule, feat: fx.Node, head: list[fx.Node]) -> fx.GraphModule:
    """The head as its own ``GraphModule`` (input: the features), sharing module paths with the original."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {feat: graph.placeholder("features")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a constant (get_attr) the head reads
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    for node in head:
        env[node] = graph.node_copy(node, lookup)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.node.map_arg(output.args[0], lookup))
    return fx.GraphModule(gm, graph, class_name="Head")


# ---------------------------------------------------------------------------------------- build / adapt
def _halve(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2  # 3x3 / stride 2 / padding 1 (and ResNet's max pool, option-A subsampling): ceil(n / 2)
    return n


def downsample_plan(in_hw: tuple[int, int], feat_hw: tuple[int, int]) -> tuple[int, int]:
    """(stride-2 layers in the backbone, extra stride-2 adapter layers) reaching ``feat_hw`` from ``in_hw``.

    The backbone's count is the one that reaches the size exactly, else 5 (the most it has) plus adapter layers
    when more halvings reach it, else the count whose size is nearest (the head pools globally, so the
    output shape is the same either way).

    >>> downsample_plan((224, 224), (7, 7)), downsample_plan((32, 32), (8, 8)), downsample_plan((64, 64), (1, 1))
    ((5, 0), (2, 0), (5, 1))
    """
    def size(k: int) -> tuple[int, int]:
        return _halve(in_hw[0], k), _halve(in_hw[1], k)

    for k in range(MAX_DOWNSAMPLE + 1):
        if size(k) == tuple(feat_hw):
            return k, 0
    for extra in range(1, 32):
        hw = size(MAX_DOWNSAMPLE + extra)
        if hw == tuple(feat_hw):
            return MAX_DOWNSAMPLE, extra
        if hw == (1, 1):
            break
    area = feat_hw[0] * feat_hw[1]
    return min(range(MAX_DOWNSAMPLE + 1), key=lambda k: (abs(math.log(size(k)[0] * size(k)[1] / area)), k)), 0


def _dw_down(c: int, act: type[nn.Module] | None) -> nn.Sequential:
    layers = [nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False), nn.BatchNorm2d(c)]
    return nn.Sequential(*layers, *([act()] if act else []))


def _shape(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    with torch.no_grad():
        return tuple(model.eval()(torch.zeros(1, *input_shape)).shape[1:])  # type: ignore[return-value]


def _check_args(backbone: str, width: object, target: object) -> float:
    if backbone not in BACKBONES:
        raise EdgeslimError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < float(width) <= 4 \
            or not math.isfinite(float(width)):
        raise EdgeslimError(f"invalid backbone width {width!r}: use a multiplier in (0, 4], e.g. 0.5 or 1.0")
    if target is not None and not isinstance(target, Target):
        raise EdgeslimError(f"target must be an edgeslim.targets.Target (or None), got {type(target).__name__}: "
                            "use edgeslim.targets.load_target('vta')")
    return float(width)


def _cost(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    gm = capture(copy.deepcopy(model), input_shape)
    return sum(p.numel() for p in model.parameters()), sum(r.macs for r in profile(gm))


def swap_backbone(model: nn.Module, input_shape: tuple[int, ...], *, backbone: str = "mobilenet_v2",
                  width: float = 1.0, target: Target | None = None) -> tuple[nn.Module, SwapRecord]:
    """A copy of classifier ``model`` whose feature extractor is a light, **randomly initialized** backbone.

    The head (global pool, flatten, Linear layers) keeps its trained weights; see the module docstring for the
    split, the stride schedule and the adapters. ``target`` lists the ops the new model cannot run in integer
    (they stay FP32). Train the result before use, with distillation from the original::

        new, rec = swap_backbone(original, (3, 32, 32), backbone="shufflenet_v2", width=0.5)
        finetune(new, data, FinetuneConfig(epochs=30), teacher=original)  # accuracy depends on this budget

    >>> from edgeslim.models.resnet_cifar import resnet20
    >>> new, rec = swap_backbone(resnet20(), (3, 32, 32), backbone="shufflenet_v2", width=0.5)
    >>> rec.split_node, rec.feature_shape, rec.backbone_shape, rec.downsample
    ('layer3_2_relu2', (64, 8, 8), (192, 8, 8), 2)
    """
    width = _check_args(backbone, width, target)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise EdgeslimError(f"input shape {input_shape} is not C,H,W: pass e.g. (3, 32, 32)")
    original = copy.deepcopy(model).eval()
    gm = capture(original, input_shape)
    feat, pool, head_nodes = find_split(gm)
    head = extract_head(gm, feat, head_nodes)
    feat_shape = tuple(feat.meta["shape"][1:])
    if len(feat_shape) != 3:
        raise EdgeslimError(f"the global pool's input {feat.name} has shape {feat_shape}, not C,H,W")

    k, extra = downsample_plan(input_shape[1:], feat_shape[1:])
    net = BACKBONES[backbone](in_channels=input_shape[0], width=width, downsample=k)
    net_shape = _shape(net, input_shape)
    act_kind = ops.act_name(gm, feat) if ops.kind(gm, feat) == "act" else None
    act = ACTIVATIONS[act_kind] if act_kind else None
    adapter, rows, notes = nn.Sequential(), [], []
    c, hw = net_shape[0], net_shape[1:]
    for i in range(extra):
        down = (c, _halve(hw[0], 1), _halve(hw[1], 1))
        adapter.add_module(f"down{i}", _dw_down(c, act))
        rows.append(Adapter(f"adapter.down{i}", f"Conv2d 3x3/2 depthwise {c} ch + BatchNorm2d"
                            + (f" + {act.__name__}" if act else ""), (c, *hw), down,
                            f"the original's features are {feat_shape[1]}x{feat_shape[2]}, smaller than the "
                            f"backbone's {MAX_DOWNSAMPLE} stride-2 layers reach"))
        hw = down[1:]
    if c != feat_shape[0]:
        layers = [nn.Conv2d(c, feat_shape[0], 1, bias=False), nn.BatchNorm2d(feat_shape[0]), *([act()] if act else [])]
        adapter.add_module("channels", nn.Sequential(*layers))
        why = f"the head's Linear reads {feat_shape[0]} channels, the backbone gives {c}"
        if act:
            why += (f"; {act.__name__} because the original's features end in {act_kind} "
                    "(the head saw non-negative inputs)")
        rows.append(Adapter("adapter.channels", f"Conv2d 1x1 {c}->{feat_shape[0]} + BatchNorm2d"
                            + (f" + {act.__name__}" if act else ""), (c, *hw), (feat_shape[0], *hw), why))
    if tuple(hw) != feat_shape[1:]:
        notes.append(f"the backbone's feature map is {hw[0]}x{hw[1]}, the original's {feat_shape[1]}x{feat_shape[2]}"
                     ": no stride schedule reaches it; the head pools globally, so the output shape is unchanged")
    notes.append("backbone and adapters are randomly initialized (no pretrained weights): fine-tune the whole "
                 "model with distillation from the original before use")

    new = SwappedModel(net, adapter, head).eval()
    if hasattr(model, "edgeslim_info"):
        new.edgeslim_info = model.edgeslim_info
    with torch.no_grad():
        x = torch.zeros(2, *input_shape)
        if new(x).shape != original(x).shape:  # a guard: the split and adapters should make this impossible
            raise EdgeslimError(f"the swapped model's output {tuple(new(x).shape)} differs from the original's "
                                f"{tuple(original(x).shape)}: report this model")
    params_before, macs_before = _cost(original, input_shape)
    params_after, macs_after = _cost(new, input_shape)  # capture: raises a one-line error if it does not trace
    unsupported_before = unsupported = None
    if target is not None:
        unsupported_before = target.unsupported(ptq.prepare(original, input_shape, PTQConfig()))
        unsupported = target.unsupported(ptq.prepare(new, input_shape, PTQConfig()))
        if unsupported:
            notes.append(f"{len(unsupported)} op(s) ({', '.join(sorted(set(unsupported.values())))}) have no integer "
                         f"kernel on {target.name}: they stay FP32")
    head_modules = tuple(str(n.target) for n in head.graph.nodes if n.op == "call_module")
    record = SwapRecord(backbone, width, input_shape, feat.name, pool.name, head_modules, feat_shape, net_shape,
                        k, tuple(rows), params_before, params_after, macs_before, macs_after,
                        target.name if target is not None else None, unsupported_before, unsupported, tuple(notes))
    return new, record
