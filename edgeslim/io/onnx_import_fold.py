"""Shared pieces of the ONNX importer (``edgeslim.io.onnx_import``): ``Val``, the form every ONNX value takes,
attribute and dtype parsing, and the handlers of the shape / data-movement ops, which fold to constants.

Reshape, Shape, Gather, Slice, Concat, Constant, ... run on every value's example tensors, so shape arithmetic
(``Shape -> Gather -> Concat -> Reshape``) evaluates to constants at import; on tensors computed at run time they
become plain slicing or torch data-movement calls. A handler takes ``(importer, node, inputs, attrs)`` and returns
the node's output values in order; the op-name -> handler table is ``onnx_import_ops.OPS``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx

__all__ = ["Val", "BatchDependent", "attrs_of", "as_tensor", "torch_dtype", "norm_axis", "torch_pads", "fold_reshape",
           "fold_flatten", "fold_transpose", "fold_depth_to_space", "fold_space_to_depth", "fold_squeeze",
           "fold_unsqueeze", "fold_concat", "fold_split", "fold_slice", "fold_gather", "fold_pad", "fold_resize",
           "fold_identity", "fold_constant", "fold_shape", "fold_size", "fold_cast", "fold_constant_of_shape",
           "fold_range", "fold_expand", "fold_where"]


@dataclass(eq=False)
class Val:
    """One ONNX value: an fx node, or a folded constant (``node is None``); one example per batch variant."""

    node: fx.Node | None
    ex: tuple

    @property
    def const(self) -> bool:
        return self.node is None


class BatchDependent(Exception):
    """A shape that depends on the batch size reached a tensor op: import again for batch 1."""


def attrs_of(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def torch_dtype(onnx_type: int) -> torch.dtype:
    return as_tensor(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-axis begins / ends (first axis first) -> ``F.pad``'s pairs, last axis first, trailing zeros cut."""
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    while len(out) > 2 and out[-2:] == [0, 0]:
        out = out[:-2]
    return out


def _resolve_shape(target: list[int], shape: list[int], allowzero: bool) -> list[int]:
    out = [shape[i] if t == 0 and not allowzero else t for i, t in enumerate(target)]
    if -1 in out:
        known = math.prod(t for t in out if t != -1)
        out[out.index(-1)] = math.prod(shape) // known if known else 0
    return out


def fold_reshape(im, node, ins, at):
    x, target = ins
    if not target.const:
        raise im.error("has its target shape computed from tensor values at run time: not supported")
    allowzero = bool(at.get("allowzero", 0))
    wanted = [_resolve_shape([int(t) for t in target.ex[k].tolist()], list(x.ex[k].shape), allowzero)
              for k in range(im.nvar)]
    if x.const:
        return [Val(None, tuple(x.ex[k].reshape(wanted[k]) for k in range(im.nvar)))]
    if all(wanted[k] == list(x.ex[k].shape) for k in range(im.nvar)):
        return [Val(x.node, x.ex)]
    if im.rank(x) > 2 and all(w == [e.shape[0], math.prod(e.shape[1:])] for w, e in zip(wanted, x.ex)):
        return [im.call(torch.flatten, x, 1)]  # N x K: what the lowering knows as Flatten
    varying = [i for i in range(len(wanted[0])) if any(w[i] != wanted[0][i] for w in wanted)]
    if len(varying) > 1:
        raise BatchDependent
    final = [-1 if i in varying else t for i, t in enumerate(wanted[0])]  # the batch entry is left to torch
    return [im.call(torch.reshape, x, final)]


def fold_flatten(im, node, ins, at):
    x = ins[0]
    shape = im.shape(x)
    axis = norm_axis(int(at.get("axis", 1)), len(shape))
    if axis == 1:
        return [im.call(torch.flatten, x, 1)]
    if axis == 0:
        return [im.call(torch.reshape, x, [1, -1])]
    return [im.call(torch.reshape, x, [-1, math.prod(shape[axis:])])]


def fold_transpose(im, node, ins, at):
    perm = at.get("perm", list(range(im.rank(ins[0])))[::-1])
    return [im.call(torch.permute, ins[0], list(perm))]


def fold_depth_to_space(im, node, ins, at):
    """DepthToSpace: CRD is torch's pixel shuffle; DCR (the default) reorders as the ONNX spec writes it."""
    x, b = ins[0], int(at["blocksize"])
    _, c, h, w = im.shape(x)
    if at.get("mode", "DCR") == "CRD":
        return [im.call(F.pixel_shuffle, x, b)]
    y = im.call(torch.reshape, x, [-1, b, b, c // (b * b), h, w])
    y = im.call(torch.permute, y, [0, 3, 4, 1, 5, 2])
    return [im.call(torch.reshape, y, [-1, c // (b * b), h * b, w * b])]


def fold_space_to_depth(im, node, ins, at):
    """SpaceToDepth: CRD (opset 25's ``mode``) is torch's pixel unshuffle; DCR, the default, is reordered."""
    x, b = ins[0], int(at["blocksize"])
    _, c, h, w = im.shape(x)
    if at.get("mode", "DCR") == "CRD":
        return [im.call(F.pixel_unshuffle, x, b)]
    y = im.call(torch.reshape, x, [-1, c, h // b, b, w // b, b])
    y = im.call(torch.permute, y, [0, 3, 5, 1, 2, 4])
    return [im.call(torch.reshape, y, [-1, c * b * b, h // b, w // b])]


def _axes_of(im, ins, at) -> list[int] | None:
    if "axes" in at:
        return list(at["axes"])
    return im.ints(ins[1], "axes") if len(ins) > 1 else None


def fold_squeeze(im, node, ins, at):
    x = ins[0]
    rank, axes = im.rank(x), _axes_of(im, ins, at)
    if axes is None:
        axes = [i for i in range(rank) if all(e.shape[i] == 1 for e in x.ex)]
    axes = sorted(norm_axis(a, rank) for a in axes)
    if not axes:
        return [Val(x.node, x.ex)]
    return [im.call(torch.squeeze, x, axes[0] if len(axes) == 1 else tuple(axes))]


def fold_unsqueeze(im, node, ins, at):
    y = ins[0]
    axes = _axes_of(im, ins, at)
    out_rank = im.rank(y) + len(axes)
    for a in sorted(norm_axis(a, out_rank) for a in axes):
        y = im.call(torch.unsqueeze, y, a)
    return [y]


def fold_concat(im, node, ins, at):
    vals = [v for v in ins if v is not None and v.ex[0].numel() > 0] or [ins[0]]
    axis = norm_axis(int(at["axis"]), im.rank(vals[0]))
    if len(vals) == 1:
        return [Val(vals[0].node, vals[0].ex)]
    return [im.call(torch.cat, vals, axis)]


def _take(im, x: Val, axis: int, start: int, stop: int | None, step: int = 1) -> Val:
    index = (*(slice(None),) * axis, slice(start or None, stop, step if step != 1 else None))
    return im.call(operator.getitem, x, index)


def fold_split(im, node, ins, at):
    x = ins[0]
    axis = norm_axis(int(at.get("axis", 0)), im.rank(x))
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


def fold_slice(im, node, ins, at):
    x = ins[0]
    if im.opset < 10:
        starts, ends, axes, steps = at["starts"], at["ends"], at.get("axes"), None
    else:
        starts, ends = im.ints(ins[1], "starts"), im.ints(ins[2], "ends")
        axes = im.ints(ins[3], "axes") if len(ins) > 3 else None
        steps = im.ints(ins[4], "steps") if len(ins) > 4 else None
    rank = im.rank(x)
    axes = [norm_axis(a, rank) for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * (max(axes) + 1)
    if x.const:  # shape arithmetic (or reversing pads): numpy slicing has ONNX's semantics, negative steps too
        for a, b, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(b, e, st)
        return [Val(None, tuple(as_tensor(e.numpy()[tuple(index)]) for e in x.ex))]
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
        return [Val(x.node, x.ex)]
    return [im.call(operator.getitem, x, tuple(index))]


def fold_gather(im, node, ins, at):
    data, indices = ins
    axis = norm_axis(int(at.get("axis", 0)), im.rank(data))
    if not indices.const:
        raise im.error("gathers with indices computed at run time: not supported")
    if data.const:  # shape arithmetic
        return [Val(None, tuple(as_tensor(np.take(d.numpy(), i.numpy(), axis=axis))
                                 for d, i in zip(data.ex, indices.ex)))]
    idx = im.same(indices)
    dims = {e.shape[axis] for e in data.ex}
    if len(dims) != 1:
        raise im.error("gathers along the batch dimension: not supported with a dynamic batch")
    dim = dims.pop()
    flat = idx.reshape(-1).tolist()
    if any(not -dim <= i < dim for i in flat):
        raise im.error(f"has an index out of range for an axis of size {dim}")
    flat = [i % dim for i in flat]
    if idx.dim() == 0:
        return [im.call(torch.select, data, axis, flat[0])]
    steps = {b - a for a, b in zip(flat, flat[1:])}
    if idx.dim() == 1 and (len(flat) == 1 or (len(steps) == 1 and min(steps) > 0)):
        step = flat[1] - flat[0] if len(flat) > 1 else 1
        return [_take(im, data, axis, flat[0], flat[-1] + 1, step)]
    # any other list (a channel flip x[:, [2, 1, 0]], repeats, N-D indices): index_select, then the index shape
    y = im.call(torch.index_select, data, axis, Val(None, (torch.tensor(flat, dtype=torch.int64),) * im.nvar))
    if idx.dim() == 1:
        return [y]
    shape = im.shape(data)
    out = shape[:axis] + list(idx.shape) + shape[axis + 1:]
    if im.nvar > 1:
        out[0] = -1  # the batch (axis > 0 here) is left to torch
    return [im.call(torch.reshape, y, out)]


def fold_pad(im, node, ins, at):
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
    for i, a in enumerate([norm_axis(a, rank) for a in axes] if axes else range(n)):
        begins[a], ends[a] = pads[i], pads[n + i]
    pads_t = torch_pads(begins, ends)
    if not any(pads_t):
        return [Val(x.node, x.ex)]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(
        at.get("mode", "constant"))
    if mode is None:
        raise im.error(f"has mode '{at.get('mode')}': only constant, reflect, edge and wrap are supported")
    if mode == "constant":
        return [im.call(F.pad, x, pads_t, mode="constant", value=float(value or 0.0))]
    if len(pads_t) // 2 > rank - 2:
        raise im.error(f"pads the batch or channel dimension in mode '{at.get('mode')}': not supported")
    return [im.call(F.pad, x, pads_t, mode=mode)]


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


def fold_resize(im, node, ins, at):
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
                raise BatchDependent
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        rounding = at.get("nearest_mode", "round_prefer_floor")
    if at.get("antialias", 0) or at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise im.error("uses antialias / keep_aspect_ratio_policy: not supported")
    if "axes" in at:  # opset 18: scales / sizes for the listed axes only
        full_s, full_z = [1.0] * rank, list(shape)
        for i, a in enumerate(norm_axis(a, rank) for a in at["axes"]):
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
        if ctm == "align_corners" and scales and any(
                o > 1 and not math.isclose(shape[2 + i] * ratio[i], o, rel_tol=1e-6) for i, o in enumerate(out)):
            # ONNX maps by (in - 1) / (in * scale - 1), torch by (in - 1) / (out - 1): equal only for whole sizes
            raise im.error("uses align_corners with scales that do not give a whole output size, which torch does "
                           "not compute: re-export with sizes")
        if ctm == "pytorch_half_pixel" and 1 in out:  # ONNX reads position 0 where the output length is 1
            x = im.call(operator.getitem, x, (slice(None), slice(None),
                                              *(slice(0, 1) if o == 1 else slice(None) for o in out)))
            if "scale_factor" in kw:
                kw = {"scale_factor": tuple(1.0 if o == 1 else f for o, f in zip(out, kw["scale_factor"]))}
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        y = im.call(F.interpolate, x, mode=torch_mode, align_corners=ctm == "align_corners", **kw)
    else:
        raise im.error(f"uses mode={mode}, coordinate_transformation_mode={ctm}: only nearest and linear "
                       "(align_corners / half_pixel) resizing are supported")
    if im.shape(y)[2:] != out:
        raise im.error(f"resizes to {im.shape(y)[2:]} in torch but {out} in ONNX: re-export with sizes, not scales")
    return [y]


def fold_identity(im, node, ins, at):
    return [Val(ins[0].node, ins[0].ex)]


def fold_constant(im, node, ins, at):
    if "value" in at:
        t = as_tensor(numpy_helper.to_array(at["value"]))
    elif "value_float" in at or "value_int" in at:
        t = torch.tensor(at.get("value_float", at.get("value_int")),
                         dtype=torch.float32 if "value_float" in at else torch.int64)
    elif "value_floats" in at or "value_ints" in at:
        t = torch.tensor(list(at.get("value_floats", at.get("value_ints", []))),
                         dtype=torch.float32 if "value_floats" in at else torch.int64)
    else:
        raise im.error(f"has attributes {sorted(at)}: only numeric tensors are supported")
    return [Val(None, (t,) * im.nvar)]


def fold_shape(im, node, ins, at):
    start, end = int(at.get("start", 0)), at.get("end")
    return [Val(None, tuple(torch.tensor(list(e.shape)[start:end], dtype=torch.int64) for e in ins[0].ex))]


def fold_size(im, node, ins, at):
    return [Val(None, tuple(torch.tensor(e.numel(), dtype=torch.int64) for e in ins[0].ex))]


def fold_cast(im, node, ins, at):
    x = ins[0]
    try:
        dtype = torch_dtype(int(at["to"]))
    except Exception:  # bfloat16 / float8 / int4 / string have no numpy dtype torch takes
        raise im.error(f"casts to {onnx.TensorProto.DataType.Name(int(at['to']))}: only the numeric types of "
                       "numpy and torch are supported") from None
    if x.ex[0].dtype == dtype:
        return [Val(x.node, x.ex)]
    return [im.call("to", x, dtype)]


def fold_constant_of_shape(im, node, ins, at):
    value = as_tensor(numpy_helper.to_array(at["value"])).reshape(-1) if "value" in at else torch.zeros(1)
    if not ins[0].const:
        raise im.error("has its shape computed from tensor values at run time: not supported")
    return [Val(None, tuple(torch.full([int(d) for d in e.tolist()], value[0].item(), dtype=value.dtype)
                             for e in ins[0].ex))]


def fold_range(im, node, ins, at):
    if not all(v.const for v in ins):
        raise im.error("has run-time bounds: not supported")
    return [Val(None, tuple(torch.arange(ins[0].ex[k].item(), ins[1].ex[k].item(), ins[2].ex[k].item(),
                                          dtype=ins[0].ex[k].dtype) for k in range(im.nvar)))]


def fold_expand(im, node, ins, at):
    x, shape = ins
    if not shape.const:
        raise im.error("has its shape computed from tensor values at run time: not supported")
    outs = [list(torch.broadcast_shapes(tuple(x.ex[k].shape), tuple(shape.ex[k].tolist()))) for k in range(im.nvar)]
    if x.const:
        return [Val(None, tuple(x.ex[k].expand(outs[k]).clone() for k in range(im.nvar)))]
    if any(o != outs[0] for o in outs):
        raise BatchDependent
    return [im.call(torch.broadcast_to, x, outs[0])]


def fold_where(im, node, ins, at):
    return [im.call(torch.where, *ins)]
