"""Image sources: IDX parsing, Fashion-MNIST lookup, ImageFolder listing and labels."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sove.data import FashionMNIST, ImageFolder, build_source, find_fashion_mnist, read_idx
from sove.errors import DataError

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when the name ends in .gz."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


def _tiny_images() -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 255
    images[1, 27, 27] = 7
    images[2] = np.arange(28 * 28).reshape(28, 28) % 256
    return images, np.array([9, 0, 4], dtype=np.uint8)


def _write_fashion_mnist(folder: Path, skip: str | None = None, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _tiny_images()
    for stem in STEMS:
        if stem != skip:
            array = images if "images" in stem else labels
            _write_idx(folder / (stem + (".gz" if gz else "")), array)


def test_read_idx_exact_values(tmp_path):
    images, labels = _tiny_images()
    _write_idx(tmp_path / "x.gz", images)
    _write_idx(tmp_path / "y", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", ndim=3), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "y", ndim=1), labels)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_tensors(tmp_path, gz):
    _write_fashion_mnist(tmp_path, gz=gz)
    ds = FashionMNIST(tmp_path, split="test")
    images, labels = _tiny_images()
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (3, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [9, 0, 4]
    image, label = ds[1]
    assert image.shape == (1, 28, 28) and int(image[0, 27, 27]) == 7 and int(image.sum()) == 7
    assert label == 0 and isinstance(label, int)
    assert len(ds) == 3 and ds.num_channels == 1 and ds.classes[9] == "Ankle boot"


def test_bad_magic_names_file(tmp_path):
    _write_fashion_mnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(bad, np.zeros(3, dtype=np.uint8), magic=0x0803)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        FashionMNIST(tmp_path, split="train")


def test_truncated_file_names_file(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(struct.pack(">II", 0x0801, 5) + b"\x00\x01")
    with pytest.raises(DataError, match="short.*truncated"):
        read_idx(path, ndim=1)


def test_find_missing_root_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"data.root '{missing}' does not exist"):
        find_fashion_mnist(missing)


def test_find_root_missing_one_file_names_it(tmp_path):
    _write_fashion_mnist(tmp_path, skip="t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as info:
        find_fashion_mnist(tmp_path)
    assert "train-images" not in str(info.value) and "\n" not in str(info.value)


def test_find_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fashion_mnist(raw, gz=False)
    assert find_fashion_mnist(tmp_path) == raw
    assert build_source("fashion_mnist", str(tmp_path), split="train").labels.tolist() == [9, 0, 4]


def test_find_nothing_lists_paths_and_fixes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "sove.data.sources.DEFAULT_FASHION_MNIST_DIRS", (str(tmp_path / "a"), "data")
    )
    with pytest.raises(DataError) as info:
        find_fashion_mnist(None)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "a") in message
    assert "data/FashionMNIST/raw" in message
    for fix in ("apt-get install dataset-fashion-mnist", "data.root=PATH", "data.download=true"):
        assert fix in message


def _save(path: Path, value: int, size=(5, 4), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 0, 0)).save(path)


def test_image_folder_flat(tmp_path):
    _save(tmp_path / "b.png", 20)
    _save(tmp_path / "a.PNG", 10)  # upper-case extension
    _save(tmp_path / ".hidden.png", 99)
    _save(tmp_path / ".cache" / "c.png", 99)
    (tmp_path / "notes.txt").write_text("x")
    ds = ImageFolder(tmp_path, num_channels=1)
    assert [f.name for f in ds.files] == ["a.PNG", "b.png"]
    assert ds.labels is None and ds.classes is None
    image, label = ds[0]
    assert label == -1 and image.dtype == torch.uint8 and image.shape == (1, 4, 5)
    assert torch.all(image == 10)


def test_image_folder_nested_labels(tmp_path):
    _save(tmp_path / "zebra" / "1.jpg", 50, mode="RGB")
    _save(tmp_path / "ant" / "2.png", 60, mode="RGB")
    _save(tmp_path / "ant" / "1.png", 70, mode="RGB")
    ds = ImageFolder(tmp_path, num_channels=3)
    assert ds.classes == ["ant", "zebra"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert [f.name for f in ds.files] == ["1.png", "2.png", "1.jpg"]
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 4, 5)
    assert image[:, 0, 0].tolist() == [70, 0, 0]


def test_image_folder_mixed_depth_is_unlabelled(tmp_path):
    _save(tmp_path / "top.png", 1)
    _save(tmp_path / "cls" / "inner.png", 2)
    ds = ImageFolder(tmp_path, num_channels=1)
    assert ds.labels is None and len(ds) == 2 and ds[1][1] == -1


@pytest.mark.parametrize("with_text", [False, True])
def test_image_folder_without_images(tmp_path, with_text):
    if with_text:
        (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=f"no images found under '{tmp_path}'"):
        ImageFolder(tmp_path)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match="data.root '.*nope' does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")  # was "data.root ... does not exist" for an existing file / a test_root
    with pytest.raises(DataError) as err:
        build_source("folder", tmp_path, "test", test_root=tmp_path / "file")
    assert str(err.value) == f"data.test_root '{tmp_path / 'file'}' is not a folder"


def test_build_source_errors(tmp_path):
    with pytest.raises(DataError, match="data.source 'imagenet'.*fashion_mnist, folder"):
        build_source("imagenet", str(tmp_path))
    with pytest.raises(DataError, match="data.test_root"):
        build_source("folder", str(tmp_path), split="test")
    _save(tmp_path / "t" / "x.png", 3)
    ds = build_source("folder", None, split="test", test_root=str(tmp_path / "t"))
    assert len(ds) == 1 and ds[0][0].shape == (1, 4, 5)


def test_image_folder_corrupt_file_names_it(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image '.*bad.png'"):
        ImageFolder(tmp_path, num_channels=1)[0]


def test_listing_survives_a_symlink_cycle_and_lists_each_file_once(tmp_path, capsys):
    _save(tmp_path / "a" / "1.png", 10)
    _save(tmp_path / "a" / "2.png", 20)
    _save(tmp_path / "b" / "3.png", 30)
    (tmp_path / "a" / "loop").symlink_to("..")  # a cycle: a/loop/a/loop/...
    (tmp_path / "b" / "link.png").symlink_to(tmp_path / "a" / "1.png")
    os.link(tmp_path / "a" / "2.png", tmp_path / "b" / "hard.png")
    ds = ImageFolder(tmp_path, num_channels=1)  # before: 164 paths, a/loop/a/1.png ..., no labels
    assert [f.relative_to(tmp_path).as_posix() for f in ds.files] == ["a/1.png", "a/2.png", "b/3.png"]
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1]
    assert capsys.readouterr().err == (
        f"warning: '{tmp_path}': left out 1 folder(s) and 2 file(s) reached again through symbolic or hard links "
        f"(e.g. folder '{tmp_path / 'a' / 'loop'}' is '{tmp_path}'); each real file and folder is listed once\n")


def test_listing_survives_links_that_point_to_themselves(tmp_path):
    _save(tmp_path / "a" / "1.png", 10)
    (tmp_path / "a" / "self.png").symlink_to("self.png")  # ELOOP on stat: was an OSError traceback
    (tmp_path / "a" / "x").symlink_to("y")
    (tmp_path / "a" / "y").symlink_to("x")
    ds = ImageFolder(tmp_path, num_channels=1)
    assert [f.relative_to(tmp_path).as_posix() for f in ds.files] == ["a/1.png", "a/self.png"]


def test_labels_numbered_by_the_given_class_names(tmp_path, capsys):
    _save(tmp_path / "ant" / "1.png", 1)
    (tmp_path / "bee").mkdir()  # empty: no class of its own
    _save(tmp_path / "zebra" / "2.png", 2)
    assert ImageFolder(tmp_path, num_channels=1).labels.tolist() == [0, 1]
    ds = build_source("folder", None, "test", test_root=tmp_path, classes=["ant", "bee", "zebra"])
    assert ds.classes == ["ant", "bee", "zebra"] and ds.labels.tolist() == [0, 2]
    _save(tmp_path / "yak" / "3.png", 3)
    _save(tmp_path / "yak" / "4.png", 4)
    ds = ImageFolder(tmp_path, num_channels=1, classes=["ant", "bee", "zebra"])
    assert [f.name for f in ds.files] == ["1.png", "2.png"] and ds.labels.tolist() == [0, 2]
    assert capsys.readouterr().err == (f"warning: '{tmp_path}': class(es) 'yak' (2 images) not in the train "
                                       "split's classes; their 2 images are left out\n")
    with pytest.raises(DataError, match=f"no image of '{tmp_path}' is in a class of the train split \\(cat, dog\\); "
                                        "its sub-folders are ant, yak, zebra"):
        ImageFolder(tmp_path, num_channels=1, classes=["cat", "dog"])


def test_a_class_layout_with_stray_files_is_read_unlabelled_with_a_warning(tmp_path, capsys):
    """Regression: a class folder holding a nested sub-folder (or an image at the top level) made the whole
    folder unlabelled silently; evaluation later said only 'has no labels'."""
    from sove.data.sources import ImageFolder

    for name in ("a/1.png", "a/2.png", "b/3.png", "b/deeper/4.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 100).save(tmp_path / name)
    source = ImageFolder(tmp_path)
    assert source.labels is None and len(source) == 4
    assert capsys.readouterr().err == (
        f"warning: '{tmp_path}': read as unlabelled: 1 of 4 images are not at '{tmp_path}/CLASS/IMAGE' "
        f"(e.g. '{tmp_path / 'b/deeper/4.png'}'); labels (evaluation, concept purity) need every image in one "
        "sub-folder per class\n")
