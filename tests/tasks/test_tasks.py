"""The task protocol's pieces that the jobs lean on, checked by themselves: the detect task's mAP metric (what the
mixed-precision search maximizes on held-out detector images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.config import DetectOptions
from edgeslim.data.detection import Target
from edgeslim.tasks.detect import map_metric

# two images, one ground-truth box each: class 0 in the first, class 1 in the second (pixels, xyxy)
TARGETS = [Target(np.array([[10, 10, 30, 30]], np.float32), np.array([0])),
           Target(np.array([[5, 5, 20, 25]], np.float32), np.array([1]))]


def _outputs(boxes) -> list[torch.Tensor]:
    """Raw outputs of a stand-in detector whose decoder is the identity: one box per image with its class score."""
    o = np.zeros((2, 1, 4 + 2), np.float32)
    o[:, 0, :4] = boxes
    o[0, 0, 4] = 0.9  # image 0: class 0
    o[1, 0, 5] = 0.8  # image 1: class 1
    return [torch.from_numpy(o)]


@pytest.mark.parametrize("boxes, expected", [
    ([[10, 10, 30, 30], [5, 5, 20, 25]], 1.0),  # both found exactly: AP 1 for each class
    ([[10, 10, 30, 30], [40, 40, 60, 60]], 0.5),  # class 1 missed (IoU 0): mean of AP 1 and AP 0
    ([[50, 50, 70, 70], [40, 40, 60, 60]], 0.0),
])
def test_map_metric_is_coco_map_of_the_decoded_outputs(boxes, expected):
    metric = map_metric(TARGETS, lambda outs: outs[0], DetectOptions(), num_classes=2, batch_size=1)
    assert metric(_outputs(boxes), []) == pytest.approx(expected, abs=1e-12)  # a mean over 10 IoU thresholds
    assert (metric.unit, metric.per_unit) == ("points", 100.0)  # --max-drop 1.0 = one point of mAP@0.5:0.95
