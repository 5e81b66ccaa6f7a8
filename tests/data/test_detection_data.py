"""edgeslim.data.detection on a tiny YOLO set written here (folder and zip) and on the real COCO128."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeslim.data.detection import PAD_VALUE, label_path, letterbox_geometry, open_detection, to_original
from edgeslim.errors import EdgeslimError

COCO128 = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128.zip"
NAMES = {0: "square", 1: "bar", 2: "dot"}
# name: (width, height, mode, [(cls, x0, y0, x1, y1) solid rectangles in pixels, x1/y1 exclusive])
IMAGES = {
    "train": {
        "wide.png": (100, 60, "RGB", [(0, 10, 5, 40, 30), (1, 60, 40, 95, 55)]),
        "tall.png": (50, 120, "RGB", [(2, 5, 60, 45, 110)]),
        "tiny.png": (30, 20, "L", [(1, 3, 4, 12, 16)]),  # upscaled by the letterbox
        "empty.png": (40, 40, "RGB", []),  # background image: empty label file
    },
    "val": {
        "v1.png": (80, 64, "RGB", [(0, 8, 8, 40, 48)]),
        "nolabel.png": (64, 80, "RGB", None),  # no label file at all
    },
}


def _write_set(root: Path, yaml_text: str = "names:\n  0: square\n  1: bar\n  2: dot\n") -> Path:
    for split, items in IMAGES.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name, (w, h, mode, rects) in items.items():
            arr = np.zeros((h, w), np.uint8)
            for _, x0, y0, x1, y1 in rects or []:
                arr[y0:y1, x0:x1] = 255
            img = Image.fromarray(arr, "L")
            (img if mode == "L" else img.convert(mode)).save(root / "images" / split / name)
            if rects is not None:
                lines = [
                    f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
                    for c, x0, y0, x1, y1 in rects
                ]
                (root / "labels" / split / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    (root / "config.yaml").write_text(yaml_text)
    return root


def _zip_dir(src: Path, dest: Path, top: str = "ds") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, f"{top}/{p.relative_to(src).as_posix()}")
    return dest


@pytest.fixture
def yolo_dir(tmp_path: Path) -> Path:
    return _write_set(tmp_path / "ds")


def test_label_path_convention():
    assert label_path("coco128/images/val2017/000000000139.jpg") == "coco128/labels/val2017/000000000139.txt"
    assert label_path("images/data/images/a/b.png") == "images/data/labels/a/b.txt"  # the LAST 'images'
    assert label_path("pics/b.jpg") is None


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_letterbox_geometry_and_round_trip(yolo_dir, tmp_path, kind):
    path = yolo_dir if kind == "dir" else _zip_dir(yolo_dir, tmp_path / "ds.zip")
    ds = open_detection(path, "train", imgsz=96)
    assert len(ds) == 4 and ds.has_labels and ds.names == ["square", "bar", "dot"] and ds.num_boxes() == 4
    for i in range(len(ds)):
        x, target, meta = ds[i]
        w, h, _, rects = IMAGES["train"][Path(meta.name).name]
        assert x.shape == (3, 96, 96) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        r, (nw, nh), (dw, dh) = letterbox_geometry(h, w, 96)
        assert meta.orig_hw == (h, w) and meta.ratio == r and meta.pad == (dw, dh) and max(nw, nh) == 96
        pad = np.float32(PAD_VALUE / 255)
        assert (x[:, :dh] == pad).all() and (x[:, dh + nh :] == pad).all()
        assert (x[:, :, :dw] == pad).all() and (x[:, :, dw + nw :] == pad).all()
        np.testing.assert_array_equal(target.classes, [c for c, *_ in rects])
        assert target.boxes.dtype == np.float32 and target.classes.dtype == np.int64
        for box, (_, x0, y0, x1, y1) in zip(target.boxes, rects):
            # the solid rectangle lands where the letterboxed box says
            lit = np.zeros((96, 96), bool)
            bx0, by0, bx1, by1 = np.floor(box - [1, 1, 0, 0]).astype(int).clip(0, 96)
            lit[by0 : by1 + 1, bx0 : bx1 + 1] = x[0, by0 : by1 + 1, bx0 : bx1 + 1] > 0.5
            ys, xs = np.nonzero(lit)
            found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
            np.testing.assert_allclose(found, box, atol=1.0)
        orig = np.array([[x0, y0, x1, y1] for _, x0, y0, x1, y1 in rects], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(to_original(target.boxes, meta), orig, atol=2e-3)
        dets = np.concatenate([target.boxes, np.full((len(rects), 1), 0.9), target.classes[:, None]], axis=1)
        np.testing.assert_allclose(to_original(dets, meta), np.concatenate([orig, dets[:, 4:]], axis=1), atol=2e-3)
    ds.close()


def test_gray_image_becomes_rgb(yolo_dir):
    ds = open_detection(yolo_dir, "train", imgsz=64)
    x, _, meta = next(ds[i] for i in range(len(ds)) if ds.images[i].endswith("tiny.png"))
    assert meta.ratio == pytest.approx(64 / 30) and (x[0] == x[1]).all() and (x[1] == x[2]).all()


def test_batches_subset_and_missing_labels(yolo_dir):
    ds = open_detection(yolo_dir, "val", imgsz=64)
    assert [Path(n).name for n in ds.images] == ["nolabel.png", "v1.png"]
    _, target, meta = ds[0]
    assert target.boxes.shape == (0, 4) and target.classes.shape == (0,) and meta.image_id == "nolabel"
    tr = open_detection(yolo_dir, "train", imgsz=64)
    got = list(tr.batches(3, desc="test"))
    assert [b[0].shape for b in got] == [(3, 3, 64, 64), (1, 3, 64, 64)]
    assert [m.index for b in got for m in b[2]] == [0, 1, 2, 3]
    np.testing.assert_array_equal(got[0][0][1], tr[1][0])
    sub = tr.subset(2, seed=3)
    assert len(sub) == 2 and sub.images == tr.subset(2, seed=3).images and set(sub.images) <= set(tr.images)
    assert len(tr.subset(10)) == 4
    with pytest.raises(EdgeslimError, match="batch size"):
        next(tr.batches(0))


def test_images_folder_given_directly_and_plain_folder(yolo_dir, tmp_path):
    ds = open_detection(yolo_dir / "images" / "train", imgsz=64)  # labels and YAML found above it
    assert ds.has_labels and ds.num_boxes() == 4 and ds.names == ["square", "bar", "dot"]
    plain = tmp_path / "pics"
    plain.mkdir()
    Image.new("RGB", (30, 40), (10, 20, 30)).save(plain / "a.jpg")
    cal = open_detection(plain, imgsz=32)
    assert not cal.has_labels and cal.names == [] and cal[0][0].shape == (3, 32, 32)


def test_names_from_yaml_list_and_argument(tmp_path):
    root = _write_set(tmp_path / "ds", yaml_text="")
    (root / "config.yaml").unlink()
    (root / "data.yaml").write_text("nc: 3\nnames: [a, b, c]\n")
    assert open_detection(root, "train").names == ["a", "b", "c"]
    zp = _zip_dir(root, tmp_path / "list.zip")
    assert open_detection(zp, "train").names == ["a", "b", "c"]
    assert open_detection(root, "train", names={0: "x", 1: "y", 2: "z"}).names == ["x", "y", "z"]
    (root / "data.yaml").write_text("names: {0: a, 2: c}\n")
    with pytest.raises(EdgeslimError, match="ids 0..n-1"):
        open_detection(root, "train")
    (root / "data.yaml").unlink()
    with pytest.raises(EdgeslimError, match="has labels but no class names"):
        open_detection(root, "train")


def test_errors(yolo_dir, tmp_path):
    with pytest.raises(EdgeslimError, match="does not exist"):
        open_detection(tmp_path / "nope.zip")
    zp = _zip_dir(yolo_dir, tmp_path / "ds.zip")
    with pytest.raises(EdgeslimError, match="no images for split 'test': splits found: train, val"):
        open_detection(zp, "test")
    with pytest.raises(EdgeslimError, match="holds the splits train, val"):
        open_detection(zp)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeslimError, match="has no images"):
        open_detection(tmp_path / "empty")
    with pytest.raises(EdgeslimError, match="imgsz"):
        open_detection(yolo_dir, "train", imgsz=0)

    bad = yolo_dir / "labels" / "train" / "wide.txt"
    good = bad.read_text()
    bad.write_text(good + "1 0.5 0.5 0.2\n")
    with pytest.raises(EdgeslimError, match=r"wide.txt' line 3 is not 'cls cx cy w h'"):
        open_detection(yolo_dir, "train")
    bad.write_text("0 0.5 0.5 0.2 0.2 0.9\n")  # a 6th (confidence) column is refused, not ignored
    with pytest.raises(EdgeslimError, match="line 1 is not 'cls cx cy w h'"):
        open_detection(yolo_dir, "train")
    bad.write_text("0 0.5 0.5 20 30\n")
    with pytest.raises(EdgeslimError, match="line 1 has coordinates outside"):
        open_detection(yolo_dir, "train")
    bad.write_text(good + "3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(EdgeslimError, match=r"wide.txt. has class id 3 but there are 3 class names"):
        open_detection(yolo_dir, "train")
    bad.write_text(good)

    (yolo_dir / "images" / "train" / "broken.png").write_bytes(b"not a png")
    ds = open_detection(yolo_dir, "train")
    with pytest.raises(EdgeslimError, match="broken.png' is unreadable"):
        ds[0]


@pytest.mark.skipif(not COCO128.exists(), reason="../shared/data/coco128.zip not present")
def test_real_coco128():
    val = open_detection(COCO128, "val2017", imgsz=320)
    train = open_detection(COCO128, "train2017", imgsz=320)
    assert (len(val), val.num_boxes(), len(train), train.num_boxes()) == (128, 898, 128, 929)
    # shared/README's 941 train boxes counts every label file: two of them (000000000656, 000000000659,
    # 12 boxes) have no image, and images 000000000250 / 000000000508 have no label file (background).
    with zipfile.ZipFile(COCO128) as zf:
        lines = {n: len(zf.read(n).split()) // 5 for n in zf.namelist() if n.startswith("coco128/labels/train2017/")
                 and n.endswith(".txt")}
    orphans = {n: k for n, k in lines.items() if n.replace("/labels/", "/images/")[:-4] + ".jpg" not in train.images}
    assert sum(lines.values()) == 941 and sorted(orphans) == [
        "coco128/labels/train2017/000000000656.txt", "coco128/labels/train2017/000000000659.txt"]
    assert sum(orphans.values()) == 12
    assert len(val.names) == 80 and val.names[0] == "person" and val.names[79] == "toothbrush"
    x, target, meta = val[0]
    assert meta.name == "coco128/images/val2017/000000000139.jpg" and meta.image_id == 139
    assert meta.orig_hw == (426, 640) and meta.ratio == 0.5 and meta.pad == (0, 53)
    assert x.shape == (3, 320, 320) and len(target.boxes) == len(target.classes) > 0
    assert (target.boxes[:, 2:] > target.boxes[:, :2]).all() and target.boxes.max() <= 320


@pytest.mark.skipif(not COCO128.exists(), reason="../shared/data/coco128.zip not present")
def test_coco128_extracted_folder_matches_zip(tmp_path):
    zipped = open_detection(COCO128, "val2017", imgsz=160)
    picked = zipped.images[:6]
    with zipfile.ZipFile(COCO128) as zf:
        zf.extractall(tmp_path, picked + [label_path(n) for n in picked] + ["coco128/config.yaml"])
    folder = open_detection(tmp_path / "coco128", "val2017", imgsz=160)
    assert folder.names == zipped.names and len(folder) == 6
    for i in range(6):
        (x, target, meta), (zx, ztarget, zmeta) = folder[i], zipped[i]
        assert meta.name == zmeta.name.removeprefix("coco128/") and meta.image_id == zmeta.image_id
        assert (meta.orig_hw, meta.ratio, meta.pad) == (zmeta.orig_hw, zmeta.ratio, zmeta.pad)
        np.testing.assert_array_equal(x, zx)
        np.testing.assert_array_equal(target.boxes, ztarget.boxes)
        np.testing.assert_array_equal(target.classes, ztarget.classes)
