"""edgeslim: make convolutional networks small and fast for embedded devices.

Public API (re-exports only): ``build_model``, ``PTQConfig``, ``MixedPlan``, ``quantize``, ``export_onnx``,
``export_fp32_onnx``, ``export_fp16_onnx``, ``export_tflite`` (LiteRT int8 flatbuffer), ``import_qdq`` (QDQ ONNX ->
IntGraph), ``import_tflite`` (int8 .tflite -> IntGraph), ``import_onnx`` (float ONNX -> torch.fx), ``Quantized``,
``EdgeslimError``.
"""

from .api import Quantized, export_fp16_onnx, export_fp32_onnx, export_onnx, quantize
from .config import MixedPlan, PTQConfig
from .errors import EdgeslimError
from .export.tflite import export_tflite
from .io.onnx_import import import_onnx
from .io.onnx_qdq_import import import_qdq
from .io.tflite_import import import_tflite
from .models import build_model

__all__ = ["EdgeslimError", "MixedPlan", "PTQConfig", "Quantized", "build_model", "export_fp16_onnx",
           "export_fp32_onnx", "export_onnx", "export_tflite", "import_onnx", "import_qdq", "import_tflite",
           "quantize"]
__version__ = "0.1.0"
