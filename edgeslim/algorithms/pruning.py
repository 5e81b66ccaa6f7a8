"""Pruning (TTA guideline G5): channel pruning for speed, magnitude pruning for memory.

The report's advice: unstructured weight pruning only saves memory (the zeros are still multiplied on
dense hardware), so use it when storage is the problem, and set the rate before training since fine-tuning
must recover the accuracy; removing whole channels (He et al. 2017, "Channel Pruning"; Li et al. 2017,
"Pruning Filters for Efficient ConvNets") gives a smaller *dense* model that is faster everywhere.

* ``prune_channels``: groups from ``graph.dependency``, scored by an importance criterion (a small callable,
  style rule 8), removed uniformly (``ratio``) or by a global ranking until a MACs budget is met
  (``target_macs``); the kept weights are copied into smaller layers. ``PruneRecord`` / ``replay`` repeat it.
* ``magnitude_prune`` / ``GradualSchedule`` (Zhu & Gupta 2017, "To prune, or not to prune") /
  ``remove_masks``: masks as ``torch.nn.utils.parametrize`` so fine-tuning keeps pruned weights at zero.
* ``sparse_size_bytes`` / ``write_sparse`` / ``read_sparse``: what the zeros really save on disk.

>>> small, record = prune_channels(resnet20(), (3, 32, 32), target_macs=0.7)
>>> record.macs_after / record.macs_before <= 0.7
True
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import EdgeslimError
from ..eval.profile import profile
from ..graph.capture import capture
from ..graph.dependency import ChannelGroup, find_groups, remove_channels
from ..io.atomic import atomic_write_bytes

__all__ = ["L1Importance", "L2Importance", "BNScaleImportance", "TaylorImportance", "accumulate_gradients",
           "PruneRecord", "prune_channels", "replay", "WeightMask", "magnitude_prune", "remove_masks",
           "GradualSchedule", "TensorSize", "SparseSize", "sparse_size_bytes", "write_sparse", "read_sparse"]


# ---- importance criteria: __call__(group, gm) -> one score per channel ---------------------------------
def _rows(group: ChannelGroup, gm: fx.GraphModule, roles=("out", "dw")) -> list[tuple[str, torch.Tensor]]:
    """(role, weight rows of the group's channels, one row per channel) for each member in ``roles``."""
    out = []
    for m in group.members:
        if m.role in roles:
            w = gm.get_submodule(m.module).weight.detach()
            out.append((m.role, w[list(m.indices)].reshape(group.size, -1)))
    return out


class L1Importance:
    """Sum of |w| of each channel's output filters (Li et al. 2017), summed over the group's producers."""

    def __call__(self, group: ChannelGroup, gm: fx.GraphModule) -> torch.Tensor:
        return sum((w.abs().sum(1) for _, w in _rows(group, gm)), torch.zeros(group.size))


class L2Importance:
    """Euclidean norm of each channel's output filters, summed over the group's producers."""

    def __call__(self, group: ChannelGroup, gm: fx.GraphModule) -> torch.Tensor:
        return sum((w.norm(dim=1) for _, w in _rows(group, gm)), torch.zeros(group.size))


class BNScaleImportance:
    """|gamma| of the BatchNorms in the group (Liu et al. 2017, network slimming); L1 for groups without BN."""

    def __call__(self, group: ChannelGroup, gm: fx.GraphModule) -> torch.Tensor:
        rows = _rows(group, gm, ("bn",))
        return sum((w.abs().sum(1) for _, w in rows), torch.zeros(group.size)) if rows else L1Importance()(group, gm)


class TaylorImportance:
    """First-order Taylor estimate |w * dL/dw| summed over every parameter of the channel, in every member
    (Molchanov et al. 2017, "Pruning CNNs for resource efficient inference"; 2019 for the weight form).

    Needs gradients: call ``accumulate_gradients(model, batches, loss_fn)`` first.
    """

    def __call__(self, group: ChannelGroup, gm: fx.GraphModule) -> torch.Tensor:
        score = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            mod = gm.get_submodule(m.module)
            axis = 1 if m.role == "in" else 0
            params = [mod.weight] if m.role == "in" else [p for p in (mod.weight, mod.bias) if p is not None]
            for p in params:
                if p.grad is None:
                    raise EdgeslimError(f"TaylorImportance needs gradients but {m.module} has none: call "
                                        "accumulate_gradients(model, batches, loss_fn) first")
                t = (p.detach() * p.grad).abs().double().movedim(axis, 0)[list(m.indices)]
                score += t.reshape(group.size, -1).sum(1)
        return score.float()


def accumulate_gradients(model: nn.Module, batches, loss_fn) -> nn.Module:
    """Sum ``loss_fn(model(x), y)`` gradients over ``batches`` of ``(x, y)`` into ``.grad`` (eval mode: the
    BN statistics are not changed). Returns ``model``."""
    model.eval().zero_grad(set_to_none=True)
    for x, y in batches:
        loss_fn(model(x), y).backward()
    return model


# ---- the record --------------------------------------------------------------------------------------
@dataclass
class PruneRecord:
    """What ``prune_channels`` removed, as plain JSON: enough to ``replay`` it on a fresh model."""

    input_shape: tuple[int, ...]
    criterion: str
    groups: list[dict] = field(default_factory=list)  # name, size, members, kept, removed, ratio
    ratio: float | None = None
    target_macs: float | None = None
    round_to: int = 1
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, json.dumps(asdict(self), indent=1).encode(), "pruning record")

    @classmethod
    def load(cls, path: str | Path) -> PruneRecord:
        data = json.loads(Path(path).read_text())
        data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)


# ---- channel pruning ---------------------------------------------------------------------------------
def prune_channels(model: nn.Module, input_shape: tuple[int, ...], *, ratio: float | None = None,
                   target_macs: float | None = None, importance=L1Importance(), round_to: int = 1,
                   protect: tuple[str, ...] = ()) -> tuple[fx.GraphModule, PruneRecord]:
    """Remove the least important channels of every prunable group; return (smaller model, record).

    ``ratio``: the same fraction of every group. ``target_macs``: remove channels by one global ranking
    (scores divided by their group's mean, so criteria compare across layers) until the MACs are at most
    ``target_macs`` times the original (0.7 = 30% of the MACs removed). Every group keeps at least one
    channel and a multiple of ``round_to``; groups with a member matching a ``protect`` pattern (fnmatch
    on module names) are left alone. The result is a GraphModule with the original module names.
    """
    if (ratio is None) == (target_macs is None):
        raise EdgeslimError("pass exactly one of ratio= (per group) or target_macs= (fraction of the MACs to keep)")
    for label, v in (("ratio", ratio), ("target_macs", target_macs)):
        if v is not None and not 0 < v < 1:
            raise EdgeslimError(f"{label}={v} is outside (0, 1): pass a fraction such as 0.3")
    if round_to < 1:
        raise EdgeslimError(f"round_to={round_to}: pass a positive channel multiple")
    gm = capture(model, tuple(input_shape))
    groups = find_groups(gm)
    cands = [g for g in groups if g.prunable and not any(fnmatch.fnmatch(m.module, p) for m in g.members
                                                             for p in protect)]
    if not cands:
        why = "; ".join(dict.fromkeys(g.reason for g in groups if g.reason))
        raise EdgeslimError(f"{type(model).__name__} has no prunable channel groups ({why[:200]}): nothing to prune")
    scores = {}
    for g in cands:
        s = torch.as_tensor(importance(g, gm)).detach().double().flatten()
        if s.numel() != g.size:
            raise EdgeslimError(f"{type(importance).__name__} gave {s.numel()} scores for group {g.name} of {g.size}")
        scores[g.name] = s
    if ratio is not None:
        removed = {g.name: _lowest(scores[g.name], g.size - _keep_count(g.size, ratio, round_to)) for g in cands}
    else:
        removed = _global_plan(gm, cands, scores, target_macs, round_to)
    removed = {k: v for k, v in removed.items() if v}
    pruned = remove_channels(gm, groups, removed)
    record = PruneRecord(tuple(input_shape), type(importance).__name__, ratio=ratio, target_macs=target_macs,
                         round_to=round_to, macs_before=_macs(gm), macs_after=_macs(pruned),
                         params_before=_params(gm), params_after=_params(pruned))
    for g in groups:
        if g.name in removed:
            rm = sorted(removed[g.name])
            record.groups.append({"name": g.name, "size": g.size, "ratio": len(rm) / g.size,
                                  "members": [[m.module, m.role, m.count] for m in g.members],
                                  "kept": [j for j in range(g.size) if j not in set(rm)], "removed": rm})
    return pruned, record


def replay(model: nn.Module, input_shape: tuple[int, ...], record: PruneRecord) -> fx.GraphModule:
    """Apply ``record``'s removals to ``model`` (a fresh copy of the model that was pruned)."""
    gm = capture(model, tuple(input_shape))
    groups = {g.name: g for g in find_groups(gm)}
    for r in record.groups:
        g = groups.get(r["name"])
        if g is None or g.size != r["size"] or [[m.module, m.role, m.count] for m in g.members] != r["members"]:
            raise EdgeslimError(f"prune record does not match this model at group {r['name']!r}: replay it on "
                                "the architecture it was made for")
    return remove_channels(gm, list(groups.values()), {r["name"]: r["removed"] for r in record.groups})


def _keep_count(size: int, ratio: float, round_to: int) -> int:
    keep = size - math.floor(size * ratio + 1e-9)
    keep = min(size, math.ceil(keep / round_to) * round_to)
    return max(keep, 1)


def _lowest(score: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.sort(score, stable=True).indices[:n].tolist()) if n > 0 else []


def _macs(gm: fx.GraphModule) -> int:
    return sum(r.macs for r in profile(gm))


def _params(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def _global_plan(gm, cands, scores, target, round_to) -> dict[str, list[int]]:
    """Remove chunks of ``round_to`` channels, lowest normalized score first, until MACs <= target."""
    layers = {}  # module -> [coef, in channels per group, out channels]; MACs = product (as eval.profile)
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        shape = node.meta.get("shape") or ()
        if isinstance(mod, nn.Conv2d):  # a depthwise conv has 1 input channel per group: MACs = coef * c
            layer = [int(np.prod(shape[2:])) * math.prod(mod.kernel_size), mod.in_channels // mod.groups,
                     mod.out_channels]
        elif isinstance(mod, nn.Linear):
            layer = [int(np.prod(shape[1:-1] or (1,))), mod.in_features, mod.out_features]
        else:
            continue
        layers.setdefault(str(node.target), [0, *layer[1:]])[0] += layer[0]  # a module called twice
    cost = lambda m: layers[m][0] * layers[m][1] * layers[m][2]  # noqa: E731
    total = original = sum(cost(m) for m in layers)
    budget = target * original
    chunks = []
    for gi, g in enumerate(cands):
        s = scores[g.name]
        s = s / s.mean() if s.mean() > 0 else torch.zeros_like(s)
        order = torch.sort(s, stable=True).indices.tolist()
        keeps = [k for k in range(g.size - 1, 0, -1) if k % round_to == 0]
        prev = g.size
        for ci, k in enumerate(keeps):
            chans = order[g.size - prev:g.size - k]
            chunks.append((float(s[chans].max()), gi, ci, chans))
            prev = k
    removed: dict[str, list[int]] = {g.name: [] for g in cands}
    for _, gi, _, chans in sorted(chunks, key=lambda c: c[:3]):
        if total <= budget:
            break
        g = cands[gi]
        removed[g.name] += chans
        for m in g.members:
            if m.module not in layers:
                continue
            before, layer = cost(m.module), layers[m.module]
            layer[1 if m.role == "in" else 2] -= len(chans) * m.count  # out / dw (a BN has no MACs)
            total += cost(m.module) - before
    if total > budget:
        raise EdgeslimError(f"target_macs={target} would prune everything: the fewest channels the prunable "
                            f"groups can keep still leave {total / original:.1%} of the MACs; raise target_macs")
    return removed


# ---- unstructured magnitude pruning --------------------------------------------------------------------
class WeightMask(nn.Module):
    """A parametrization ``w -> w * mask``: the optimizer updates ``original``, the model only sees kept
    weights, so pruned weights stay exactly zero during fine-tuning."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def _weighted(model: nn.Module, exclude) -> list[tuple[str, nn.Module]]:
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if exclude == "auto":  # the first conv and the last linear are small and sensitive (Han et al. 2015)
        first = next((n for n, m in mods if isinstance(m, nn.Conv2d)), None)
        last = next((n for n, m in reversed(mods) if isinstance(m, nn.Linear)), None)
        return [(n, m) for n, m in mods if n not in (first, last)]
    return [(n, m) for n, m in mods if not any(fnmatch.fnmatch(n, p) for p in exclude)]


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global",
                    exclude: str | tuple[str, ...] = "auto") -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-|w| Conv2d / Linear weights (Han et al. 2015), in place.

    ``scope="global"`` ranks all weights together, ``"layer"`` prunes each layer to ``sparsity``.
    ``exclude``: ``"auto"`` (the first conv and the last linear) or fnmatch patterns of module names.
    Called again (a schedule), it updates the masks; weights already at zero are pruned first. Returns the
    boolean keep-masks by parameter name (``layer1.0.conv1.weight``).
    """
    if scope not in ("global", "layer"):
        raise EdgeslimError(f"scope={scope!r}: pass 'global' or 'layer'")
    if not 0 <= sparsity < 1:
        raise EdgeslimError(f"sparsity={sparsity} is outside [0, 1): pass a fraction such as 0.8")
    mods = _weighted(model, exclude)
    if not mods:
        raise EdgeslimError("no Conv2d / Linear weights left to prune: check exclude=")
    flats = [m.weight.detach().abs().flatten() for _, m in mods]
    if scope == "global":
        keep = torch.ones(sum(f.numel() for f in flats), dtype=torch.bool)
        keep[torch.sort(torch.cat(flats), stable=True).indices[:round(sparsity * keep.numel())]] = False
        keeps = torch.split(keep, [f.numel() for f in flats])
    else:
        keeps = []
        for f in flats:
            k = torch.ones(f.numel(), dtype=torch.bool)
            k[torch.sort(f, stable=True).indices[:round(sparsity * f.numel())]] = False
            keeps.append(k)
    masks = {}
    for (name, mod), k in zip(mods, keeps):
        k = k.reshape(mod.weight.shape)
        existing = [p for p in mod.parametrizations["weight"] if isinstance(p, WeightMask)] \
            if parametrize.is_parametrized(mod, "weight") else []
        if existing:
            existing[0].mask.copy_(k)
        else:
            parametrize.register_parametrization(mod, "weight", WeightMask(k))
        masks[f"{name}.weight" if name else "weight"] = k
    return masks


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the zeros permanent: every masked weight becomes a plain parameter again (in place)."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight") and any(isinstance(p, WeightMask)
                                                             for p in mod.parametrizations["weight"]):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


@dataclass(frozen=True)
class GradualSchedule:
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, masks updated every ``frequency``
    steps from ``start_step`` (t0) to ``end_step`` (t0 + n dt). Call ``step(model, t)`` each optimizer step.
    """

    final_sparsity: float
    start_step: int
    end_step: int
    frequency: int = 100
    initial_sparsity: float = 0.0
    scope: str = "global"
    exclude: str | tuple[str, ...] = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.initial_sparsity <= self.final_sparsity < 1:
            raise EdgeslimError("GradualSchedule needs 0 <= initial_sparsity <= final_sparsity < 1")
        if not 0 <= self.start_step < self.end_step or self.frequency < 1:
            raise EdgeslimError("GradualSchedule needs 0 <= start_step < end_step and frequency >= 1")

    def sparsity(self, step: int) -> float:
        t = min(max(step, self.start_step), self.end_step)
        frac = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - frac) ** 3

    def step(self, model: nn.Module, step: int) -> float | None:
        """Re-compute the masks at an update step; returns the sparsity applied, or None between updates."""
        if not self.start_step <= step <= self.end_step:
            return None
        if (step - self.start_step) % self.frequency and step != self.end_step:
            return None
        s = self.sparsity(step)
        magnitude_prune(model, s, scope=self.scope, exclude=self.exclude)
        return s


# ---- honest size accounting ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]
    nnz: int
    format: str  # dense, bitmask (1 bit per weight + nonzero values) or csr (values + column indices + row ptrs)
    bytes: int
    dense_bytes: int


@dataclass(frozen=True)
class SparseSize:
    rows: tuple[TensorSize, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)


def _state(model_or_sd) -> dict[str, torch.Tensor]:
    """A plain state_dict; masked weights appear as their effective (zeroed) values under ``X.weight``."""
    if not isinstance(model_or_sd, nn.Module):
        return dict(model_or_sd)
    masked = {n: m for n, m in model_or_sd.named_modules() if parametrize.is_parametrized(m, "weight")}
    sd = {}
    for key, value in model_or_sd.state_dict().items():
        owner, sep, rest = key.rpartition("parametrizations.weight.")
        name = owner[:-1]  # "layer1.0.conv1." -> "layer1.0.conv1"
        if sep and name in masked:
            if rest == "original":
                sd[f"{owner}weight"] = masked[name].weight.detach()
            continue  # the masks themselves are not weights
        sd[key] = value
    return sd


def _formats(t: torch.Tensor, value_bits: float) -> dict[str, int]:
    n, nnz = t.numel(), int(torch.count_nonzero(t)) if t.numel() else 0
    vals = math.ceil(nnz * value_bits / 8)
    costs = {"dense": math.ceil(n * value_bits / 8)}
    if n:
        costs["bitmask"] = math.ceil(n / 8) + vals
    if t.dim() >= 2 and n:
        rows, cols = t.shape[0], n // t.shape[0]
        costs["csr"] = vals + nnz * (2 if cols <= 65536 else 4) + (rows + 1) * 4
    return costs


def sparse_size_bytes(model_or_state_dict, *, value_bits: int | None = None) -> SparseSize:
    """Bytes to store each tensor in its smallest format: dense, bitmask, or CSR (int16 / int32 column
    indices, int32 row pointers). ``value_bits=None`` uses each tensor's dtype (what ``write_sparse``
    writes); 8 asks what int8 weights would take. The TTA guideline G5: zeros save memory only when stored so."""
    rows = []
    for name, t in _state(model_or_state_dict).items():
        bits = value_bits if value_bits is not None else t.element_size() * 8
        costs = _formats(t, bits)
        fmt = min(costs, key=lambda k: (costs[k], list(costs).index(k)))
        rows.append(TensorSize(name, tuple(t.shape), int(torch.count_nonzero(t)) if t.numel() else 0, fmt,
                               costs[fmt], costs["dense"]))
    return SparseSize(tuple(rows))


def write_sparse(state_dict, path: str | Path) -> Path:
    """Write tensors in the formats ``sparse_size_bytes`` picks, as an uncompressed ``.npz`` (atomically)."""
    path, arrays, meta = Path(path), {}, {}
    for row, (name, t) in zip(sparse_size_bytes(state_dict).rows, _state(state_dict).items()):
        if t.dtype == torch.bfloat16:
            raise EdgeslimError(f"{name} is bfloat16, which .npz cannot hold: convert the state_dict to float32")
        a = t.detach().cpu().numpy()
        meta[name] = [row.format, list(a.shape), str(a.dtype)]
        if row.format == "dense":
            arrays[name] = a
        elif row.format == "bitmask":
            flat = a.reshape(-1)
            arrays[name + "@mask"], arrays[name + "@values"] = np.packbits(flat != 0), flat[flat != 0]
        else:
            m = a.reshape(a.shape[0], -1)
            r, c = np.nonzero(m)
            arrays[name + "@values"] = m[r, c]
            arrays[name + "@indices"] = c.astype(np.uint16 if m.shape[1] <= 65536 else np.uint32)
            arrays[name + "@indptr"] = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=m.shape[0]))]).astype(np.int32)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def read_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict written by ``write_sparse``, exactly."""
    out = {}
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(z["__meta__"].tobytes())
        for name, (fmt, shape, dtype) in meta.items():
            if fmt == "dense":
                a = z[name]
            elif fmt == "bitmask":
                keep = np.unpackbits(z[name + "@mask"], count=int(np.prod(shape))).astype(bool)
                a = np.zeros(keep.size, dtype=dtype)
                a[keep] = z[name + "@values"]
            else:
                ptr = z[name + "@indptr"]
                a = np.zeros((shape[0], int(np.prod(shape[1:]))), dtype=dtype)
                a[np.repeat(np.arange(shape[0]), np.diff(ptr)), z[name + "@indices"]] = z[name + "@values"]
            out[name] = torch.from_numpy(np.array(a).reshape(shape))
    return out
