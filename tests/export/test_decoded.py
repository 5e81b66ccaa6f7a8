"""The box decoding written into ONNX (``export.decoded``) computes what the numpy decoders compute, for every
decoder family, checked through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeslim import api
from edgeslim.eval import ort as ort_eval
from edgeslim.eval.detection import from_decoded
from edgeslim.export.decoded import with_decoder
from edgeslim.models import build_model
from edgeslim.models.fastestdet import FastestDetDecoder


@pytest.mark.parametrize("name,size", [("yolov5n", 64), ("yolov3-tiny", 64), ("fastestdet", 64)])
def test_decoded_file_equals_numpy_decoder(tmp_path, name, size):
    torch.manual_seed(0)
    model, info = build_model(name, None, input_shape=(3, size, size))
    raw_path = api.export_fp32_onnx(model.eval(), info.input_shape, tmp_path / "raw.onnx")
    dec_path = tmp_path / "dec.onnx"
    onnx.save(with_decoder(onnx.load(str(raw_path)), info.decoder), str(dec_path))
    x = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    raw = ort_eval.session(raw_path).run(None, {"input": x})
    (dec,) = ort_eval.session(dec_path).run(None, {"input": x})
    ref = info.decoder(raw)
    assert dec.shape == (3, ref.shape[1], ref.shape[2] + 1)
    np.testing.assert_allclose(from_decoded(dec), ref, rtol=1e-5, atol=1e-3 * max(1.0, float(np.abs(ref).max()) / 100))


def test_activated_fastestdet_output_decodes_too():
    """FastestDet's published ONNX output (sigmoid / softmax already applied): the 'activated' decoder, in torch."""
    dec = FastestDetDecoder(3, stride=16, activated=True)
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    raw[:, 0] = 1 / (1 + np.exp(-raw[:, 0]))
    cls = np.exp(raw[:, 5:])
    raw[:, 5:] = cls / cls.sum(1, keepdims=True)
    got = dec.module()(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(from_decoded(got), dec([raw]), rtol=1e-5, atol=1e-4)
