"""Fake-quant modules: what an integer device computes, expressed with float tensors.

``QuantConv2d`` / ``QuantLinear`` are built with ``from_float`` and undone with ``to_float``;
``ActQuant`` sits on a graph edge and either observes (calibration) or fake-quantizes.
The bias is simulated as the int32 value the device stores (scale = input scale x weight scale),
so the PyTorch simulation matches the exported QDQ model.

What other algorithms change is declared here, each slot set through one method (``None`` when empty, so
an empty slot adds no ``state_dict`` key):

* ``QuantConv2d`` / ``QuantLinear``: ``wq`` (a trainable weight quantizer, ``set_weight_quantizer``: QAT),
  ``round_up`` (a learned rounding direction per weight, ``set_rounding``: AdaRound / BRECQ),
  ``bias_delta`` (a bias shift only the quantized layer adds, ``add_bias_correction``) and
  ``quant_enabled`` (False runs the float weights);
* ``ActQuant``: ``aq`` (a trainable or non-uniform activation quantizer, ``set_quantizer``) and ``mode``
  (one of ``MODES``).

Modes are switched for a whole graph by ``algorithms.ptq.set_mode`` / ``algorithms.ptq.mode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P
from .observers import OBSERVERS, mse_weight_range

__all__ = ["ACTIVATIONS", "MODES", "QuantSpec", "round_fp16", "float_fake_quant", "ConvAct", "QuantConv2d",
           "QuantLinear", "ActQuant", "GatedSiLU"]


ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, None: lambda x: x}
MODES = ("observe", "histogram", "quant", "off")  # what an ``ActQuant`` does; weights are float in ``off`` only


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized, by keyword only (``QuantSpec(bits=4, per_channel=True)``: no positional
    booleans). ``fmt`` ``fp16`` / ``fp32`` keeps it floating point (mixed precision): FP16 rounds the values to
    half precision (storage precision; the arithmetic stays FP32, as onnxruntime's CPU kernels do), FP32 leaves
    them untouched."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    pow2: bool = False
    fmt: str = "int"

    @property
    def is_float(self) -> bool:
        return self.fmt != "int"


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Values as stored in FP16 (round to nearest even), straight-through for gradients."""
    rounded = x.to(torch.float16).to(torch.float32)
    return x + (rounded - x).detach() if x.requires_grad else rounded


def float_fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return round_fp16(x) if spec.fmt == "fp16" else x


class ConvAct(nn.Module):
    """A convolution (BN already folded) followed by a fused activation: one output quantizer."""

    def __init__(self, conv: nn.Conv2d, act: str | None) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.act](self.conv(x))


class _QuantWeightMixin:
    """Shared weight fake-quant for conv and linear (weights are known, so qparams come at once)."""

    wq: nn.Module | None
    round_up: torch.Tensor | None
    bias_delta: torch.Tensor | None

    def _declare_slots(self) -> None:
        self.register_module("wq", None)
        self.register_buffer("bias_delta", None)
        self.register_buffer("round_up", None)
        self._fq_cache = None

    def _init_weight_quant(self, weight: torch.Tensor, spec: QuantSpec, use_mse: bool) -> None:
        self.spec = spec
        axis = 0 if spec.per_channel else None
        if spec.is_float:  # FP16 / FP32 weights: no integer grid (placeholders keep the buffers uniform)
            self.register_buffer("w_scale", torch.ones(()))
            self.register_buffer("w_zero_point", torch.zeros((), dtype=torch.int64))
            self.w_qmin, self.w_qmax, self.w_axis = 0, 0, None
            self.register_buffer("input_scale", torch.tensor(0.0))
            self.quant_enabled = True
            self._fq_key = None
            return
        if use_mse:
            lo, hi = mse_weight_range(weight, spec.bits, axis, spec.symmetric)
        elif axis is None:
            lo, hi = weight.min(), weight.max()
        else:
            flat = weight.detach().reshape(weight.shape[0], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        scale, zp = P.choose_qparams(lo, hi, spec.bits, symmetric=spec.symmetric, signed=True, pow2=spec.pow2)
        self.register_buffer("w_scale", scale.detach())
        self.register_buffer("w_zero_point", zp)
        self.w_qmin, self.w_qmax = P.qrange(spec.bits, True)
        self.w_axis = axis
        self.register_buffer("input_scale", torch.tensor(0.0))  # set after calibration, for the int32 bias
        self.quant_enabled = True  # False: run the float weights (reference runs, ``ptq.set_mode(gm, "off")``)
        self._fq_key = None

    def set_weight_spec(self, spec: QuantSpec, *, use_mse: bool = False) -> None:
        """Re-quantize the weights with another spec (mixed precision); the bias follows at ``freeze``.
        A learned rounding (``set_rounding``) belongs to the old grid and is dropped."""
        self.round_up = None
        self._init_weight_quant(self.weight, spec, use_mse)

    def set_rounding(self, round_up: torch.Tensor | None) -> None:
        """Fix each weight's rounding direction (AdaRound / BRECQ): code = ``floor(w / s) + round_up``,
        clamped to the range; ``None`` restores round-to-nearest. Codes stay on the same grid (same scale)."""
        self.round_up = None if round_up is None else round_up.detach().to(torch.bool).clone()
        self._fq_key = None

    def set_weight_quantizer(self, quantizer: nn.Module | None) -> None:
        """Fake-quantize the weights with ``quantizer(weight)`` instead of the fixed grid (quantization-aware
        training: ``algorithms.qat.attach`` / ``finish``); the bias stays float while it is set, since the
        scales move. ``None`` empties the slot."""
        self.wq = quantizer
        self._fq_key = None

    def add_bias_correction(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the bias the quantized layer uses (``algorithms.bias_correction``); the float
        reference (``quant_enabled=False``) never sees it."""
        self.bias_delta = delta if self.bias_delta is None else self.bias_delta + delta

    def weight_int(self) -> torch.Tensor:
        if self.spec.is_float:
            raise ValueError(f"weights are {self.spec.fmt}: no integer codes")
        if self.round_up is not None:
            return P.quantize_directed(self.weight, self.w_scale, self.w_zero_point, self.w_qmin, self.w_qmax,
                                       self.w_axis, self.round_up)
        return P.quantize(self.weight, self.w_scale, self.w_zero_point, self.w_qmin, self.w_qmax, self.w_axis)

    def fq_weight(self) -> torch.Tensor:
        if not self.quant_enabled or self.spec.fmt == "fp32":
            return self.weight
        if self.wq is not None:  # quantization-aware training (``algorithms.qat``): a trainable quantizer
            return self.wq(self.weight)
        if self.spec.fmt == "fp16":
            return round_fp16(self.weight)
        round_up = self.round_up
        if torch.is_grad_enabled() and self.weight.requires_grad:
            if round_up is not None:  # learned rounding, straight-through to the weights
                return self.weight + (self._dequantized_codes() - self.weight).detach()
            return P.fake_quantize(self.weight, self.w_scale, self.w_zero_point, self.w_qmin, self.w_qmax, self.w_axis)
        # inference: weights rarely change, so reuse the fake-quant copy until they (or their scale) do
        key = (self.weight.data_ptr(), self.weight._version, self.w_scale._version, self.w_scale.data_ptr(),
               None if round_up is None else (round_up.data_ptr(), round_up._version))
        if self._fq_key != key:
            if round_up is not None:
                self._fq_cache = self._dequantized_codes()
            else:
                self._fq_cache = P.fake_quantize(self.weight.detach(), self.w_scale, self.w_zero_point,
                                                 self.w_qmin, self.w_qmax, self.w_axis)
            self._fq_key = key
        return self._fq_cache

    def _dequantized_codes(self) -> torch.Tensor:
        return P.dequantize(self.weight_int(), self.w_scale, self.w_zero_point, self.w_axis)

    def quant_bias(self) -> torch.Tensor | None:
        """The float bias of the quantized layer: the model's bias plus any bias correction
        (``algorithms.bias_correction``), which the float reference (``quant_enabled=False``) never sees."""
        delta = self.bias_delta
        if delta is None:
            return self.bias
        return delta if self.bias is None else self.bias + delta

    def bias_int(self) -> torch.Tensor | None:
        """int32 bias codes (scale = input scale x weight scale); None when the input or weights are float."""
        bias = self.quant_bias()
        if bias is None or float(self.input_scale) == 0.0 or self.spec.is_float:
            return None
        return P.quantize_bias(bias, self.input_scale, self.w_scale)

    def fq_bias(self) -> torch.Tensor | None:
        if not self.quant_enabled:
            return self.bias
        if self.wq is not None:  # training: scales move, the int32 bias follows at ``qat.finish``
            return self.quant_bias()
        q = self.bias_int()
        if q is None:
            bias = self.quant_bias()
            if bias is not None and self.spec.fmt == "fp16":
                return round_fp16(bias)
            return bias
        return q.to(torch.float32) * (self.input_scale * self.w_scale)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    act: str | None

    @classmethod
    def from_float(cls, mod: nn.Conv2d | ConvAct, spec: QuantSpec, *, use_mse: bool = False) -> "QuantConv2d":
        conv, act = (mod.conv, mod.act) if isinstance(mod, ConvAct) else (mod, None)
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        q.weight, q.bias, q.act = conv.weight, conv.bias, act
        q._init_weight_quant(conv.weight, spec, use_mse)
        q._declare_slots()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.fq_weight(), self.fq_bias())
        return ACTIVATIONS[self.act](y)

    def to_float(self) -> nn.Module:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        conv.weight, conv.bias = self.weight, self.bias
        return ConvAct(conv, self.act) if self.act else conv


class QuantLinear(_QuantWeightMixin, nn.Linear):
    @classmethod
    def from_float(cls, mod: nn.Linear, spec: QuantSpec, *, use_mse: bool = False) -> "QuantLinear":
        q = cls(mod.in_features, mod.out_features, mod.bias is not None)
        q.weight, q.bias = mod.weight, mod.bias
        q._init_weight_quant(mod.weight, spec, use_mse)
        q._declare_slots()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fq_weight(), self.fq_bias())

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin


class ActQuant(nn.Module):
    """Quantizer on one activation edge. Modes (``MODES``): ``observe`` and ``histogram`` collect statistics
    (calibration), ``quant`` fake-quantizes, ``off`` passes the float tensor through."""

    aq: nn.Module | None

    def __init__(self, spec: QuantSpec, calibrator: str = "minmax") -> None:
        super().__init__()
        self.spec, self.calibrator = spec, calibrator
        self.observer = OBSERVERS[calibrator]()
        self.mode = "observe"
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64))
        self.qmin, self.qmax, self.signed = 0, 255, False
        self.register_module("aq", None)

    def set_quantizer(self, quantizer: nn.Module | None) -> None:
        """Fake-quantize with ``quantizer(x)`` in ``quant`` mode instead of the fixed grid (quantization-aware
        training, or non-uniform PoT / APoT levels kept after it: ``algorithms.qat``); ``None`` empties the slot."""
        self.aq = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            if self.aq is not None:  # quantization-aware training, or non-uniform (PoT / APoT) activation levels
                return self.aq(x)
            if self.spec.is_float:
                return float_fake_quant(x, self.spec)
            return P.fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.mode == "observe":
            return self.observer.observe(x)
        if self.mode == "histogram":
            self.observer.observe_histogram(x)
        return x

    def real_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.real_range(self.spec.bits, self.spec.symmetric)

    def freeze(self, lo: torch.Tensor, hi: torch.Tensor, *, force_signed: bool = False) -> None:
        """Fix scale and zero point from a real range and switch to ``quant`` mode."""
        if self.spec.is_float:
            self.scale.fill_(1.0)
            self.zero_point.fill_(0)
            self.mode = "quant"
            return
        self.signed = force_signed or P.activation_signed(lo, self.spec.symmetric)
        self.qmin, self.qmax = P.qrange(self.spec.bits, self.signed)
        scale, zp = P.choose_qparams(lo, hi, self.spec.bits, symmetric=self.spec.symmetric,
                                     signed=self.signed, pow2=self.spec.pow2)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.mode = "quant"

    def extra_repr(self) -> str:
        if self.spec.is_float:
            return f"{self.spec.fmt}, mode={self.mode}"
        return f"bits={self.spec.bits}, mode={self.mode}, scale={float(self.scale):.4g}, zp={int(self.zero_point)}"


class GatedSiLU(nn.Module):
    """SiLU as integer runtimes compute it: ``x * Q(sigmoid(x))``, the gate quantized on its own (``gate``).

    onnxruntime turns exactly this pattern (DQ -> Sigmoid -> Q -> DQ, times DQ(x), -> Q) into QLinearSigmoid and
    QLinearMul, its integer kernels, where a float SiLU between DQ and Q stays in float. The gate is calibrated
    like every other activation; with quantization off (``gate`` in ``off`` mode) this is the float SiLU. As a
    function of the input code the whole activation is still one table (``lower._lut_table``).
    """

    def __init__(self, spec: QuantSpec, calibrator: str = "minmax") -> None:
        super().__init__()
        self.gate = ActQuant(spec, calibrator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(torch.sigmoid(x))
