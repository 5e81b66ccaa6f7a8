"""A TFLite model held as plain Python data and serialized with the ``tflite`` schema package (no TensorFlow).

``FlatModel`` collects tensors, constant buffers and operators of one subgraph; ``to_bytes`` writes the
flatbuffer (``tensorflow/lite/schema/schema.fbs``, file identifier ``TFL3``, model version 3; buffer 0 is the
empty sentinel the schema asks for). Builtin options are written generically from ``(table name, fields)``,
e.g. ``("Conv2DOptions", {"Padding": 1, "StrideW": 1})``: field names are the schema's, in the generated
``Add<Field>`` spelling.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeslimError

# numpy dtype -> schema TensorType name (the packages are imported only when a file is written)
NP_TYPES = {np.dtype(np.float32): "FLOAT32", np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32",
            np.dtype(np.uint8): "UINT8", np.dtype(np.int16): "INT16", np.dtype(np.int64): "INT64"}


def schema():
    """The ``tflite`` schema package and ``flatbuffers`` (the optional ``tflite`` extra)."""
    try:
        import flatbuffers
        import tflite
    except ImportError:
        raise EdgeslimError("writing .tflite files needs the tflite extra: pip install -e '.[tflite]'") from None
    return tflite, flatbuffers

# version of each builtin as TensorFlow's converter writes it for int8 kernels (the interpreters accept any)
OP_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MUL": 2, "CONCATENATION": 2,
               "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "MEAN": 2, "TRANSPOSE": 2, "PAD": 2, "PADV2": 2,
               "RESIZE_NEAREST_NEIGHBOR": 2, "LOGISTIC": 2, "LEAKY_RELU": 2, "QUANTIZE": 2, "DEQUANTIZE": 2,
               "GATHER": 2, "SOFTMAX": 1, "STRIDED_SLICE": 2, "MAXIMUM": 2, "MINIMUM": 2, "RELU": 2, "RELU6": 2}


@dataclass
class Tensor:
    name: str
    shape: list[int]
    dtype: np.dtype
    data: np.ndarray | None = None  # a constant
    scale: list[float] | None = None  # quantization parameters (None: not quantized)
    zero_point: list[int] | None = None
    quantized_dimension: int = 0


@dataclass
class Op:
    code: str  # BuiltinOperator name
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict] | None = None


@dataclass
class FlatModel:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    description: str = "edgeslim"

    def add_tensor(self, t: Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, value: np.ndarray, **quant) -> int:
        value = np.asarray(value)
        value = np.ascontiguousarray(value).reshape(value.shape)  # keeps a scalar 0-D (a GATHER index)
        return self.add_tensor(Tensor(name, list(value.shape), value.dtype, value, **quant))

    def add_op(self, code: str, inputs: list[int], outputs: list[int], options: tuple[str, dict] | None = None) -> None:
        self.ops.append(Op(code, list(inputs), list(outputs), options))

    def op_codes(self) -> list[str]:
        """The distinct builtins, in first-use order (the model's operator_codes table)."""
        return list(dict.fromkeys(op.code for op in self.ops))


def _ivector(b, values, dtype=np.int32) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=dtype).reshape(-1))


def _aligned_bytes(b, payload: bytes, alignment: int = 16) -> int:
    """A ubyte vector whose data start on an ``alignment`` boundary (TFLM reads constant tensors in place)."""
    b.StartVector(1, len(payload), alignment)
    b.head = b.head - len(payload)
    b.Bytes[b.head:b.head + len(payload)] = payload
    return b.EndVector()


def _offsets(b, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _table(b, name: str, fields: dict) -> int:
    """Any schema table from its generated module (``tflite.<name>``): ``Start``, ``Add<Field>``, ``End``."""
    mod = importlib.import_module(f"tflite.{name}")
    mod.Start(b)
    for key, value in fields.items():
        getattr(mod, f"Add{key}")(b, value)
    return mod.End(b)


def _quantization(b, t: Tensor) -> int:
    scale = b.CreateNumpyVector(np.asarray(t.scale, dtype=np.float32))
    zp = b.CreateNumpyVector(np.asarray(t.zero_point, dtype=np.int64))
    return _table(b, "QuantizationParameters", {"Scale": scale, "ZeroPoint": zp,
                                                "QuantizedDimension": int(t.quantized_dimension)})


def to_bytes(m: FlatModel) -> bytes:
    """Serialize ``m`` as a ``.tflite`` flatbuffer."""
    tflite, flatbuffers = schema()
    from tflite.BuiltinOperator import BuiltinOperator
    from tflite.BuiltinOptions import BuiltinOptions
    from tflite.TensorType import TensorType

    unknown = [c for c in m.op_codes() if not hasattr(BuiltinOperator, c)]
    if unknown:
        raise ValueError(f"unknown TFLite builtin(s) {unknown}")
    b = flatbuffers.Builder(1024 + sum(t.data.nbytes for t in m.tensors if t.data is not None))
    codes = m.op_codes()
    buffers = [_table(b, "Buffer", {})]  # buffer 0: the empty sentinel
    tensor_offs = []
    for t in m.tensors:
        buf = 0
        if t.data is not None:
            data = _aligned_bytes(b, t.data.astype(t.data.dtype.newbyteorder("<"), copy=False).tobytes())
            buffers.append(_table(b, "Buffer", {"Data": data}))
            buf = len(buffers) - 1
        name = b.CreateString(t.name)
        shape = _ivector(b, t.shape)
        quant = _quantization(b, t) if t.scale is not None else None
        fields = {"Shape": shape, "Type": getattr(TensorType, NP_TYPES[np.dtype(t.dtype)]), "Buffer": buf, "Name": name}
        if quant is not None:
            fields["Quantization"] = quant
        tensor_offs.append(_table(b, "Tensor", fields))
    op_offs = []
    for op in m.ops:
        ins, outs = _ivector(b, op.inputs), _ivector(b, op.outputs)
        fields = {"OpcodeIndex": codes.index(op.code), "Inputs": ins, "Outputs": outs}
        if op.options is not None:
            opt_name, opt_fields = op.options
            fields["BuiltinOptionsType"] = getattr(BuiltinOptions, opt_name)
            fields["BuiltinOptions"] = _table(b, opt_name, opt_fields)
        op_offs.append(_table(b, "Operator", fields))
    code_offs = []
    for code in codes:
        value = getattr(BuiltinOperator, code)
        code_offs.append(_table(b, "OperatorCode", {
            "DeprecatedBuiltinCode": min(value, BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES),
            "BuiltinCode": value, "Version": OP_VERSIONS.get(code, 1)}))
    subgraph = _table(b, "SubGraph", {"Tensors": _offsets(b, tensor_offs), "Inputs": _ivector(b, m.inputs),
                                      "Outputs": _ivector(b, m.outputs), "Operators": _offsets(b, op_offs),
                                      "Name": b.CreateString("main")})
    model = _table(b, "Model", {"Version": 3, "OperatorCodes": _offsets(b, code_offs),
                                "Subgraphs": _offsets(b, [subgraph]),
                                "Description": b.CreateString(m.description), "Buffers": _offsets(b, buffers)})
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


__all__ = ["FlatModel", "Op", "Tensor", "schema", "to_bytes"]
