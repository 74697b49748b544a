"""A user's map-style ``torch.utils.data.Dataset`` of images as a sove source (``data.source=python``,
set by ``sove.pretrain(dataset=...)``; docs/python_api.md).

:class:`PythonSource` reads the user's items on access (nothing is copied) and returns what every
source returns (:mod:`sove.data.sources`): ``(uint8 image (channels, height, width), int label)``.
An item is an image or an ``(image, label)`` tuple; an image is a PIL image, a uint8 numpy array
(height, width) / (height, width, 1 | 3), or a uint8 torch tensor (height, width) / (1 | 3, height, width).
PIL images are converted as image files are (:mod:`sove.data.decode`: transparency on white, 16-bit
scaled); grayscale becomes RGB by repetition, RGB grayscale by ITU-R 601-2 luma (torchvision).

A run's ``config.yaml`` records ``data.source: python`` and, in ``data.root``, a description of the
dataset (:func:`describe`): the images are not on disk, so ``sove eval`` or ``sove pretrain --resume``
of such a run stop with :data:`NOT_ON_DISK` instead of reading some default data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from sove.data.decode import CHANNEL_MODES, _DECODE_ERRORS, _to_mode
from sove.errors import DataError, SoveError

#: What an item may be (the error for any other names it).
ACCEPTED = ("a PIL image, a uint8 numpy array (H, W) or (H, W, 1|3), a uint8 torch tensor (H, W) or (1|3, H, W), "
            "or an (image, int label) tuple of one of these")
#: Why a ``data.source=python`` run cannot be read again from its config (``{root}``: its description).
NOT_ON_DISK = ("data.source=python: the images come from a Python dataset ({root}) given to sove.pretrain(dataset=...), "
               "which sove cannot read from a config: set it only through sove.pretrain / sove.resume (dataset=); "
               "to evaluate such a run use data.source=folder data.root=TRAIN data.test_root=TEST (or --backbone "
               "with your own folder)")
#: What the user's ``__getitem__`` may raise for one unreadable image (reported and skipped, ``data.on_error``).
UNREADABLE = (OSError, EOFError, Image.DecompressionBombError)


def describe(dataset: Any) -> str:
    """``data.root`` of a run on ``dataset``: ``python:TYPE (N items)``; a resume checks it is unchanged."""
    return f"python:{type(dataset).__name__} ({len(dataset)} items)"


def dataset_labels(dataset: Any) -> np.ndarray | None:
    """int64 labels (N,) from the dataset's ``targets`` (torchvision's name) or ``labels`` attribute, else None.

    Raises:
        SoveError: the attribute's length is not ``len(dataset)`` or it holds a non-integer or negative label.
    """
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is None:
            continue
        labels = np.asarray(values.tolist() if torch.is_tensor(values) else values)
        if labels.shape != (len(dataset),) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            raise SoveError(f"dataset.{name}: needs one int label >= 0 per item ({len(dataset)}), got "
                            f"shape {labels.shape} of {labels.dtype}; fix it or remove the attribute")
        return labels.astype(np.int64)
    return None


class PythonSource(Dataset):
    """A user dataset as a sove source (module docstring); item 0 is read once to check its type.

    Args:
        dataset: a map-style dataset (``len`` and integer indexing), e.g. a list of PIL images.
        num_channels: ``data.num_channels`` of every returned image (1 or 3).

    Attributes:
        labels: int64 numpy array (N,) from the dataset's ``targets`` / ``labels`` attribute, or None:
            concept purity and the periodic k-NN need them (the items' own labels are not scanned).
        classes: the dataset's ``classes`` when it has as many names as labels, else ``"0"``, ``"1"``, ...
            (None without labels).
        description: :func:`describe` of the dataset.

    Raises:
        SoveError: an iterable-style or empty dataset; bad labels (:func:`dataset_labels`); item 0 of
            another type (:meth:`__getitem__`).
    """

    def __init__(self, dataset: Any, num_channels: int = 3) -> None:
        indexable = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        if isinstance(dataset, IterableDataset) or not indexable:
            raise SoveError(f"dataset=: a {type(dataset).__name__} is not a map-style dataset (len and indexing) "
                            "nor a folder path; wrap it in a torch.utils.data.Dataset")
        if len(dataset) == 0:
            raise SoveError(f"dataset=: the {type(dataset).__name__} is empty")
        self.dataset, self.num_channels = dataset, num_channels
        self.description = describe(dataset)
        self.labels = dataset_labels(dataset)
        self.classes = None
        if self.labels is not None:
            names = list(getattr(dataset, "classes", None) or [])
            count = int(self.labels.max()) + 1
            self.classes = [str(c) for c in names] if len(names) >= count else [str(k) for k in range(count)]
        try:
            self[0]  # a wrong item type stops here, before any work
        except DataError:
            pass  # an unreadable item 0 is skipped in training like any other (data.on_error)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` as ``(uint8 image (num_channels, height, width), label)``; the label is the
        ``labels`` entry, else the item's own, else -1.

        Raises:
            SoveError: the item is not of an accepted type (names the index and the accepted types).
            DataError: the user's ``__getitem__`` raised an OSError (e.g. an unreadable file) or the
                PIL image cannot be decoded: skipped and reported under ``data.on_error=skip``.
        """
        try:
            item = self.dataset[index]
        except UNREADABLE as e:
            raise DataError(f"dataset item {index} ({self.description}): {type(e).__name__}: {e}") from e
        label = -1
        if isinstance(item, (tuple, list)) and len(item) == 2:
            item, label = item
        image = self._image(item, index)
        if self.labels is not None:
            label = int(self.labels[index])
        elif not isinstance(label, (int, np.integer)) and not (torch.is_tensor(label) and label.numel() == 1):
            raise SoveError(f"dataset item {index}: the label is a {type(label).__name__}; accepted: {ACCEPTED}")
        return image, int(label)

    def _image(self, item: Any, index: int) -> torch.Tensor:
        """uint8 (num_channels, H, W) of one accepted image; SoveError naming ``index`` otherwise."""
        if isinstance(item, Image.Image):
            try:  # a lazily opened file decodes here
                array = np.array(_to_mode(ImageOps.exif_transpose(item), CHANNEL_MODES[self.num_channels]))
            except _DECODE_ERRORS as e:
                raise DataError(f"dataset item {index} ({self.description}): cannot decode the PIL image "
                                f"({type(e).__name__}: {e})") from e
            image = torch.from_numpy(array)
            return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and (
                item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3))):
            image = torch.from_numpy(np.ascontiguousarray(item))
            image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        elif torch.is_tensor(item) and item.dtype == torch.uint8 and (
                item.ndim == 2 or (item.ndim == 3 and item.shape[0] in (1, 3))):
            image = item.unsqueeze(0) if item.ndim == 2 else item
        else:
            what = (f"{type(item).__name__} of dtype {item.dtype} and shape {tuple(item.shape)}"
                    if hasattr(item, "dtype") and hasattr(item, "shape") else type(item).__name__)
            raise SoveError(f"dataset item {index} is a {what}; accepted: {ACCEPTED}")
        if image.shape[0] == self.num_channels:
            return image.contiguous()
        if self.num_channels == 3:
            return image.expand(3, -1, -1).contiguous()
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        return rgb_to_grayscale(image)
