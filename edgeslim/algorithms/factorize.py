"""Factorize heavy convolutions into cheaper ones, initialized by SVD (TTA guideline G2).

The TTA report (section 6.1.2, G2) recommends, for a convolution that dominates the MACs,
factorizing along the channel dimension (a 1x1 "bottleneck" before the heavy conv or transposed conv; its case
study puts a 1x1 conv before every deconv of PoseResNet) or across kernel and channel dimensions (a
depthwise-separable replacement), and *not* along the kernel dimension (3x3 kernels are what embedded
libraries optimize). Both replacements are linear in the weights, so each has a closed-form best
initialization: a truncated SVD (Eckart-Young), as in the low-rank conv approximations of Jaderberg et al.,
"Speeding up Convolutional Neural Networks with Low Rank Expansions" (BMVC 2014) and Zhang et al.,
"Efficient and Accurate Approximations of Nonlinear Convolutional Networks" (CVPR 2015).

Write a conv weight ``W`` as (O, I, kh, kw), k2 = kh * kw, and a Conv2d's output ``y_o = sum_i W[o, i] * x_i``.

* **depthwise-separable** (``depthwise_separable``): a depthwise kxk conv with ``m * I`` channels (depth
  multiplier ``m``, channel ``i*m + t`` reads input ``i``) then a 1x1 conv ``m*I -> O`` computes
  ``W[o, i] = sum_t pw[o, i*m+t] dw[i*m+t]``: each input channel's slice ``W[:, i]`` (O x k2) is a rank-m
  matrix. The best one in Frobenius norm is its top-m SVD, and the slices are independent, so the total
  error is ``sqrt(sum_i sum_{j>m} sigma_{i,j}^2)``; exact at ``m = min(O, k2)``.
  MACs per output pixel: ``m*I*(k2 + O)`` instead of ``O*I*k2``.
* **bottleneck** (``bottleneck``): a 1x1 conv ``I -> r`` (matrix B, r x I) then the kxk conv ``r -> O``
  (W', O x r x kh x kw) computes ``W[o, i] = sum_j W'[o, j] B[j, i]``, i.e. the (O*k2, I) matrix
  ``M[(o, tap), i]`` factorizes as ``A @ B``: a truncated SVD, exact at ``r = min(O*k2, I)``. A
  ConvTranspose2d (weight (I, O, kh, kw), ``y_o = sum_i convT(x_i, W[i, o])``) is linear in its input
  too, so the same 1x1 reduction goes before it: ``W[i, o] = sum_j B[j, i] W'[j, o]`` with the same
  (O*k2, I) matrix, ``M = W.reshape(I, O*k2).T`` and ``W' = A.T.reshape(r, O, kh, kw)``.

Singular values are split as ``sqrt(s)`` onto both factors so the two new weights have similar ranges (what
a later per-tensor quantizer wants). BN after a factorized conv stays where it is, after the Sequential.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import EdgeslimError
from ..graph.capture import capture
from ..quant.primitives import sqnr_db

__all__ = ["METHODS", "CONV_TYPES", "FactorizedLayer", "FactorizeRecord", "conv_macs", "factorized_macs", "full_rank",
           "rank_for", "depthwise_separable", "bottleneck", "composed_weight", "choose_layers", "factorize"]


METHODS = ("separable", "bottleneck")
CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class FactorizedLayer:
    """What one replacement did (``output_sqnr_db`` is None when the new layer is bit-exact)."""

    name: str
    op: str
    method: str
    rank: int  # the bottleneck width r, or the depth multiplier m for "separable"
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    weight_rel_error: float  # ||W - W_hat||_F / ||W||_F
    output_sqnr_db: float | None


@dataclass(frozen=True)
class FactorizeRecord:
    method: str
    macs_reduction: float | None
    rank: int | None
    model_macs_before: int  # conv + linear MACs for a batch of one
    model_macs_after: int
    model_params_before: int
    model_params_after: int
    layers: tuple[FactorizedLayer, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


# ----------------------------------------------------------------------------------------------- checks
def _check(conv: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise EdgeslimError(f"unknown factorization method {method!r}: use one of {', '.join(METHODS)}")
    if type(conv) not in CONV_TYPES:
        raise EdgeslimError(f"cannot factorize a {type(conv).__name__}: only nn.Conv2d and nn.ConvTranspose2d "
                            "are supported (factorize the float model before quantization)")
    if conv.groups != 1:
        raise EdgeslimError(f"cannot factorize a grouped conv (groups={conv.groups}): only groups=1 convs have "
                            "the dense channel mixing that factorization saves on")
    if tuple(conv.kernel_size) == (1, 1):
        raise EdgeslimError("cannot factorize a 1x1 conv: it has no kernel to separate from the channel mixing; "
                            "pick a conv with a kxk kernel (k > 1)")
    if method == "separable" and isinstance(conv, nn.ConvTranspose2d):
        raise EdgeslimError("depthwise-separable replacement supports nn.Conv2d only: use method='bottleneck' "
                            "for a ConvTranspose2d (a 1x1 reduction before the deconv, as in the TTA guideline G2)")


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise EdgeslimError(f"rank must be a positive integer, got {rank!r}: pass e.g. rank=8 or use macs_reduction")
    return rank


def _check_reduction(macs_reduction: object) -> float:
    if isinstance(macs_reduction, bool) or not isinstance(macs_reduction, (int, float)) \
            or not 0.0 < float(macs_reduction) < 1.0:
        raise EdgeslimError(f"macs_reduction must be in (0, 1) (the fraction of a layer's MACs to keep), got "
                            f"{macs_reduction!r}: pass e.g. 0.5")
    return float(macs_reduction)


# ------------------------------------------------------------------------------------------------ MACs
def _out_hw(conv: nn.Module, in_hw: tuple[int, int]) -> tuple[int, int]:
    out = []
    for d in range(2):
        k, s, dil, n = conv.kernel_size[d], conv.stride[d], conv.dilation[d], in_hw[d]
        if isinstance(conv, nn.ConvTranspose2d):
            out.append((n - 1) * s - 2 * conv.padding[d] + dil * (k - 1) + conv.output_padding[d] + 1)
        elif conv.padding == "same":
            out.append(n)
        else:
            p = 0 if conv.padding == "valid" else conv.padding[d]
            out.append((n + 2 * p - dil * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def conv_macs(conv: nn.Module, in_hw: tuple[int, int]) -> int:
    """MACs of one Conv2d / ConvTranspose2d for a batch of one on an ``in_hw`` input.

    Conv2d: ``Ho*Wo * O * (I/g) * k2``; ConvTranspose2d: every input pixel scatters ``(I/g) * O * k2`` products.
    """
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(conv, nn.ConvTranspose2d):
        return in_hw[0] * in_hw[1] * conv.in_channels * (conv.out_channels // conv.groups) * k2
    ho, wo = _out_hw(conv, in_hw)
    return ho * wo * conv.out_channels * (conv.in_channels // conv.groups) * k2


def factorized_macs(conv: nn.Module, in_hw: tuple[int, int], *, method: str, rank: int) -> int:
    """MACs of the replacement: separable ``Ho*Wo*m*I*(k2+O)``; bottleneck ``Hi*Wi*I*r`` + the kxk conv on r."""
    _check(conv, method)
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    i, o = conv.in_channels, conv.out_channels
    if method == "separable":
        ho, wo = _out_hw(conv, in_hw)
        return ho * wo * rank * i * (k2 + o)
    reduce = in_hw[0] * in_hw[1] * i * rank
    return reduce + conv_macs(conv, in_hw) // i * rank


def full_rank(conv: nn.Module, method: str) -> int:
    """The smallest rank (multiplier) at which the factorization is exact: min(O, k2) or min(O*k2, I)."""
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    return min(conv.out_channels, k2) if method == "separable" else min(conv.out_channels * k2, conv.in_channels)


def rank_for(conv: nn.Module, in_hw: tuple[int, int], *, method: str, macs_reduction: float) -> int:
    """The largest rank whose MACs are at most ``macs_reduction`` x the conv's.

    (The full rank always costs more than the conv itself, so the cap at ``full_rank`` is only a guard.)
    """
    _check(conv, method)
    frac = _check_reduction(macs_reduction)
    budget = frac * conv_macs(conv, in_hw)
    per_rank = factorized_macs(conv, in_hw, method=method, rank=1)  # MACs are linear in the rank
    rank = min(int(budget // per_rank), full_rank(conv, method))
    if rank < 1:
        cost = per_rank / conv_macs(conv, in_hw)
        raise EdgeslimError(f"macs_reduction={frac} is below what rank 1 costs ({cost:.3f} of the layer's MACs) "
                            f"for this {method} factorization: raise macs_reduction")
    return rank


# -------------------------------------------------------------------------------------------- builders
def _low_rank(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``mat`` (..., M, N): left (..., M, r) @ right (..., r, N), sqrt(s) each side.

    Ranks beyond min(M, N) get zero factors (the product is already exact there).
    """
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    q = min(rank, s.shape[-1])
    root = s[..., :q].sqrt()
    left, right = u[..., :, :q] * root[..., None, :], vh[..., :q, :] * root[..., :, None]
    if rank > q:
        left, right = F.pad(left, (0, rank - q)), F.pad(right, (0, 0, 0, rank - q))
    return left, right


def depthwise_separable(conv: nn.Conv2d, multiplier: int = 1) -> nn.Sequential:
    """Replace ``conv`` by depthwise kxk (``multiplier * I`` channels) -> pointwise 1x1, SVD-initialized.

    Each input channel's slice ``W[:, i]`` (O x k2) becomes its best rank-``multiplier`` approximation;
    ``multiplier = min(O, k2)`` reproduces the conv exactly. Stride, padding, dilation and padding mode go to
    the depthwise conv, the bias to the pointwise conv.

    >>> sep = depthwise_separable(nn.Conv2d(64, 64, 3, padding=1), multiplier=2)
    >>> sep[0].groups, sep[1].in_channels
    (64, 128)
    """
    _check(conv, "separable")
    m = _check_rank(multiplier)
    w = conv.weight.detach()
    like = {"device": w.device, "dtype": w.dtype}
    o, i, kh, kw = w.shape
    left, right = _low_rank(w.permute(1, 0, 2, 3).reshape(i, o, kh * kw), m)  # (I, O, m), (I, m, k2)
    dw = nn.Conv2d(i, i * m, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=i, bias=False, padding_mode=conv.padding_mode, **like)
    pw = nn.Conv2d(i * m, o, 1, bias=conv.bias is not None, **like)
    with torch.no_grad():
        dw.weight.copy_(right.reshape(i * m, 1, kh, kw))
        pw.weight.copy_(left.permute(1, 0, 2).reshape(o, i * m, 1, 1))
        if conv.bias is not None:
            pw.bias.copy_(conv.bias)
    return nn.Sequential(dw, pw)


def bottleneck(conv: nn.Conv2d | nn.ConvTranspose2d, rank: int) -> nn.Sequential:
    """Replace ``conv`` by a 1x1 conv ``I -> rank`` then the same kxk conv (or deconv) ``rank -> O``.

    The (O*k2, I) weight matrix is replaced by its truncated SVD ``A @ B``: B is the 1x1 conv, A (reshaped
    back) the kxk conv, which keeps stride, padding, dilation, output padding and bias. Exact at
    ``rank >= min(O*k2, I)``.

    >>> bottleneck(nn.ConvTranspose2d(256, 256, 4, stride=2, padding=1), rank=64)[1].in_channels
    64
    """
    _check(conv, "bottleneck")
    r = _check_rank(rank)
    w = conv.weight.detach()
    like = {"device": w.device, "dtype": w.dtype}
    is_t = isinstance(conv, nn.ConvTranspose2d)
    if is_t:
        i, o, kh, kw = w.shape
        mat = w.reshape(i, o * kh * kw).T
    else:
        o, i, kh, kw = w.shape
        mat = w.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
    a, b = _low_rank(mat, r)  # (O*k2, r), (r, I)
    reduce = nn.Conv2d(i, r, 1, bias=False, **like)
    if is_t:
        heavy: nn.Module = nn.ConvTranspose2d(r, o, (kh, kw), stride=conv.stride, padding=conv.padding,
                                              output_padding=conv.output_padding, dilation=conv.dilation,
                                              bias=conv.bias is not None, padding_mode=conv.padding_mode, **like)
        heavy_w = a.T.reshape(r, o, kh, kw)
    else:
        heavy = nn.Conv2d(r, o, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          bias=conv.bias is not None, padding_mode=conv.padding_mode, **like)
        heavy_w = a.reshape(o, kh, kw, r).permute(0, 3, 1, 2)
    with torch.no_grad():
        reduce.weight.copy_(b.reshape(r, i, 1, 1))
        heavy.weight.copy_(heavy_w)
        if conv.bias is not None:
            heavy.bias.copy_(conv.bias)
    return nn.Sequential(reduce, heavy)


def composed_weight(seq: nn.Sequential) -> torch.Tensor:
    """The single conv weight a factorized Sequential computes (float64), in the original layout."""
    first, second = seq[0], seq[1]
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    if tuple(first.kernel_size) != (1, 1):  # depthwise -> pointwise
        i, m = first.groups, first.out_channels // first.groups
        dw, pw = w1.reshape(i, m, -1), w2.reshape(second.out_channels, i, m)
        return torch.einsum("oit,itk->oik", pw, dw).reshape(second.out_channels, i, *first.kernel_size)
    b = w1.flatten(1)  # (r, I)
    if isinstance(second, nn.ConvTranspose2d):
        return torch.einsum("rohw,ri->iohw", w2, b)
    return torch.einsum("orhw,ri->oihw", w2, b)


# ------------------------------------------------------------------------------------- model level
def _conv_nodes(gm: fx.GraphModule) -> dict[str, tuple[nn.Module, tuple[int, int], int]]:
    """Module path -> (conv, input H x W, MACs summed over its calls) for every conv in graph order."""
    found: dict[str, tuple[nn.Module, tuple[int, int], int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, CONV_TYPES):
            continue
        in_hw = tuple(node.args[0].meta["shape"][2:4])
        prev = found.get(str(node.target))
        found[str(node.target)] = (mod, prev[1] if prev else in_hw, (prev[2] if prev else 0) + conv_macs(mod, in_hw))
    return found


def _model_macs(gm: fx.GraphModule) -> int:
    total = sum(v[2] for v in _conv_nodes(gm).values())
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            lin = gm.get_submodule(str(node.target))
            total += math.prod(node.meta["shape"][1:-1]) * lin.in_features * lin.out_features
    return total


def _factorizable(mod: nn.Module) -> bool:
    return type(mod) in CONV_TYPES and mod.groups == 1 and tuple(mod.kernel_size) != (1, 1)


def choose_layers(model: nn.Module, input_shape: tuple[int, ...], *, share: float = 0.5,
                  top_k: int | None = None) -> list[str]:
    """The convs worth factorizing: heaviest first (ties: more parameters, then graph order) until they cover
    ``share`` of all conv MACs, or the ``top_k`` heaviest. 1x1, depthwise and grouped convs are skipped.

    >>> from edgeslim.models.resnet_cifar import resnet20
    >>> len(choose_layers(resnet20(), (3, 32, 32), share=0.5))
    9
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise EdgeslimError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k is None and not 0.0 < share <= 1.0:
        raise EdgeslimError(f"share must be in (0, 1] (the fraction of conv MACs to cover), got {share!r}")
    convs = _conv_nodes(capture(copy.deepcopy(model), input_shape))
    total = sum(v[2] for v in convs.values())
    order = {name: n for n, name in enumerate(convs)}
    ranked = sorted((name for name, (mod, _, _) in convs.items() if _factorizable(mod)),
                    key=lambda name: (-convs[name][2], -convs[name][0].weight.numel(), order[name]))
    if top_k is not None:
        return ranked[:top_k]
    chosen, covered = [], 0
    for name in ranked:
        if covered >= share * total:
            break
        chosen.append(name)
        covered += convs[name][2]
    return chosen


def _output_sqnr(old: nn.Module, new: nn.Module, in_shape: tuple[int, ...], seed: int) -> float | None:
    w = old.weight
    x = torch.randn((2, *in_shape[1:]), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    with torch.no_grad():
        ref, out = old(x.to(w.device, w.dtype)), new(x.to(w.device, w.dtype))
    value = sqnr_db(ref, out)
    return None if math.isinf(value) else value


def factorize(model: nn.Module, input_shape: tuple[int, ...], *, layers: list[str] | None = None,
              method: str = "separable", macs_reduction: float = 0.5,
              rank: int | None = None) -> tuple[nn.Module, FactorizeRecord]:
    """Replace the chosen convs of a deep copy of ``model`` by SVD-initialized factorizations (the TTA guideline G2).

    ``layers`` are module paths (``layer3.0.conv2``); None picks ``choose_layers(model, input_shape)``.
    ``rank`` (the bottleneck width, or the depth multiplier for "separable") applies to every layer; without it
    each layer gets the largest rank that keeps at most ``macs_reduction`` of its MACs. The result still
    traces with torch.fx; fine-tuning it afterwards recovers most of the approximation loss.

    >>> from edgeslim.models.resnet_cifar import resnet20
    >>> new, rec = factorize(resnet20(), (3, 32, 32), macs_reduction=0.5)
    >>> rec.model_macs_after < rec.model_macs_before
    True
    """
    if method not in METHODS:
        raise EdgeslimError(f"unknown factorization method {method!r}: use one of {', '.join(METHODS)}")
    if rank is not None:
        _check_rank(rank)
    else:
        macs_reduction = _check_reduction(macs_reduction)
    new = copy.deepcopy(model).eval()
    gm = capture(copy.deepcopy(new), input_shape)
    convs = _conv_nodes(gm)
    in_shapes = {str(n.target): n.args[0].meta["shape"] for n in gm.graph.nodes if str(n.target) in convs}
    names = choose_layers(model, input_shape) if layers is None else list(layers)
    rows = []
    for n, name in enumerate(names):
        if name not in convs:
            raise EdgeslimError(f"layer {name!r} is not a conv called in the model's forward: pass module paths "
                                f"such as {next(iter(convs), 'conv1')!r}")
        conv, in_hw, macs = convs[name]
        _check(conv, method)
        r = rank if rank is not None else rank_for(conv, in_hw, method=method, macs_reduction=macs_reduction)
        seq = depthwise_separable(conv, r) if method == "separable" else bottleneck(conv, r)
        w = conv.weight.detach().double()
        err = float(torch.linalg.norm(composed_weight(seq) - w) / torch.linalg.norm(w).clamp_min(1e-300))
        calls = macs // conv_macs(conv, in_hw)
        rows.append(FactorizedLayer(
            name, type(conv).__name__, method, r, macs, calls * factorized_macs(conv, in_hw, method=method, rank=r),
            sum(p.numel() for p in conv.parameters()), sum(p.numel() for p in seq.parameters()), err,
            _output_sqnr(conv, seq, in_shapes[name], seed=n)))
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, attr, seq)
    after = capture(copy.deepcopy(new), input_shape)  # raises a one-line EdgeslimError if it no longer traces
    record = FactorizeRecord(
        method, None if rank is not None else macs_reduction, rank, _model_macs(gm), _model_macs(after),
        sum(p.numel() for p in model.parameters()), sum(p.numel() for p in new.parameters()), tuple(rows))
    return new, record
