"""The HTML reports rendered in headless Chromium at 1280 px (Debian's ``chromium``; skipped where it is absent, as
in CI): a screenshot is taken and is not blank, no image is broken and nothing overflows the page sideways."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeslim.cli import main

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
              pytest.mark.slow]
WIDTH = 1280
PROBE = """<script>window.addEventListener('load', function () {
  var broken = 0;
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) broken++;
  }
  var p = document.createElement('pre');
  p.id = 'edgeslim-probe';
  p.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth,
                                  clientWidth: document.documentElement.clientWidth,
                                  images: document.images.length, broken: broken});
  document.body.appendChild(p);
});</script>"""

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))
''')


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},2000", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def check_page(report: Path, tmp: Path) -> dict:
    """Screenshot ``report`` (not blank) and probe a copy of it: images loaded, no horizontal overflow."""
    shot = tmp / (report.parent.name + ".png")
    _chromium(tmp, "--hide-scrollbars", f"--screenshot={shot}", report.resolve().as_uri())
    assert shot.exists() and shot.stat().st_size > 0, f"no screenshot of {report}"
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[1] == WIDTH
    assert pixels.std() > 5 and len(np.unique(pixels)) > 16, f"{shot} is blank"
    probe = probe_page(report, tmp)
    assert probe["images"] >= 1 and probe["broken"] == 0, (report, probe)
    assert probe["scrollWidth"] <= probe["clientWidth"], (report, probe)  # nothing wider than the 1280 px window
    return probe


def probe_page(report: Path, tmp: Path) -> dict:
    """Load a copy of ``report`` with a script that writes the page's scroll width and its broken images into the DOM,
    read back with ``--dump-dom``."""
    probed = tmp / (report.parent.name + "-probe.html")  # a copy: the report itself stays as written
    probed.write_text(report.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    dom = _chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", probed.resolve().as_uri()).stdout
    found = re.search(r'<pre id="edgeslim-probe">([^<]*)</pre>', dom)
    assert found, f"the probe did not run in {report}"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """quantize / analyze (images), sensitivity / mixed (npz) on a tiny user model; quantize --task detect."""
    from edgeslim.models.yolo import COCO_NAMES

    root = tmp_path_factory.mktemp("browser")
    model = root / "usermodels.py"
    model.write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    images = root / "images"
    for cls in ("cats", "dogs"):
        (images / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    x = rng.integers(0, 255, (240, 8, 8, 3), dtype=np.uint8)
    npz = root / "d.npz"
    np.savez(npz, x=x, y=(x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype(np.int64))
    tiny = [f"{model}:tiny", "--input-shape", "3,8,8"]
    out = {}
    for verb in ("quantize", "analyze"):
        out[verb] = root / verb
        assert main([verb, *tiny, "--calib-data", str(images), "--data", str(images), "--calib-size", "8",
                     "--out", str(out[verb])]) == 0
    for verb, extra in (("sensitivity", ["--group", "features=0|3", "--group", "classifier=7"]),
                        ("mixed", ["--max-drop", "0.0"])):
        out[verb] = root / verb
        assert main([verb, *tiny, "--calib-data", str(npz), "--data", str(npz), "--calib-size", "64",
                     "--holdout-size", "100", "--w-bits", "2", "--a-bits", "2", "--out", str(out[verb]), *extra]) == 0
    unlabelled = root / "x.npz"  # no labels: the fidelity task
    np.savez(unlabelled, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    out["fidelity"] = root / "fidelity"
    assert main(["quantize", *tiny, "--calib-data", str(unlabelled), "--data", str(unlabelled),
                 "--out", str(out["fidelity"])]) == 0
    yolo = root / "yolo"
    for split in ("train", "val"):
        (yolo / "images" / split).mkdir(parents=True)
        (yolo / "labels" / split).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            img[10:30, 12:32] = 230
            Image.fromarray(img).save(yolo / "images" / split / f"{i:03d}.jpg")
            (yolo / "labels" / split / f"{i:03d}.txt").write_text(f"{i % 3} 0.34 0.31 0.31 0.31\n")
    (yolo / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(COCO_NAMES)))
    out["detect"] = root / "detect"
    assert main(["quantize", "yolov3-tiny", "--random-init", "--input-shape", "3,64,64", "--task", "detect",
                 "--data", str(yolo), "--data-split", "val", "--calib-data", str(yolo), "--calib-split", "train",
                 "--calib-size", "4", "--out", str(out["detect"])]) == 0
    return out


@pytest.mark.parametrize("report", ["quantize", "analyze", "sensitivity", "mixed", "detect", "fidelity"])
def test_report_renders_at_1280_px(runs, report, tmp_path):
    page = runs[report] / "report.html"
    before = page.read_bytes()
    check_page(page, tmp_path)
    assert page.read_bytes() == before  # probed on a copy


def test_a_wide_table_would_be_caught(tmp_path):
    """The probe itself: it sees a page wider than the window, and a missing image."""
    page = tmp_path / "wide" / "report.html"
    page.parent.mkdir()
    page.write_text("<!doctype html><body><p>" + "x" * 20 + "</p><table><tr>" + "<td>wide cell content</td>" * 200
                    + "</tr></table><img src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlE"
                      "QVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='></body>")
    probe = probe_page(page, tmp_path)
    assert probe["scrollWidth"] > probe["clientWidth"] and probe["images"] == 1 and probe["broken"] == 0
    page.write_text("<!doctype html><body><img src='missing.png'></body>")
    assert probe_page(page, tmp_path)["broken"] == 1
