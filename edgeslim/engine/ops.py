"""Integer operators of the engine, one function per ONNX / onnxruntime op name (numpy only).

Tensors are integer *codes* in the IntGraph's natural form (signed codes for signed ``QParams``), held
as int64 arrays; everything stays integer until an explicit requantization. Ops that onnxruntime
computes in float (QuantizeLinear, QLinearAdd, QLinearAveragePool, QLinearConcat, DequantizeLinear) mirror
its float32 arithmetic (measured bit-exact, see tests/engine/test_engine.py). onnxruntime stores a signed
8-bit code ``q`` as uint8 ``q + 128`` with zero point ``z + 128``; the integer ops only use ``q - z`` so
they are container independent (QLinearAdd / QLinearAveragePool take the offsets).

Requantization (``requantize``), ``mode``:

* ``"float"`` -- onnxruntime / MLAS (``MlasRequantizeOutput``): ``y = rint(float32(acc) * float32(m)) + zp``
  in float32 arithmetic, round half to even, then clamp. onnxruntime computes the multiplier itself in
  float32 as ``x_scale * w_scale / y_scale`` (see ``ort_multiplier``);
* ``"fixed"`` -- integer-only: ``y = (acc * m0 + 2**(shift-1)) >> shift`` in int64 (a single rounding,
  round half up, i.e. toward +inf), with ``multiplier ~= m0 * 2**-shift``, ``m0`` in [2**30, 2**31).
  This is gemmlowp's result without its double rounding (SaturatingRoundingDoublingHighMul followed by
  RoundingDivideByPOT rounds twice, half away from zero; the single rounding is what the fake-quant
  simulation models);
* ``"shift"`` -- power-of-two multipliers only (``m0 == 2**30``): ``y = (acc + 2**(s-1)) >> s`` with
  ``s = shift - 30`` (left shift when ``s <= 0``); bit-identical to ``"fixed"`` for such multipliers;
* ``"tflite"`` -- TFLite's ``MultiplyByQuantizedMultiplier`` (``tflite_ops``): ``m0`` / ``shift`` are then
  TFLite's 32-bit multiplier and signed shift (positive = left), as ``tflite_ops.conv_multipliers`` derives
  them from float32 scales; ``run(..., requant="tflite")`` also runs every other op as TFLite does
  (``tflite_run``).
"""

from __future__ import annotations

import numpy as np

from . import narrow

__all__ = ["ACC_MODES", "ort_multiplier", "requantize", "im2col", "conv_acc", "shift_terms", "conv_acc_shift",
           "QLinearConv", "gemm_int", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearRelu",
           "QLinearGlobalAveragePool", "QLinearAveragePool", "MaxPool", "Slice", "Pad", "Flatten", "Identity",
           "Reshape", "Transpose", "Gather", "LUT", "QuantizeLinear", "DequantizeLinear", "conv_transpose_acc",
           "QLinearConvTranspose", "RESIZE_COORD_MODES", "RESIZE_NEAREST_MODES", "Resize"]


ACC_MODES = ("float", "fixed", "shift", "tflite")


# ----------------------------------------------------------------------------- requantization

def ort_multiplier(in_scale: float, w_scale, out_scale: float) -> np.ndarray:
    """The float32 multiplier onnxruntime's QLinearConv / QGemm compute: ``x_scale * w_scale / y_scale``."""
    ws = np.asarray(w_scale, dtype=np.float32).reshape(-1)
    return (np.float32(in_scale) * ws / np.float32(out_scale)).astype(np.float32)


def requantize(acc: np.ndarray, multiplier, m0, shift, zp: int, lo: int, hi: int, mode: str = "float",
               axis: int = 1) -> np.ndarray:
    """int accumulator -> output codes in [lo, hi]. Per-channel parameters broadcast along ``axis``."""
    acc = np.asarray(acc, dtype=np.int64)

    def chan(v, dtype):
        v = np.asarray(v, dtype=dtype).reshape(-1)
        if v.size == 1:
            return v.reshape(())
        shape = [1] * acc.ndim
        shape[axis] = v.size
        return v.reshape(shape)

    if mode == "float":
        y = acc.astype(np.float32)  # in place from here: one float32 array
        y *= chan(multiplier, np.float32)
        np.rint(y, out=y)
        y += np.float32(zp)  # inexact only far outside [lo, hi], where the clip below decides anyway
        return np.clip(y, np.float32(lo), np.float32(hi), out=y).astype(np.int64)
    elif mode == "fixed":
        m, s = chan(m0, np.int64), chan(shift, np.int64)
        if np.any(np.asarray(shift) < 1) or np.any(np.asarray(shift) > 62):
            raise ValueError("fixed-point requantization needs 1 <= shift <= 62")
        y = (acc * m + (np.int64(1) << (s - 1))) >> s
    elif mode == "tflite":
        from .tflite_ops import multiply_by_quantized_multiplier
        y = multiply_by_quantized_multiplier(acc, chan(m0, np.int64), chan(shift, np.int64))
    elif mode == "shift":
        if np.any(np.asarray(m0) != 1 << 30):
            raise ValueError("shift requantization needs power-of-two multipliers (m0 == 2**30)")
        s = chan(shift, np.int64) - 30
        pos = np.maximum(s, 1)
        right = (acc + (np.int64(1) << (pos - 1))) >> pos
        y = np.where(s > 0, right, acc << np.maximum(-s, 0))
    else:
        raise ValueError(f"unknown requantization mode {mode!r}: use one of {ACC_MODES}")
    return np.clip(y + int(zp), lo, hi)


# ----------------------------------------------------------------------------- convolution

def im2col(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations, group: int) -> tuple[np.ndarray, tuple]:
    """(N, C, H, W) zero-point-corrected input -> (G, N*Ho*Wo, kh*kw*Cg) float columns.

    Padding is 0 (= the zero point). Columns are ordered (kh, kw, channel), channel fastest, as an NHWC
    accelerator walks the receptive field (the order of the 16-bit partial sums).
    """
    xp = np.pad(np.asarray(x, dtype=np.float64).transpose(0, 2, 3, 1),
                ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    return _cols(xp, kernel, strides, dilations, group)


def _cols(xp: np.ndarray, kernel, strides, dilations, group: int):
    """(N, Hp, Wp, C) padded NHWC input -> ((G, N*Ho*Wo, kh*kw*Cg) contiguous columns, (N, Ho, Wo)): one copy
    of a strided view of the receptive fields, columns ordered (kh, kw, channel)."""
    N, Hp, Wp, C = xp.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    v = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2))
    v = v[:, ::sh, ::sw, :, ::dh, ::dw]                  # (N, Ho, Wo, C, kh, kw), no copy
    Ho, Wo = v.shape[1], v.shape[2]
    Cg = C // group
    v = v.reshape(N, Ho, Wo, group, Cg, kh, kw).transpose(3, 0, 1, 2, 5, 6, 4)  # (G, N, Ho, Wo, kh, kw, Cg)
    return np.ascontiguousarray(v).reshape(group, N * Ho * Wo, kh * kw * Cg), (N, Ho, Wo)


def conv_acc(x: np.ndarray, x_zero_point: int, w: np.ndarray, w_zero_point, bias=None, *, strides=(1, 1),
             pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, accumulator_bits: int = 32,
             overflow: str = "saturate", observer=None, chunk_bytes: int = 1 << 26,
             count_events: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact integer convolution: sum((x - zx) * (w - zw)) + bias, (N, O, Ho, Wo) int64, plus overflow events (O,).

    im2col (``_cols``) by chunks of images, then one GEMM per chunk in the narrowest exact type (``narrow.gemm_type``
    of the bound ``max|x - zx| * max_o sum_k |w_ok - zw| + max|bias|``); a narrow accumulator goes through
    ``narrow.gemm_acc``. The result is an (N, O, Ho, Wo) view of NHWC memory (what the next convolution reads).
    ``observer(cols, wk, acc_without_bias, events)`` (G-batched) is called per chunk of images (overflow stats).
    ``count_events=False`` (no observer): the events are not wanted (``None`` is returned for them), so a
    wrapping narrow register is the exact sum wrapped once (wrap-around is addition modulo ``2**bits``: the
    register after every tap and the bias is the full sum modulo ``2**bits``, in any order).
    """
    x = np.asarray(x)
    w = np.asarray(w, dtype=np.int64)
    O, Cg, kh, kw = w.shape
    G, Og = group, O // group
    zw = np.asarray(w_zero_point, dtype=np.int64).reshape(-1)
    wc = w - (zw.reshape(-1, 1, 1, 1) if zw.size > 1 else zw.reshape(()))
    wk = wc.reshape(G, Og, Cg, kh * kw).transpose(0, 1, 3, 2).reshape(G, Og, kh * kw * Cg)
    b = None if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.int64).reshape(-1), (O,)).reshape(G, Og)
    zx = int(x_zero_point)
    dmax = max(int(x.max()) - zx, zx - int(x.min()), 0) if x.size else 0
    bound = dmax * int(np.abs(wk).sum(axis=2).max(initial=0)) + (0 if b is None else int(np.abs(b).max()))
    ftype = narrow.gemm_type(bound)
    N, _, H, W = x.shape
    xp = np.zeros((N, H + pads[0] + pads[2], W + pads[1] + pads[3], x.shape[1]), dtype=ftype)
    np.subtract(x.transpose(0, 2, 3, 1), np.int64(zx), out=xp[:, pads[0]:pads[0] + H, pads[1]:pads[1] + W],
                casting="unsafe")                    # exact: |x - zx| <= bound
    Ho = (xp.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    Wo = (xp.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.empty((N, max(Ho, 0), max(Wo, 0), O), dtype=np.int64)
    events = np.zeros(O, dtype=np.int64)
    per_image = max(1, xp[0].size * kh * kw * xp.itemsize)  # im2col bytes of one image (upper bound)
    step = max(1, min(N, chunk_bytes // per_image)) if N else 1
    fast = observer is None and (accumulator_bits >= 32 or (overflow == "wrap" and not count_events))
    wt = wk.astype(ftype).transpose(0, 2, 1)         # (G, K, Og)
    for i in range(0, N, step):
        cols, (n, _, _) = _cols(xp[i:i + step], (kh, kw), strides, dilations, G)
        dst = out[i:i + n].reshape(-1, G, Og)
        if fast:
            if G == 1:
                np.copyto(dst[:, 0], cols[0] @ wt[0], casting="unsafe")  # exact integers
            else:
                np.copyto(dst, np.matmul(cols, wt).transpose(1, 0, 2), casting="unsafe")
            continue
        acc, ev = narrow.gemm_acc(cols, wk, b, accumulator_bits=accumulator_bits, overflow=overflow)
        events += ev.reshape(O)
        if observer is not None:
            observer(cols, wk, acc - (0 if b is None else b[:, None, :]), ev.reshape(O))
        dst[...] = acc.transpose(1, 0, 2)
    if fast:
        if b is not None:
            out += b.reshape(O)
        if accumulator_bits < 32:  # the wrapped sum, in place; its events (steps that left the range) not counted
            lo = -(1 << (accumulator_bits - 1))
            out -= lo
            out &= (1 << accumulator_bits) - 1
            out += lo
            events = None
        elif bound >= 1 << (accumulator_bits - 1):  # else no accumulator value can overflow
            out, over = narrow.register(out, accumulator_bits, overflow)
            events = over.sum(axis=(0, 1, 2))
    return out.transpose(0, 3, 1, 2), events


def shift_terms(w: np.ndarray) -> int:
    """The most powers of two any weight code needs (set bits of ``|w|``): 1 for PoT codes, ``n`` for APoT."""
    a = np.abs(np.asarray(w, dtype=np.int64))
    return int(max((np.bitwise_count(a) if hasattr(np, "bitwise_count") else
                    np.vectorize(lambda v: bin(int(v)).count("1"))(a)).max(initial=0), 0))


def conv_acc_shift(x: np.ndarray, x_zero_point: int, w: np.ndarray, bias=None, *, strides=(1, 1), pads=(0, 0, 0, 0),
                   dilations=(1, 1), group: int = 1) -> np.ndarray:
    """The integer convolution without multiplications, for symmetric (zero point 0) PoT / APoT weight codes:
    each code is split into signed powers of two, ``w = sum_e sign * bit_e * 2^e``; every power ``e`` is a
    convolution with weights in {-1, 0, +1} (additions and subtractions only), shifted left by ``e``.
    Equals ``conv_acc`` exactly (a test checks it); numpy is not faster this way, a shift-add datapath is."""
    w = np.asarray(w, dtype=np.int64)
    sign, mag = np.sign(w), np.abs(w)
    acc = None
    for e in range(int(mag.max(initial=0)).bit_length()):
        term = sign * ((mag >> e) & 1)
        if not term.any():
            continue
        part, _ = conv_acc(x, x_zero_point, term, 0, None, strides=strides, pads=pads, dilations=dilations, group=group)
        part = np.left_shift(part, e)
        acc = part if acc is None else acc + part
    if acc is None:
        acc, _ = conv_acc(x, x_zero_point, w, 0, None, strides=strides, pads=pads, dilations=dilations, group=group)
    if bias is not None:
        acc = acc + np.asarray(bias, dtype=np.int64).reshape(1, -1, 1, 1)
    return acc


# ----------------------------------------------------------------------------- requantizing ops

def QLinearConv(x, x_zero_point, w, w_zero_point, bias=None, *, multiplier=None, m0=None, shift=None,
                y_zero_point: int, clamp: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                group: int = 1, requant: str = "float", accumulator_bits: int = 32, overflow: str = "saturate",
                observer=None, shift_add: bool = False, count_events: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Integer convolution + requantization -> (output codes, accumulator overflow events per filter; ``None``
    where ``count_events=False`` let ``conv_acc`` skip them). ``shift_add`` computes the accumulator with
    ``conv_acc_shift`` (symmetric weights, 32-bit accumulator)."""
    if shift_add and observer is None and accumulator_bits >= 32 and not np.any(np.asarray(w_zero_point)):
        acc = conv_acc_shift(x, x_zero_point, w, bias, strides=strides, pads=pads, dilations=dilations, group=group)
        return (requantize(acc, multiplier, m0, shift, y_zero_point, clamp[0], clamp[1], requant, axis=1),
                np.zeros(np.asarray(w).shape[0], np.int64))
    acc, events = conv_acc(x, x_zero_point, w, w_zero_point, bias, strides=strides, pads=pads, dilations=dilations,
                           group=group, accumulator_bits=accumulator_bits, overflow=overflow, observer=observer,
                           count_events=count_events)
    return requantize(acc, multiplier, m0, shift, y_zero_point, clamp[0], clamp[1], requant, axis=1), events


def gemm_int(x, x_zero_point, w, w_zero_point, bias=None, *, accumulator_bits: int = 32, overflow: str = "saturate",
             observer=None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) codes x (O, K) int weights -> exact accumulator (N, O) with bias, overflow events (O,)."""
    x = np.asarray(x, dtype=np.int64) - int(x_zero_point)
    w = np.asarray(w, dtype=np.int64)
    zw = np.asarray(w_zero_point, dtype=np.int64).reshape(-1)
    wk = (w - (zw.reshape(-1, 1) if zw.size > 1 else zw.reshape(())))[None]
    b = None if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.int64).reshape(-1), (w.shape[0],))[None]
    acc, ev = narrow.gemm_acc(x[None], wk, b, accumulator_bits=accumulator_bits, overflow=overflow)
    if observer is not None:
        observer(x[None], wk, acc - (0 if b is None else b[:, None, :]), ev.reshape(-1))
    return acc[0], ev.reshape(-1)


def QGemm(x, x_zero_point, w, w_zero_point, bias=None, *, x_scale=None, w_scale=None, multiplier=None, m0=None,
          shift=None, y_zero_point: int = 0, clamp=(-128, 127), float_output: bool = False, requant: str = "float",
          accumulator_bits: int = 32, overflow: str = "saturate", observer=None) -> tuple[np.ndarray, np.ndarray]:
    """x (N, K) @ w (O, K)^T; float output (onnxruntime: ``float32(acc) * float32(x_scale * w_scale)``)
    or requantized codes."""
    acc, ev = gemm_int(x, x_zero_point, w, w_zero_point, bias, accumulator_bits=accumulator_bits,
                       overflow=overflow, observer=observer)
    if float_output:
        scale = (np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32).reshape(-1)).astype(np.float32)
        return acc.astype(np.float32) * scale, ev
    return requantize(acc, multiplier, m0, shift, y_zero_point, clamp[0], clamp[1], requant, axis=1), ev


def _fma32(x, y, z, offset: int = 0) -> np.ndarray:
    """float32 fused multiply-add ``x * (y + offset) + z``, emulated in float64 (the product is exact there:
    float32 times a code)."""
    t = np.add(y, offset, dtype=np.float64)  # exact: integer codes
    t *= np.float64(x)
    z = np.asarray(z, dtype=np.float64)
    t = np.add(t, z, out=t if np.broadcast_shapes(t.shape, z.shape) == t.shape else None)
    return t.astype(np.float32)


def QLinearAdd(a, a_scale: float, a_zero_point: int, b, b_scale: float, b_zero_point: int, y_scale: float,
               y_zero_point: int, clamp: tuple[int, int], *, requant: str = "float", offsets=(0, 0, 0)) -> np.ndarray:
    """Quantized add.

    ``requant="float"`` mirrors onnxruntime's x86 (AVX2) MLAS kernel, measured bit-exact on all 256 x 256
    input pairs for random scales: ``ra = sa / sy``, ``rb = sb / sy``, ``k = zy - (ra za + rb zb)`` in float32,
    then ``y = rint(fma(ra, a, fma(rb, b, k)))`` on the *stored* (uint8 container) values; ``offsets``
    are the container offsets (128 for signed 8-bit codes) of a, b, y.
    ``"fixed"`` / ``"shift"``: integer-only, both inputs rescaled at a common fixed point
    ``round(da * ra + db * rb)`` (single rounding, half up)."""
    oa, ob, oy = (int(o) for o in offsets)
    if requant == "float":
        f32 = np.float32
        ra, rb = f32(f32(a_scale) / f32(y_scale)), f32(f32(b_scale) / f32(y_scale))
        za, zb, zy = int(a_zero_point) + oa, int(b_zero_point) + ob, int(y_zero_point) + oy
        k = f32(zy) - (ra * f32(za) + rb * f32(zb))
        y = _fma32(ra, np.asarray(a, dtype=np.int64), _fma32(rb, np.asarray(b, dtype=np.int64), k, ob), oa)
        y = np.rint(y, out=y).astype(np.int64)
        y -= oy
        return np.clip(y, clamp[0], clamp[1], out=y)
    da = np.asarray(a, dtype=np.int64) - int(a_zero_point)
    db = np.asarray(b, dtype=np.int64) - int(b_zero_point)
    ra, rb = float(a_scale) / float(y_scale), float(b_scale) / float(y_scale)
    # 31 significant bits for the larger ratio (as quantize_multiplier), so da * ma stays far below 2^63
    s = max(1, 31 - max(int(np.frexp(ra)[1]), int(np.frexp(rb)[1])))
    ma, mb = round(ra * 2 ** s), round(rb * 2 ** s)
    y = (da * ma + db * mb + (1 << (s - 1))) >> s
    return np.clip(y + int(y_zero_point), clamp[0], clamp[1])


def QLinearMul(a, a_scale: float, a_zero_point: int, b, b_scale: float, b_zero_point: int, y_scale: float,
               y_zero_point: int, clamp: tuple[int, int], *, requant: str = "float", offsets=(0, 0, 0)) -> np.ndarray:
    """Quantized elementwise multiply (broadcasting as numpy).

    ``requant="float"`` mirrors onnxruntime's x86 MLAS kernel: the exact integer product
    ``(a - za) (b - zb)``, then ``rint(float32(product) * r + zy)`` in float32 with ``r = float32(sa * sb) / sy``
    (multiply, then add: no fused multiply-add), on the stored (uint8 container) zero point of y.
    ``"fixed"`` / ``"shift"``: ``round(product * r)`` at a 31-bit fixed point (single rounding, half up)."""
    oy = int(offsets[2])
    prod = (np.asarray(a, dtype=np.int64) - int(a_zero_point)) * (np.asarray(b, dtype=np.int64) - int(b_zero_point))
    if requant == "float":
        f32 = np.float32
        r = f32(f32(f32(a_scale) * f32(b_scale)) / f32(y_scale))
        y = np.rint(prod.astype(np.float32) * r + f32(int(y_zero_point) + oy)).astype(np.int64) - oy
        return np.clip(y, clamp[0], clamp[1])
    r = float(a_scale) * float(b_scale) / float(y_scale)
    s = max(1, 31 - int(np.frexp(r)[1]))
    m = round(r * 2 ** s)
    y = (prod * m + (1 << (s - 1))) >> s
    return np.clip(y + int(y_zero_point), clamp[0], clamp[1])


def _lut_requant(x, in_scale, in_zp, out_scale, out_zp, lo, hi):
    """float32 Q(DQ(x)) as onnxruntime computes it (dequantize, then divide and round half to even)."""
    f = (np.asarray(x, dtype=np.int64) - int(in_zp)).astype(np.float32) * np.float32(in_scale)
    return np.clip(np.rint(f / np.float32(out_scale)).astype(np.int64) + int(out_zp), lo, hi)


def QLinearConcat(xs, qps, y_scale: float, y_zero_point: int, clamp: tuple[int, int], axis: int = 1) -> np.ndarray:
    """Concatenate; inputs whose (scale, zero point) differ from the output are requantized in float32
    (onnxruntime's lookup table = Q(DQ(v)))."""
    parts = []
    for x, (s, z) in zip(xs, qps):
        x = np.asarray(x, dtype=np.int64)
        if np.float32(s) == np.float32(y_scale) and z == y_zero_point:
            parts.append(np.clip(x, clamp[0], clamp[1]))
        else:
            parts.append(_lut_requant(x, s, z, y_scale, y_zero_point, clamp[0], clamp[1]))
    return np.concatenate(parts, axis=axis)


def QLinearRelu(x, x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int,
                clamp: tuple[int, int]) -> np.ndarray:
    """Q(relu(DQ(x))) in float32 (what onnxruntime runs for DQ -> Relu -> Q); ``clamp`` on the output codes."""
    x = np.asarray(x, dtype=np.int64)
    x = np.maximum(x, int(x_zero_point))
    return _lut_requant(x, x_scale, x_zero_point, y_scale, y_zero_point, clamp[0], clamp[1])


def QLinearGlobalAveragePool(x, x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int,
                             clamp: tuple[int, int], keepdims: bool = True) -> np.ndarray:
    """onnxruntime / MLAS: integer sum over H*W minus zx*HW, then ``MlasRequantizeOutput`` with the float32
    scale ``x_scale / (y_scale * HW)``."""
    x = np.asarray(x, dtype=np.int64)
    hw = x.shape[2] * x.shape[3]
    acc = x.sum(axis=(2, 3), keepdims=keepdims) - int(x_zero_point) * hw
    scale = np.float32(x_scale) / (np.float32(y_scale) * np.float32(hw))
    return requantize(acc, scale, None, None, y_zero_point, clamp[0], clamp[1], "float")


def QLinearAveragePool(x, x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int,
                       clamp: tuple[int, int], kernel_shape, strides, offset: int = 0) -> np.ndarray:
    """Average pool without padding, onnxruntime's float32 arithmetic (contrib ``qlinear_pool.cc``):
    dequantize ``x_scale * (x - zx)``, sum the window row by row in float32, divide by the count, then
    ``rint(avg / y_scale + zy)`` with the stored (container) output zero point ``zy + offset``."""
    d = (np.asarray(x, dtype=np.int64) - int(x_zero_point)).astype(np.float32) * np.float32(x_scale)
    kh, kw = kernel_shape
    win = np.lib.stride_tricks.sliding_window_view(d, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    acc = np.zeros(win.shape[:4], dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            acc += win[..., i, j]
    avg = acc / np.float32(kh * kw)
    y = np.rint(avg / np.float32(y_scale) + np.float32(int(y_zero_point) + offset)).astype(np.int64) - offset
    return np.clip(y, clamp[0], clamp[1])


# ----------------------------------------------------------------------------- data movement

def MaxPool(x, kernel_shape, strides, pads=(0, 0, 0, 0)) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    kh, kw = kernel_shape
    if any(pads):
        lowest = np.iinfo(np.int64).min
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=lowest)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    return win.max(axis=(-1, -2))


def Slice(x, starts, ends, axes, steps=None) -> np.ndarray:
    idx = [slice(None)] * x.ndim
    for i, (s, e, a) in enumerate(zip(starts, ends, axes)):
        idx[a] = slice(s, e, steps[i] if steps else 1)
    return np.asarray(x)[tuple(idx)]


def Pad(x, pads, value: int) -> np.ndarray:
    nd = x.ndim
    return np.pad(np.asarray(x), [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=value)


def Flatten(x, axis: int = 1) -> np.ndarray:
    return np.asarray(x).reshape(int(np.prod(x.shape[:axis])), -1)


def Identity(x) -> np.ndarray:
    return np.asarray(x)


def Reshape(x, shape) -> np.ndarray:
    """ONNX Reshape (``allowzero=0``): a 0 copies the input's dimension, -1 is inferred."""
    x = np.asarray(x)
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def Transpose(x, perm) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(x), perm))


def Gather(x, axis: int, index: int) -> np.ndarray:
    """ONNX Gather with a scalar index: the axis is removed."""
    return np.take(np.asarray(x), index, axis=axis)


def LUT(x, table: np.ndarray, qmin: int) -> np.ndarray:
    """Elementwise activation on codes by table lookup: ``y = table[x - qmin]`` (one entry per input code).

    How integer NPUs run SiLU / sigmoid / hard-swish; the table is ``quantize(f(dequantize(q)))``."""
    return np.asarray(table)[np.asarray(x, dtype=np.int64) - qmin]


def QuantizeLinear(x, scale: float, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """MLAS: ``rint(float32(x) / float32(scale)) + zp`` (round half to even), saturated to [lo, hi]."""
    f = np.asarray(x, dtype=np.float32) / np.float32(scale)
    return np.clip(np.rint(f).astype(np.int64) + int(zero_point), lo, hi)


def DequantizeLinear(x, scale: float, zero_point: int) -> np.ndarray:
    return (np.asarray(x, dtype=np.int64) - int(zero_point)).astype(np.float32) * np.float32(scale)


# ----------------------------------------------------------------------------- transposed convolution

def conv_transpose_acc(x: np.ndarray, x_zero_point: int, w: np.ndarray, w_zero_point, bias=None, *, strides=(1, 1),
                       pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, output_padding=(0, 0),
                       accumulator_bits: int = 32, overflow: str = "saturate") -> tuple[np.ndarray, np.ndarray]:
    """Exact integer transposed convolution (ONNX ConvTranspose): ``sum((x - zx) * (w - zw)) + bias``.

    ``w`` is in ONNX ConvTranspose layout (C_in, C_out / group, kH, kW); ``w_zero_point`` per output channel
    or a single value. Scatter formulation: each kernel tap is one (M, C_in/g) x (C_in/g, C_out/g) float64
    GEMM (exact below 2**53) added in int64 into the full output at ``stride * h + dilation * i``, then the
    pads are cropped (``output_padding`` extends the bottom / right). The exact sum is fitted once into the
    ``accumulator_bits`` register (>= 32 only). Returns ((N, C_out, Ho, Wo) int64, overflow events (C_out,)).
    """
    if accumulator_bits < 32:
        raise ValueError("QLinearConvTranspose supports accumulator_bits >= 32 only")
    x = np.asarray(x, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    C, Og, kh, kw = w.shape
    O = Og * group
    Cg = C // group
    zw = np.asarray(w_zero_point, dtype=np.int64).reshape(-1)
    if zw.size > 1:  # per output channel: channel o = g * Og + j
        wc = w - zw.reshape(group, 1, Og, 1, 1).repeat(Cg, axis=1).reshape(C, Og, 1, 1)
    else:
        wc = w - zw.reshape(())
    N, _, H, W = x.shape
    sh, sw = strides
    dh, dw = dilations
    Hf = sh * (H - 1) + dh * (kh - 1) + 1 + int(output_padding[0])
    Wf = sw * (W - 1) + dw * (kw - 1) + 1 + int(output_padding[1])
    xd = (x - int(x_zero_point)).astype(np.float64).transpose(0, 2, 3, 1).reshape(N * H * W, group, Cg)
    wg = wc.astype(np.float64).reshape(group, Cg, Og, kh, kw)
    full = np.zeros((N, Hf, Wf, group, Og), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            tap = np.matmul(xd.transpose(1, 0, 2), wg[:, :, :, i, j])  # (G, M, Og)
            tap = np.rint(tap).astype(np.int64).transpose(1, 0, 2).reshape(N, H, W, group, Og)
            full[:, i * dh:i * dh + sh * (H - 1) + 1:sh, j * dw:j * dw + sw * (W - 1) + 1:sw] += tap
    Ho, Wo = Hf - pads[0] - pads[2], Wf - pads[1] - pads[3]
    acc = full[:, pads[0]:pads[0] + Ho, pads[1]:pads[1] + Wo].reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2)
    if bias is not None:
        acc = acc + np.broadcast_to(np.asarray(bias, dtype=np.int64).reshape(-1), (O,)).reshape(1, O, 1, 1)
    acc, over = narrow.register(acc, accumulator_bits, overflow)
    return np.ascontiguousarray(acc), over.sum(axis=(0, 2, 3))


def QLinearConvTranspose(x, x_zero_point, w, w_zero_point, bias=None, *, multiplier=None, m0=None, shift=None,
                         y_zero_point: int, clamp: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0),
                         dilations=(1, 1), group: int = 1, output_padding=(0, 0), requant: str = "float",
                         accumulator_bits: int = 32, overflow: str = "saturate") -> tuple[np.ndarray, np.ndarray]:
    """Integer transposed convolution + requantization -> (output codes, accumulator overflow events)."""
    acc, events = conv_transpose_acc(x, x_zero_point, w, w_zero_point, bias, strides=strides, pads=pads,
                                     dilations=dilations, group=group, output_padding=output_padding,
                                     accumulator_bits=accumulator_bits, overflow=overflow)
    return requantize(acc, multiplier, m0, shift, y_zero_point, clamp[0], clamp[1], requant, axis=1), events


# ----------------------------------------------------------------------------- resize (nearest, on codes)

RESIZE_COORD_MODES = ("half_pixel", "asymmetric", "pytorch_half_pixel", "align_corners")
RESIZE_NEAREST_MODES = ("round_prefer_floor", "floor", "ceil")  # round_prefer_ceil: onnxruntime differs at ties


def _resize_index(n_in: int, n_out: int, scale: np.float32, coord: str, nearest: str) -> np.ndarray:
    """Source index of each output position along one axis, onnxruntime's float32 arithmetic."""
    f32 = np.float32
    xr = np.arange(n_out, dtype=np.float32)
    if coord == "half_pixel":
        xo = (xr + f32(0.5)) / scale - f32(0.5)
    elif coord == "asymmetric":
        xo = xr / scale
    elif coord == "pytorch_half_pixel":
        xo = (xr + f32(0.5)) / scale - f32(0.5) if n_out > 1 else np.zeros_like(xr)
    elif coord == "align_corners":
        xo = xr * (f32(n_in - 1) / f32(n_out - 1)) if n_out > 1 else np.zeros_like(xr)
    else:
        raise ValueError(f"unsupported coordinate_transformation_mode {coord!r}: use one of {RESIZE_COORD_MODES}")
    xo = xo.astype(np.float32)
    if nearest == "floor":
        idx = np.floor(xo)
    elif nearest == "ceil":
        idx = np.ceil(xo)
    elif nearest == "round_prefer_floor":
        half = xo == np.floor(xo) + f32(0.5)
        x64 = xo.astype(np.float64)
        away = np.sign(x64) * np.floor(np.abs(x64) + 0.5)  # std::round: half away from zero (exact in float64)
        idx = np.where(half, np.floor(xo), away)
    else:
        raise ValueError(f"unsupported nearest_mode {nearest!r}: use one of {RESIZE_NEAREST_MODES}")
    return np.clip(idx.astype(np.int64), 0, n_in - 1)


def Resize(x, scales=None, sizes=None, coordinate_transformation_mode: str = "half_pixel",
           nearest_mode: str = "round_prefer_floor") -> np.ndarray:
    """Nearest-neighbour ONNX Resize of integer codes (data movement: the qparams are kept).

    ``scales`` (one float per axis; output size ``floor(n * scale)``) or ``sizes`` (one int per axis; the
    scale is ``float32(size) / float32(n)``, as onnxruntime computes it)."""
    x = np.asarray(x)
    out = x
    for ax in range(x.ndim):
        n = x.shape[ax]
        if sizes is not None:
            m = int(sizes[ax])
            scale = np.float32(m) / np.float32(n)
        else:
            scale = np.float32(scales[ax])
            m = int(np.float32(n) * scale)
        if m == n and scale == 1:
            continue
        idx = _resize_index(n, m, scale, coordinate_transformation_mode, nearest_mode)
        out = np.take(out, idx, axis=ax)
    return out
