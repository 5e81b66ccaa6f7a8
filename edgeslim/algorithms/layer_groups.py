"""Named groups of layers (a detector's backbone / neck / head, a model's top-level modules) by module-name
patterns, and the FP32 / INT8 combinations of them that ``sensitivity``'s group table scores (Shin and Shin's
Table 2)."""

from __future__ import annotations

import fnmatch
import glob

from torch import fx

from ..config import MixedPlan
from ..errors import EdgeslimError
from ..quant.precision import LayerPrecision
from . import ptq
from .mixed_precision import layer_costs

__all__ = ["default_groups", "parse_group", "check_groups", "group_plan", "group_combinations"]


def default_groups(gm: fx.GraphModule, max_groups: int = 6, folds: int = 4) -> dict[str, tuple[str, ...]]:
    """One group per top-level child module that holds weighted layers (``conv1``, ``layer1``, ..., ``linear``).

    A model with more than ``max_groups`` of them (a flat graph: an imported ONNX file, an ``nn.Sequential``)
    would get one group per layer and a table of two rows per layer; its top-level names (layers and the ops
    between them, in graph order) are folded instead into at most ``folds`` contiguous groups of about equal
    MACs, named ``first..last``, so the table keeps every combination of them (2 ** folds rows)."""
    macs: dict[str, int] = {}
    for c in layer_costs(gm):
        top = c.name.split(".", 1)[0]
        macs[top] = macs.get(top, 0) + c.macs + 1  # + 1: a layer without MACs still counts
    if len(macs) <= max_groups:
        return {top: (top, f"{top}.*") for top in macs}
    plan = set(ptq.plan_names(gm))
    tops = list(dict.fromkeys(name.split(".", 1)[0] for name in (ptq.op_name(gm, n) for n in gm.graph.nodes)
                              if name in plan))
    total, done, fold, lead = sum(macs.values()), 0, 0, []  # fold: where the last weighted top went
    members: list[list[str]] = [[] for _ in range(folds)]
    for top in tops:  # a weighted top goes where the middle of its MACs falls; the ops after it follow it
        if top in macs:
            fold = min(folds - 1, int((done + macs[top] / 2) * folds / total))  # midpoints only grow
            done += macs[top]
            members[fold] += lead + [top]
            lead = []
        elif done:
            members[fold].append(top)
        else:  # ops before the first layer go with it
            lead.append(top)
    groups = {}
    for m in (m for m in members if any(t in macs for t in m)):
        weighted = [t for t in m if t in macs]
        name = weighted[0] if len(weighted) == 1 else f"{weighted[0]}..{weighted[-1]}"
        groups[name] = tuple(p for t in m for p in (glob.escape(t), f"{glob.escape(t)}.*"))
    return groups


def parse_group(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"backbone=conv1|layer1.*|layer2.*"`` -> (``backbone``, patterns)."""
    name, sep, patterns = spec.partition("=")
    pats = tuple(p.strip() for p in patterns.replace(",", "|").split("|") if p.strip())
    if not sep or not name.strip() or not pats:
        raise EdgeslimError(f"invalid group {spec!r}: write NAME=PATTERN[|PATTERN...], e.g. head='head.*'")
    return name.strip(), pats


def check_groups(gm: fx.GraphModule, groups: dict[str, tuple[str, ...]]) -> None:
    names = ptq.layer_names(gm)
    for g, pats in groups.items():
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in pats):
            raise EdgeslimError(f"group {g!r} ({'|'.join(pats)}) matches no weighted layer: layers are "
                                f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")


def group_plan(groups: dict[str, tuple[str, ...]], precisions: dict[str, LayerPrecision]) -> MixedPlan:
    """A plan giving each named group its precision (groups not listed keep the default)."""
    rules = []
    for g, prec in precisions.items():
        rules += [(p, prec) for p in groups[g]]
        rules += [(f"{p}.*", prec) for p in groups[g] if not p.endswith("*")]  # ops inside a module
    return MixedPlan(tuple(rules))


def group_combinations(names: list[str], max_groups: int = 6) -> list[tuple[str, ...]]:
    """Which groups are quantized, for every row of Shin and Shin's Table 2: all subsets (up to 2^6), else
    none / each one alone / all but one / all."""
    k = len(names)
    if k <= max_groups:
        return [tuple(n for i, n in enumerate(names) if mask >> i & 1) for mask in range(2 ** k)]
    rows = [(), tuple(names)] + [(n,) for n in names] + [tuple(m for m in names if m != n) for n in names]
    return list(dict.fromkeys(rows))
