"""The zip listing shortcuts of ``data.files`` against the plain computations: implied parent folders as the
per-file loop found them, and the cached member names as ``zipfile`` lists them (a rewritten zip is read again)."""

from __future__ import annotations

import os
import random
import zipfile

from edgeslim.data.files import ZipReader, parent_folders, zip_names
from edgeslim.data.inputs import has_labels


def _plain_parents(files):
    dirs = set()
    for f in files:
        parts = f.split("/")[:-1]
        dirs.update("/".join(parts[: k + 1]) for k in range(len(parts)))
    return dirs


def test_parent_folders_equal_the_per_file_loop():
    rnd = random.Random(0)
    words = ["a", "b", "cat", "dog", "x.y", "train", "test", "a b"]
    files = ["/".join(rnd.choice(words) for _ in range(rnd.randint(1, 5))) + f"/{i}.jpg" for i in range(3000)]
    files += ["top.jpg", "a/b.jpg", "a/b/c/d/e/f.png", "x.y/z"]
    assert parent_folders(files) == _plain_parents(files)
    assert parent_folders([]) == set() and parent_folders(["only.jpg"]) == set()


def test_zip_reader_names_and_cached_listing(tmp_path):
    path = tmp_path / "set.zip"
    members = ["train/cat/1.jpg", "train/dog/2.jpg", "test/cat/3.jpg", "readme.txt"]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("empty/", "")
        for m in members:
            zf.writestr(m, b"x")
    with zipfile.ZipFile(path) as zf:
        assert zip_names(path) == tuple(zf.namelist())
    files, dirs = ZipReader(path).names()
    assert files == sorted(members)
    assert dirs == {"empty", "train", "train/cat", "train/dog", "test", "test/cat"}
    assert has_labels(path) is True  # two class-like top folders (train, test), no images at the top
    st = os.stat(path)
    with zipfile.ZipFile(path, "w") as zf:  # rewritten: a flat folder of images, read again
        for i in range(3):
            zf.writestr(f"{i}.jpg", b"xy")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with zipfile.ZipFile(path) as zf:
        assert zip_names(path) == tuple(zf.namelist()) == ("0.jpg", "1.jpg", "2.jpg")
    assert has_labels(path) is False


def test_listing_and_reading_share_one_parse_of_the_central_directory(tmp_path, monkeypatch):
    path = tmp_path / "one.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(5):
            zf.writestr(f"c{i % 2}/{i}.jpg", bytes([i]) * (i + 1))
    parses = []
    real = zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: (parses.append(1), real(self))[1])
    names = zip_names(path)
    a, b = ZipReader(path), ZipReader(path)
    assert a.names() == b.names() and len(names) == 5
    assert [a.read(f"c{i % 2}/{i}.jpg") for i in range(5)] == [bytes([i]) * (i + 1) for i in range(5)]
    a.close()  # one reader closing leaves the other's reads working
    assert b.read("c1/3.jpg") == bytes([3]) * 4
    assert len(parses) == 1
