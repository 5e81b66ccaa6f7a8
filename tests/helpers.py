"""Helpers the tests share: the tiny user-model files the CLI tests write, running the CLI in-process, the
one-line error check, and the tiny detector command line (its data set is the ``yolo_set`` fixture in
``conftest.py``)."""

from __future__ import annotations

import textwrap

from edgeslim.cli import main

__all__ = ["USER_MODEL", "TINY", "SIZE", "run_cli", "expect_error", "detect_args"]

SIZE = 64  # the tiny detectors' input size (``detect_args``)

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))

    class NaNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)
        def forward(self, x):
            x = torch.log(self.conv(x) - 1e6)  # NaN everywhere
            return self.fc(x.mean(dim=(2, 3)))

    def nan_model():
        return NaNModel()
''')

TINY = '''
import torch
from torch import nn

def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))
'''


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys, tmp_path, argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("edgeslim")]
    assert len(lines) == 1 and lines[0].startswith("edgeslim: error:"), err
    assert err.rstrip().endswith(lines[0])
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()


def detect_args(cmd, model, data, out, *extra):
    return [cmd, model, "--random-init", "--input-shape", f"3,{SIZE},{SIZE}", "--task", "detect", "--data", str(data),
            "--data-split", "val", "--calib-data", str(data), "--calib-split", "train", "--calib-size", "4",
            "--out", str(out), *extra]
