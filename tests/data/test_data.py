"""Tests for edgeslim.data: every source, exact preprocessing, sampling and error messages."""

from __future__ import annotations

import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeslim.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDataset,
    Preprocess,
    batches,
    calibration_indices,
    check_finite,
    open_dataset,
)
from edgeslim.errors import EdgeslimError

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
CLASSES = ["ant", "bee", "cat"]  # written out of order below; labels must follow sorted names
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _pixels(seed: int, h: int = 10, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _oracle(hwc_uint8: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    x = hwc_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """root/<class>/*.png (lossless) plus one JPEG and one nested image; returns pixels by path."""
    root = tmp_path / "imgs"
    pixels: dict[str, np.ndarray] = {}
    for k, cls in enumerate(["cat", "ant", "bee"]):
        for j in range(2 + k):
            rel = f"{cls}/{j}.png" if j != 3 else f"{cls}/sub/{j}.png"
            arr = _pixels(10 * k + j)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            pixels[rel] = arr
    Image.fromarray(_pixels(99)).save(root / "bee" / "x.jpg", quality=95)
    (root / "ant" / "notes.txt").write_text("not an image")
    return root, pixels


def _pp(h: int = 10, w: int = 12, resize: int | None = None) -> Preprocess:
    return Preprocess((3, h, w), MEAN, STD, resize)


def _zip_folder(root: Path, zpath: Path, top: str | None) -> Path:
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).as_posix()
            zf.write(f, f"{top}/{rel}" if top else rel)
    return zpath


def _cifar_dir(tmp_path: Path, n: int = 6) -> tuple[Path, list[np.ndarray], list[list[int]]]:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    datas, labels = [], []
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": lab}, f, protocol=2)
        datas.append(data)
        labels.append(lab)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return d, datas, labels


# ------------------------------------------------------------------ Preprocess


def test_preprocess_validates_and_normalizes_types():
    pp = Preprocess([3, 4, 5], [0.1, 0.2, 0.3], [1, 1, 1])
    assert pp.input_shape == (3, 4, 5) and pp.mean == (0.1, 0.2, 0.3) and pp.std == (1.0, 1.0, 1.0)
    with pytest.raises(EdgeslimError, match="mean/std"):
        Preprocess((3, 4, 4), (0.5,), (0.5, 0.5, 0.5))
    with pytest.raises(EdgeslimError, match="std"):
        Preprocess((1, 4, 4), (0.5,), (0.0,))
    with pytest.raises(EdgeslimError, match="C,H,W"):
        Preprocess((4, 4, 4), (0.5,) * 4, (0.5,) * 4)
    with pytest.raises(EdgeslimError, match="smaller than"):
        Preprocess((3, 224, 224), MEAN, STD, resize=200)


# ------------------------------------------------------------------ ImageFolder / zip


def test_folder_labels_shapes_and_exact_pixels(folder):
    root, pixels = folder
    ds = open_dataset(root, _pp())
    assert ds.classes == CLASSES
    assert len(ds) == 2 + 3 + 4 + 1  # jpg counted, txt ignored
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0] * 3 + [1] * 5 + [2] * 2
    names = ds._source.names
    for i, name in enumerate(names):
        assert ds.labels[i] == CLASSES.index(name.split("/")[0])
        if name.endswith(".png"):
            x = ds.get(i)
            assert x.dtype == np.float32 and x.shape == (3, 10, 12)
            np.testing.assert_array_equal(x, _oracle(pixels[name]))
    b = ds.batch([0, 2, 1])
    assert b.shape == (3, 3, 10, 12) and b.dtype == np.float32
    np.testing.assert_array_equal(b[1], ds.get(2))
    assert ds.cached


def test_resize_center_crop_matches_pil(folder):
    root, pixels = folder
    pp = _pp(6, 6, resize=8)
    ds = open_dataset(root, pp)
    i = ds._source.names.index("ant/0.png")
    img = Image.fromarray(pixels["ant/0.png"]).resize((9, 8), Image.BILINEAR)  # 12x10 -> short side 8, long int(9.6)
    oracle = np.asarray(img)[1:7, 2:8]  # center crop 6x6 of 8x9 (h x w), torchvision rounding
    np.testing.assert_array_equal(ds.get(i), _oracle(oracle))
    # resize=None resizes directly to H,W (aspect ratio not kept)
    ds2 = open_dataset(root, _pp(5, 7))
    direct = np.asarray(Image.fromarray(pixels["ant/0.png"]).resize((7, 5), Image.BILINEAR))
    np.testing.assert_array_equal(ds2.get(i), _oracle(direct))


def test_grayscale_preprocess(folder):
    root, pixels = folder
    ds = open_dataset(root, Preprocess((1, 10, 12), (0.5,), (0.5,)))
    i = ds._source.names.index("cat/1.png")
    gray = np.asarray(Image.fromarray(pixels["cat/1.png"]).convert("L"))[:, :, None]
    np.testing.assert_array_equal(ds.get(i), _oracle(gray, (0.5,), (0.5,)))


@pytest.mark.parametrize("top", [None, "test"])
def test_zip_matches_folder(folder, tmp_path, top):
    root, _ = folder
    zpath = _zip_folder(root, tmp_path / "d.zip", top)
    ref = open_dataset(root, _pp())
    with open_dataset(zpath, _pp()) as ds:
        assert ds.classes == CLASSES
        np.testing.assert_array_equal(ds.labels, ref.labels)
        np.testing.assert_array_equal(ds.load_all(), ref.load_all())
    if top:
        assert open_dataset(zpath, _pp(), split=top).classes == CLASSES


def test_zip_with_two_splits_needs_split(folder, tmp_path):
    root, _ = folder
    zpath = tmp_path / "two.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(root.rglob("*.png")):
            rel = f.relative_to(root).as_posix()
            zf.write(f, f"train/{rel}")
            if rel.startswith(("ant", "bee")):
                zf.write(f, f"val/{rel}")
    with pytest.raises(EdgeslimError, match="split"):
        open_dataset(zpath, _pp())
    assert open_dataset(zpath, _pp(), split="val").classes == ["ant", "bee"]
    with pytest.raises(EdgeslimError, match="unknown split 'test'"):
        open_dataset(zpath, _pp(), split="test")


def test_folder_split_subfolder(folder, tmp_path):
    root, _ = folder
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "val").symlink_to(root, target_is_directory=True)
    assert open_dataset(parent, _pp(), split="val").classes == CLASSES
    with pytest.raises(EdgeslimError, match="unknown split"):
        open_dataset(parent, _pp(), split="train")


# ------------------------------------------------------------------ CIFAR / npz / digits


def test_cifar_dir_and_tar(tmp_path):
    d, datas, labels = _cifar_dir(tmp_path)
    pp = Preprocess((3, 32, 32), CIFAR10_MEAN, CIFAR10_STD)
    test = open_dataset(tmp_path, pp)  # parent folder holding cifar-10-batches-py; default split test
    assert test.classes[0] == "airplane" and test.classes[-1] == "truck"
    assert test.labels.tolist() == labels[2]
    hwc = datas[2][3].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(test.get(3), _oracle(hwc, CIFAR10_MEAN, CIFAR10_STD))
    train = open_dataset(d, pp, split="train")
    assert len(train) == 12 and train.labels.tolist() == labels[0] + labels[1]
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(d, arcname="cifar-10-batches-py")
    from_tar = open_dataset(tar, pp, split="train")
    np.testing.assert_array_equal(from_tar.load_all(), train.load_all())
    with pytest.raises(EdgeslimError, match="unknown split"):
        open_dataset(d, pp, split="val")


def test_cifar_refuses_foreign_pickle(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Path("/")}, f)
    with pytest.raises(EdgeslimError, match="not a CIFAR python batch"):
        open_dataset(d, Preprocess((3, 32, 32), CIFAR10_MEAN, CIFAR10_STD))


def test_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (5, 10, 12, 3), dtype=np.uint8)
    y = np.array([1, 0, 1, 2, 0])
    np.savez(tmp_path / "u.npz", x=x, y=y)
    ds = open_dataset(tmp_path / "u.npz", _pp())
    assert ds.classes == ["0", "1", "2"] and ds.labels.tolist() == y.tolist()
    np.testing.assert_array_equal(ds.get(3), _oracle(x[3]))
    xf = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.savez(tmp_path / "f.npz", images=xf, labels=y)
    dsf = open_dataset(tmp_path / "f.npz", _pp())
    expected = (xf[3] - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    np.testing.assert_allclose(dsf.get(3), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dsf.load_all(), ds.load_all(), atol=1e-5)
    np.testing.assert_array_equal(xf, np.load(tmp_path / "f.npz")["images"])  # source untouched


def test_sklearn_digits():
    pp = Preprocess((1, 8, 8), (0.5,), (0.5,))
    full = open_dataset("sklearn-digits", pp)
    train = open_dataset("sklearn-digits", pp, split="train")
    test = open_dataset("sklearn-digits", pp, split="test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    assert full.classes == [str(i) for i in range(10)]
    x = full.get(0)
    assert x.shape == (1, 8, 8) and x.min() >= -1.0 and x.max() <= 1.0
    from sklearn.datasets import load_digits

    ref = (load_digits().images[0] / 16.0 - 0.5) / 0.5
    np.testing.assert_allclose(x[0], ref, atol=1e-6)
    perm = np.random.default_rng(0).permutation(1797)
    assert test.labels.tolist() == full.labels[perm[1437:]].tolist()
    with pytest.raises(EdgeslimError, match="unknown split"):
        open_dataset("sklearn-digits", pp, split="val")


def test_digits_read_without_scikit_learn_equal_load_digits(monkeypatch):
    """The digits read from the CSV file scikit-learn ships, without importing it, are ``load_digits``'s exactly."""
    import sys

    from sklearn.datasets import load_digits

    from edgeslim.data.arrays import digits_arrays

    ref = load_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # importing it now fails: the file must be found
    images, target = digits_arrays()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    assert images.dtype == ref.images.dtype


# ------------------------------------------------------------------ batches / sampling


def test_batches_cover_indices(folder):
    root, _ = folder
    ds = open_dataset(root, _pp())
    idx = np.array([9, 0, 4, 5, 1])
    got = list(batches(ds, 2, idx, desc="test"))
    assert [len(y) for _, y in got] == [2, 2, 1]
    xs = np.concatenate([x for x, _ in got])
    ys = np.concatenate([y for _, y in got])
    assert ys.dtype == np.int64 and ys.tolist() == ds.labels[idx].tolist()
    np.testing.assert_array_equal(xs, ds.batch(idx))
    assert sum(len(y) for _, y in batches(ds, 4)) == len(ds)
    with pytest.raises(EdgeslimError, match="batch size"):
        next(batches(ds, 0))


def test_calibration_indices_reproducible_and_balanced():
    a = calibration_indices(1000, 50, seed=3)
    assert np.array_equal(a, calibration_indices(1000, 50, seed=3))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, calibration_indices(1000, 50, seed=4))
    labels = np.repeat(np.arange(4), [500, 300, 5, 195])
    b = calibration_indices(1000, 40, seed=0, labels=labels)
    counts = np.bincount(labels[b], minlength=4)
    assert counts.sum() == 40 and counts[2] == 5 and sorted(counts[[0, 1, 3]].tolist()) == [11, 12, 12]
    c = calibration_indices(1000, 30, labels=labels)
    assert sorted(np.bincount(labels[c]).tolist()) == [5, 8, 8, 9]
    assert np.array_equal(calibration_indices(10, 50), np.arange(10))
    with pytest.raises(EdgeslimError, match="positive"):
        calibration_indices(10, 0)
    with pytest.raises(EdgeslimError, match="labels"):
        calibration_indices(10, 5, labels=np.zeros(3))


def test_check_finite():
    check_finite(np.zeros((2, 3), np.float32), "here")
    bad = np.zeros(4, np.float32)
    bad[1] = np.nan
    with pytest.raises(EdgeslimError, match="NaN/inf in input batch from calib"):
        check_finite(bad, "calib")


# ------------------------------------------------------------------ errors


def test_errors(folder, tmp_path):
    root, _ = folder
    pp = _pp()
    with pytest.raises(EdgeslimError, match="does not exist"):
        open_dataset(tmp_path / "missing", pp)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(EdgeslimError, match="no images"):
        open_dataset(tmp_path / "empty", pp)
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("x/readme.txt", "hi")
    with pytest.raises(EdgeslimError, match="no images"):
        open_dataset(tmp_path / "e.zip", pp)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(EdgeslimError, match="not a readable zip"):
        open_dataset(tmp_path / "bad.zip", pp)
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = open_dataset(root, pp)
    with pytest.raises(EdgeslimError, match="broken.png"):
        ds.load_all()
    np.savez(tmp_path / "nokeys.npz", a=np.zeros(3))
    with pytest.raises(EdgeslimError, match="needs 'x' and 'y'"):
        open_dataset(tmp_path / "nokeys.npz", pp)
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((4, 10, 12, 3), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(EdgeslimError, match="4 images but 3 labels"):
        open_dataset(tmp_path / "mismatch.npz", pp)
    np.savez(tmp_path / "f255.npz", x=np.full((2, 3, 10, 12), 255.0, np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(EdgeslimError, match=r"\[0, 1\]"):
        open_dataset(tmp_path / "f255.npz", pp)
    with pytest.raises(EdgeslimError, match="unknown split"):
        open_dataset(tmp_path / "mismatch.npz", pp, split="train")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(EdgeslimError, match="unsupported"):
        open_dataset(tmp_path / "data.csv", pp)
    (root / "dog").mkdir()
    with pytest.raises(EdgeslimError, match="class folder 'dog'"):
        open_dataset(root, pp)


def test_uncached_dataset_decodes_on_demand(folder):
    root, _ = folder
    ds = open_dataset(root, _pp(), max_cache_bytes=0)
    assert not ds.cached
    np.testing.assert_array_equal(ds.batch([1, 1]), open_dataset(root, _pp()).batch([1, 1]))
    assert isinstance(ds, ImageDataset) and ds[1][1] == int(ds.labels[1])


# ------------------------------------------------------------------ real data (opt-in)


@pytest.mark.slow
def test_cifar10_jpeg_zip():
    zpath = SHARED / "cifar10-jpeg-test.zip"
    if not zpath.exists():
        pytest.skip(f"{zpath} not present")
    pp = Preprocess((3, 32, 32), CIFAR10_MEAN, CIFAR10_STD)
    t0 = time.perf_counter()
    ds = open_dataset(zpath, pp)
    x = ds.load_all()
    seconds = time.perf_counter() - t0
    print(f"decoded {len(ds)} images in {seconds:.2f}s")
    assert len(ds) == 10_000 and x.shape == (10_000, 3, 32, 32)
    assert ds.classes == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert np.isfinite(x).all() and abs(float(x.mean())) < 0.2


@pytest.mark.parametrize("mode,channels,options", [
    ("RGB", 3, {"subsampling": 0}), ("RGB", 3, {"subsampling": 1}), ("RGB", 3, {"subsampling": 2}),
    ("RGB", 3, {"subsampling": 2, "progressive": True, "quality": 50}),
    ("RGB", 3, {"subsampling": 2, "restart_marker_blocks": 1}), ("L", 1, {"quality": 90}),
])
def test_jpegs_at_the_model_size_decode_to_pils_bits(mode, channels, options):
    """The simplejpeg path gives PIL's pixels bit for bit (the same libjpeg-turbo settings), for odd sizes too."""
    import io

    from edgeslim.data import files

    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (17, 23)):
        pix = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pix, mode).save(buf, "JPEG", **options)
        data = buf.getvalue()
        pp = Preprocess((channels, h, w), (0.5,) * channels, (0.5,) * channels)
        fast = files._jpeg_at_size(data, pp)
        assert fast is not None
        with Image.open(io.BytesIO(data)) as img:
            np.testing.assert_array_equal(fast, files.pil_to_uint8(img, pp))


def test_other_jpegs_are_left_to_pil():
    """Another size, a CMYK JPEG, a gray JPEG for a colour model and damaged or truncated files take PIL's path
    (which resizes, converts or names the bad file)."""
    import io

    from edgeslim.data import files

    def jpeg(mode: str, shape) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.zeros(shape, np.uint8) if mode != "CMYK" else np.zeros((*shape[:2], 4), np.uint8),
                        mode).save(buf, "JPEG")
        return buf.getvalue()

    pp = Preprocess((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    assert files._jpeg_at_size(jpeg("RGB", (40, 40, 3)), pp) is None
    assert files._jpeg_at_size(jpeg("CMYK", (32, 32)), pp) is None
    assert files._jpeg_at_size(jpeg("L", (32, 32)), pp) is None
    whole = jpeg("RGB", (32, 32, 3))
    for bad in (whole[:60], whole[:len(whole) // 2], whole[:-2]):  # header only, half the scan, no end marker
        assert files._jpeg_at_size(bad, pp) is None
        with pytest.raises(EdgeslimError, match="unreadable or corrupt"):
            files.decode_image(bad, pp, "bad.jpg")
