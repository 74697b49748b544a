"""Image sources: Fashion-MNIST from its IDX files, a generic folder of images, and shards of one
(:mod:`sove.data.shards`).

A *source* is a map-style :class:`torch.utils.data.Dataset` whose ``__getitem__`` returns
``(image, label)`` with ``image`` a uint8 tensor of shape (channels, height, width) and
``label`` a Python ``int`` (``-1`` when the source has no labels). Augmentation and masking
(docs/method.md, "Views and augmentation") are applied on top of a source by :class:`sove.data.multicrop.SSLDataset`.

Every failure a user can cause (missing folder, missing or corrupt file, bad config key)
raises :class:`sove.errors.DataError` with a one-line message naming the path or key and
what to do about it.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sove.choices import SOURCES
from sove.data.decode import decode_image
from sove.data.listing import list_images
from sove.errors import DataError, warn

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEFAULT_FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist", "data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

_IDX_UINT8 = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) holding unsigned bytes.

    The header is two zero bytes, a type byte (``0x08`` = uint8), a byte giving the number
    of dimensions, then one big-endian int32 per dimension; the data follow in C order.

    Args:
        path: file to read; a name ending in ``.gz`` is decompressed.
        ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
        uint8 array of the shape stored in the header, e.g. (images, height, width).

    Raises:
        DataError: the file cannot be read, its magic number is not an unsigned-byte IDX
            magic with ``ndim`` dimensions, or its size disagrees with the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file '{path}': {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8 or raw[3] != ndim:
        magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        expected = (_IDX_UINT8 << 8) | ndim
        raise DataError(
            f"bad IDX magic number {magic} in '{path}' (expected {expected}: uint8 data with "
            f"{ndim} dims); the file is corrupt or not Fashion-MNIST, download it again"
        )
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    expected_bytes = header + int(np.prod(dims))
    if len(raw) != expected_bytes:
        raise DataError(
            f"IDX file '{path}' holds {len(raw)} bytes but its header {dims} needs "
            f"{expected_bytes}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path | None:
    """The path of ``stem`` or ``stem.gz`` in ``folder`` (compressed preferred), or None."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    """Names of the four Fashion-MNIST files absent from ``folder`` (``.gz`` or not)."""
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    return [s + ".gz" for s in stems if _find_file(folder, s) is None]


def _fashion_mnist_dir(folder: Path) -> Path | None:
    """``folder`` or its torchvision layout ``folder/FashionMNIST/raw``, whichever is complete."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if candidate.is_dir() and not _missing_files(candidate):
            return candidate
    return None


def find_fashion_mnist(root: str | Path | None, download: bool = False) -> Path:
    """Locate the folder holding the four Fashion-MNIST IDX files.

    Search order: ``root`` if given (the files directly in it or in ``root/FashionMNIST/raw``,
    torchvision's layout); otherwise ``/usr/share/datasets/fashion-mnist``, then
    ``./data/fashion-mnist``, then ``./data`` (where ``download`` puts them), each also with
    the ``FashionMNIST/raw`` sub-folder. If nothing is found and ``download`` is True, the
    files are fetched with ``torchvision.datasets.FashionMNIST(root="./data", download=True)``.

    Args:
        root: the ``data.root`` config value, or None to search the default places.
        download: fetch the dataset into ``./data`` when it is not found.

    Returns:
        The folder containing the files (``.gz`` or uncompressed).

    Raises:
        DataError: ``root`` does not exist; ``root`` lacks some files (the message names
            them); or nothing was found and ``download`` is False (the message names every
            path tried and the fixes).
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data.root '{root}' does not exist")
        found = _fashion_mnist_dir(root)
        if found is None:
            missing = _missing_files(root)
            raise DataError(
                f"data.root '{root}' is missing Fashion-MNIST file(s) {', '.join(missing)} "
                f"(also looked in '{root / 'FashionMNIST' / 'raw'}')"
            )
        return found
    tried = []
    for folder in map(Path, DEFAULT_FASHION_MNIST_DIRS):
        tried += [str(folder), str(folder / "FashionMNIST" / "raw")]
        found = _fashion_mnist_dir(folder)
        if found is not None:
            return found.resolve()
    if download:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(root="data", train=True, download=True)
            torchvision.datasets.FashionMNIST(root="data", train=False, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading Fashion-MNIST into './data' failed: {e}") from e
        return (Path("data") / "FashionMNIST" / "raw").resolve()
    raise DataError(
        f"Fashion-MNIST not found (tried {', '.join(tried)}); fix: "
        "`apt-get install dataset-fashion-mnist`, or set data.root=PATH to a folder with the "
        "IDX files, or set data.download=true when online"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its IDX files into memory once.

    Args:
        root: folder with the IDX files (``.gz`` or uncompressed), directly or in
            ``root/FashionMNIST/raw``; see :func:`find_fashion_mnist`.
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).

    Attributes:
        images: uint8 tensor, shape (images, 1, 28, 28).
        labels: int64 numpy array, shape (images,), values in 0..9.
        classes: the 10 class names, indexed by label.
        num_channels: 1.

    Raises:
        DataError: unknown split, missing files, or a corrupt / non-IDX file.
    """

    num_channels = 1
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in FASHION_MNIST_FILES:
            raise DataError(f"data split '{split}' is unknown; use 'train' or 'test'")
        root = Path(root)
        folder = _fashion_mnist_dir(root) or root
        paths = []
        for stem in FASHION_MNIST_FILES[split]:
            path = _find_file(folder, stem)
            if path is None:
                raise DataError(f"Fashion-MNIST file '{folder / (stem + '.gz')}' not found")
            paths.append(path)
        images = read_idx(paths[0], ndim=3)  # (images, height, width)
        labels = read_idx(paths[1], ndim=1)  # (images,)
        if len(images) != len(labels):
            raise DataError(
                f"'{paths[0]}' holds {len(images)} images but '{paths[1]}' holds "
                f"{len(labels)} labels; download the dataset again"
            )
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # (images, 1, H, W)
        self.labels = labels.astype(np.int64)
        self.root = folder
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` as a uint8 tensor of shape (1, 28, 28) and its label."""
        return self.images[index], int(self.labels[index])


def label_by_name(names: Sequence[str], classes: Sequence[str] | None,
                  where: str | Path) -> tuple[list[str], np.ndarray, list[bool]]:
    """Labels of images given their class names (a labelled folder's sub-folders, a shard's classes).

    Args:
        names: the class name of every image.
        classes: the class names of another split, indexed by label (the train split's), or None:
            the sorted distinct ``names``.
        where: the folder or shard URI, for the messages.

    Returns:
        (class names by label, int64 labels of shape (kept images,), which images are kept). An image
        whose class is not in ``classes`` is left out, with one warning line naming the classes, the
        folder and the number of images.

    Raises:
        DataError: no image is of a class in ``classes``.
    """
    classes = sorted(set(names)) if classes is None else list(classes)
    to_label = {name: i for i, name in enumerate(classes)}
    unknown = Counter(name for name in names if name not in to_label)
    kept = [name in to_label for name in names]
    if unknown:
        if not any(kept):
            raise DataError(f"no image of '{where}' is in a class of the train split "
                            f"({', '.join(classes)}); its sub-folders are {', '.join(sorted(unknown))}")
        listed = ", ".join(f"'{name}' ({n} images)" for name, n in sorted(unknown.items()))
        warn(f"'{where}': class(es) {listed} not in the train split's classes; their "
             f"{sum(unknown.values())} images are left out")
    labels = np.array([to_label[name] for name, keep in zip(names, kept) if keep], dtype=np.int64)
    return classes, labels, kept


class ImageFolder(Dataset):
    """All images under a folder, decoded on each access with :func:`decode_image`.

    A flat folder (or any tree where some image is not exactly one level deep) has no
    labels; a folder whose images all lie in immediate sub-folders is labelled by
    sub-folder name, classes sorted alphabetically (a sub-folder without images is no class).
    Files are listed recursively in sorted order, each real file once (see
    :func:`sove.data.listing.list_images`); names starting with ``.`` (files or folders, e.g. ``.DS_Store``,
    macOS ``._x.jpg``) are skipped; extensions are matched case-insensitively (``.JPG``, ``.webp``).

    Args:
        root: the folder (``data.root``).
        num_channels: 1 decodes to grayscale ("L"), 3 to "RGB".
        extensions: accepted file name endings.
        classes: the class names of another split, indexed by label (the train split's
            ``classes``): a labelled folder then numbers its sub-folders by these names, so
            label ``i`` means ``classes[i]`` in both splits even when this folder lacks a class.
            Images of a sub-folder not in ``classes`` are left out, with one warning line
            naming the classes, the folder and the number of images.
        key: what names ``root`` in the error for a missing folder (``data.test_root``, ``--images``).

    Attributes:
        files: the image paths, sorted.
        labels: int64 numpy array of shape (images,), or None when unlabelled.
        classes: class names indexed by label (``classes`` when given, else the sorted
            sub-folder names), or None when unlabelled.
        num_channels: channels of every returned image.

    Raises:
        DataError: ``root`` is not a folder, holds no image file (or, with ``classes``, no image
            of a known class), ``num_channels`` is not 1 or 3, or (on access) an image cannot
            be decoded.
    """

    def __init__(
        self,
        root: str | Path,
        num_channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        classes: Sequence[str] | None = None,
        key: str = "data.root",
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{key} '{root}' " + ("is not a folder" if root.exists() else "does not exist"))
        if num_channels not in (1, 3):
            raise DataError(f"data.num_channels must be 1 or 3, got {num_channels}")
        self.files = list_images(root, extensions)
        if not self.files:
            raise DataError(f"no images found under '{root}' (extensions: {' '.join(extensions)})")
        self.root = root
        self.num_channels = num_channels
        self.classes, self.labels = None, None
        parts = [f.relative_to(root).parts for f in self.files]
        if all(len(p) == 2 for p in parts):
            self._label_by_folder([p[0] for p in parts], classes)
        elif any(len(p) == 2 for p in parts):  # a class layout spoilt by some files: say which, not silently
            odd = [f for f, p in zip(self.files, parts) if len(p) != 2]
            warn(f"'{root}': read as unlabelled: {len(odd)} of {len(parts)} images are not at "
                 f"'{root}/CLASS/IMAGE' (e.g. '{odd[0]}'); labels (evaluation, concept purity) need every image "
                 "in one sub-folder per class")

    def _label_by_folder(self, folders: list[str], classes: Sequence[str] | None) -> None:
        """Set ``classes`` and ``labels`` from each file's sub-folder name (see the class docstring)."""
        self.classes, self.labels, kept = label_by_name(folders, classes, self.root)
        self.files = [f for f, keep in zip(self.files, kept) if keep]

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.files[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` and its label.

        Returns:
            uint8 tensor of shape (num_channels, height, width) from :func:`decode_image`
            and the int label (-1 when unlabelled).

        Raises:
            DataError: the file cannot be decoded; the message names the path and reason.
        """
        label = -1 if self.labels is None else int(self.labels[index])
        return decode_image(self.files[index], self.num_channels), label


def build_source(
    source: str,
    root: str | Path | None,
    split: str = "train",
    download: bool = False,
    num_channels: int = 1,
    test_root: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Build the image source named by the ``data.*`` config keys.

    Args:
        source: ``data.source``, one of ``"fashion_mnist"``, ``"folder"`` or ``"shards"`` (``"python"``, a
            user's dataset given to ``sove.pretrain``, is not read from the config: the error says what to do).
        root: ``data.root``; for ``"fashion_mnist"`` None searches the default places
            (:func:`find_fashion_mnist`); for ``"folder"`` it is the train images folder, for
            ``"shards"`` the train shards' folder or object-store URI (:class:`sove.data.shards.ShardSource`).
        split: ``"train"`` or ``"test"``.
        download: ``data.download``, Fashion-MNIST only.
        num_channels: ``data.num_channels``; must be 1 for Fashion-MNIST.
        test_root: ``data.test_root``, the test images folder (``"folder"``) or shards (``"shards"``).
        classes: a labelled folder's class names by label, from the train split (see
            :class:`ImageFolder`); pass the train split's ``classes`` when building the test
            split so that a label means the same class in both. Fashion-MNIST always has its 10.

    Returns:
        A dataset returning ``(uint8 image (channels, height, width), int label)``.

    Raises:
        DataError: ``data.source=python`` (:data:`sove.data.python_source.NOT_ON_DISK`), unknown
            ``data.source`` or split, missing ``data.root`` /
            ``data.test_root`` for a folder source, or any error of the source itself.
    """
    if split not in ("train", "test"):
        raise DataError(f"data split '{split}' is unknown; use 'train' or 'test'")
    if source == "fashion_mnist":
        if num_channels != 1:
            raise DataError(
                f"data.num_channels must be 1 for data.source=fashion_mnist (the default source), got {num_channels}"
                + ("; for your own images set data.source=folder (or shards)" if root is not None else "")
            )
        return FashionMNIST(find_fashion_mnist(root, download=download), split=split)
    if source in ("folder", "shards"):
        if source == "folder":
            opener = ImageFolder
        else:
            from sove.data.shards import ShardSource as opener
        key, where = ("data.test_root", test_root) if split == "test" else ("data.root", root)
        if where is None:
            raise DataError(f"{key} is needed for the {split} split of data.source={source}")
        return opener(where, num_channels=num_channels, classes=classes, key=key)
    if source == "python":
        from sove.data.python_source import NOT_ON_DISK

        raise DataError(NOT_ON_DISK.format(root=root))
    raise DataError(f"data.source '{source}' is unknown; allowed: {', '.join(SOURCES)}")
