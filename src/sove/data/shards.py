"""Sharded image datasets: an image folder packed into LitData chunks, read locally or from object storage.

``sove shard --images DIR --out DIR`` (:func:`write_shards`) stores every readable image's *file bytes*
(the encoded JPEG / PNG / ..., not decoded pixels) with its label into LitData's chunk format
(``chunk-*.bin`` files of at most ``chunk_bytes`` and LitData's ``index.json``; items are
``(file bytes, label)`` tuples, label -1 when unlabelled) and writes one sidecar,
``sove_shards.json``, with the class names, every image's label and its path relative to ``--images``.
:class:`ShardSource` (``data.source=shards``) reads them back by index through
``litdata.StreamingDataset.__getitem__`` and decodes with :func:`sove.data.decode.decode_image`, so
its items are exactly those of :class:`sove.data.sources.ImageFolder` on the original folder.

Being a random-access source, shards use sove's own :class:`sove.data.sampler.ResumableSampler`
like every other source: each rank reads a disjoint part of every epoch and the position
(epoch, batch) is in the checkpoint, so a resume is exact. A remote URI (``s3://``, ``gs://``,
``azure://``, ...) is read through LitData's downloaders, which copy each chunk into a local cache
the first time one of its images is asked for (docs/configs.md, "Shards").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sove.data.decode import decode_array, decode_image, unreadable_report
from sove.data.sources import ImageFolder, label_by_name
from sove.errors import DataError, SoveError

#: The sidecar file of a shard folder (class names, labels and image names by index).
SHARD_INDEX = "sove_shards.json"
SHARD_FORMAT = "sove-shards/1"
#: Largest chunk file; LitData's suggested size for streaming from object storage.
CHUNK_BYTES = "64MB"
INSTALL_HINT = "pip install 'sove[shards]' (or: pip install litdata)"
SKIP_HINT = "--on-error raise stops at the first unreadable image; --on-error skip leaves such files out"


def require_litdata() -> Any:
    """The ``litdata`` module.

    Raises:
        SoveError: LitData is not installed; the message names the pip command.
    """
    try:
        import litdata
    except ImportError as e:
        raise SoveError(f"shards (data.source=shards, sove shard) need LitData, which is not installed; "
                        f"run: {INSTALL_HINT}") from e
    return litdata


def is_remote(uri: str | Path) -> bool:
    """Whether ``uri`` names object storage (``scheme://...``) rather than a local folder."""
    return "://" in str(uri)


def is_shard_folder(path: str | Path) -> bool:
    """Whether ``path`` is a remote URI or a local folder holding :data:`SHARD_INDEX`."""
    return is_remote(path) or (Path(path).expanduser() / SHARD_INDEX).is_file()


def _read_checked(path: Path) -> bytes:
    """The bytes of image file ``path``, checked to decode (:func:`sove.data.decode.decode_array`).

    Raises:
        DataError: the file cannot be read or decoded (``cannot decode image '<path>': <reason>``).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot decode image '{path}': cannot read the file ({e.strerror})") from e
    decode_array(path, 3, data)
    return data


def _fresh_out(out: Path) -> Path:
    """Check that ``out`` can be created (new, or an empty folder); return the staging folder beside it.

    Raises:
        SoveError: ``out`` is a file or a non-empty folder (shards are never written over).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SoveError(f"sove shard: --out '{out}' already exists and is not an empty folder; give a new "
                        "folder (existing shards are never written over)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def _pack(folder: ImageFolder, writer: Any, on_error: str, progress: bool) -> tuple[list[str], list[int], list[str]]:
    """Add every readable image of ``folder`` to the LitData ``writer`` as ``(file bytes, label)``, in order.

    Returns:
        (relative paths of the written images, their labels (-1 when unlabelled), messages of the skipped files).

    Raises:
        DataError: an unreadable file with ``on_error="raise"``.
    """
    names, labels, skipped = [], [], []
    with tqdm(total=len(folder), desc="shard", unit="image", disable=not progress) as bar:
        for i in range(len(folder)):
            bar.update()
            try:
                data = _read_checked(folder.path(i))
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"{e}; {SKIP_HINT}") from e
                skipped.append(str(e))
                continue
            label = -1 if folder.labels is None else int(folder.labels[i])
            writer.add_item(len(names), (data, label))  # a tuple: LitData reads it without a decode window
            names.append(folder.path(i).relative_to(folder.root).as_posix())
            labels.append(label)
    return names, labels, skipped


def write_shards(images: str | Path, out: str | Path, on_error: str = "skip", chunk_bytes: str | int = CHUNK_BYTES,
                 progress: bool = True) -> dict[str, Any]:
    """Pack the image folder ``images`` into LitData chunks in the new folder ``out``.

    Images are listed and labelled as :class:`sove.data.sources.ImageFolder` does (sorted; labels by
    sub-folder when every image lies one level deep, else none). Each file is decoded once to check it;
    the shards hold the file bytes unchanged. Everything is written into a hidden staging folder beside
    ``out`` that is renamed to ``out`` at the end, so an interrupted run leaves no half-written shards.

    Args:
        images: the image folder (``--images``).
        out: the shard folder to create (``--out``); a new or empty folder. Upload it to object storage
            with the provider's tool to read it from there (``data.root=s3://...``).
        on_error: unreadable file: ``"skip"`` (left out, listed in ``out/unreadable.txt``) or ``"raise"``.
        chunk_bytes: largest chunk file (LitData's ``chunk_bytes``: an int or e.g. ``"64MB"``).
        progress: show a progress bar (images per second) on stderr.

    Returns:
        dict with ``out``, ``num_images`` (written), ``num_chunks``, ``classes`` (None when unlabelled)
        and ``report`` (the one-line summary of the skipped files, None when every file was read).

    Raises:
        SoveError: LitData is missing, ``out`` exists and is not an empty folder, a bad ``on_error``;
            DataError: ``images`` is not a folder of images, an unreadable file with ``on_error="raise"``
            (named), or no readable image at all.
    """
    require_litdata()
    from litdata.streaming.writer import BinaryWriter

    if on_error not in ("skip", "raise"):
        raise SoveError(f"sove shard: --on-error must be skip or raise, got {on_error!r}")
    out = Path(out).expanduser()
    staging = _fresh_out(out)
    folder = ImageFolder(images, key="--images")
    try:
        try:
            writer = BinaryWriter(str(staging), chunk_bytes=chunk_bytes)
        except ValueError as e:
            raise SoveError(f"sove shard: --chunk-bytes {chunk_bytes!r} is not a size; give bytes or e.g. 64MB, "
                            "1GB") from e
        names, labels, skipped = _pack(folder, writer, on_error, progress)
        if not names:
            raise DataError(f"no readable image in '{folder.root}' ({len(skipped)} unreadable)")
        writer.done()
        writer.merge(1)
        num_chunks = len(list(staging.glob("chunk-*.bin")))
        meta = {"format": SHARD_FORMAT, "images": str(folder.root), "classes": folder.classes,
                "labels": None if folder.labels is None else labels, "names": names, "unreadable": len(skipped)}
        (staging / SHARD_INDEX).write_text(json.dumps(meta))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = unreadable_report(skipped, len(folder), out / "unreadable.txt") if skipped else None
    return {"out": str(out), "num_images": len(names), "num_chunks": num_chunks, "classes": folder.classes,
            "report": report}


def _open_streaming(uri: str, key: str) -> Any:
    """``litdata.StreamingDataset`` over the shards at ``uri`` (read in order, by index).

    Raises:
        DataError: a local ``uri`` that does not exist, or LitData cannot open the shards.
    """
    litdata = require_litdata()
    if not is_remote(uri):
        if not Path(uri).is_dir():
            raise DataError(f"{key} '{uri}' " + ("is not a folder" if Path(uri).exists() else "does not exist"))
        if not is_shard_folder(uri):
            raise DataError(f"{key} '{uri}' holds no shards (no {SHARD_INDEX}); make them with `sove shard "
                            f"--images '{uri}' --out SHARDS`, or read the images with data.source=folder")
    try:
        return litdata.StreamingDataset(uri, shuffle=False)
    except Exception as e:  # LitData and the cloud clients raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{key} '{uri}': cannot open the shards ({type(e).__name__}: {first}); make them with "
                        "`sove shard --images DIR --out DIR`") from e


def _read_meta(uri: str, dataset: Any, key: str) -> dict[str, Any]:
    """The sidecar :data:`SHARD_INDEX` of the shards at ``uri`` (downloaded next to LitData's cached
    ``index.json`` for a remote URI).

    Raises:
        DataError: it is missing or not sove's shard format.
    """
    if is_remote(uri):
        from litdata.streaming.downloader import get_downloader

        local = Path(dataset.input_dir.path) / SHARD_INDEX
        try:
            get_downloader(uri, str(local.parent), []).download_file(f"{uri.rstrip('/')}/{SHARD_INDEX}", str(local))
        except Exception as e:  # the cloud clients raise many types
            raise DataError(f"{key} '{uri}': cannot download {SHARD_INDEX} ({type(e).__name__}: {e})") from e
    else:
        local = Path(uri) / SHARD_INDEX
    try:
        meta = json.loads(local.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{key} '{uri}' has no readable {SHARD_INDEX} ({e}); these are not shards written by "
                        "`sove shard --images DIR --out DIR`") from e
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise DataError(f"{key} '{uri}': {SHARD_INDEX} is not in the format {SHARD_FORMAT}; write the shards again "
                        "with this version's `sove shard`")
    return meta


def _num_items(dataset: Any) -> int:
    """Items in all chunks, from LitData's ``index.json`` (``len(dataset)`` is only this rank's share
    when torch.distributed is initialised; sove's sampler splits the indices itself)."""
    index = json.loads((Path(dataset.input_dir.path) / "index.json").read_text())
    return sum(chunk["chunk_size"] for chunk in index["chunks"])


class ShardSource(Dataset):
    """The images of shards written by :func:`write_shards`, read by index (``data.source=shards``).

    Items equal those of :class:`sove.data.sources.ImageFolder` on the sharded folder (same order,
    same decoded pixels, same labels), so sampling, augmentation, resume and evaluation treat both
    alike.

    Args:
        uri: a local shard folder or an object-store URI (``s3://bucket/prefix``, ``gs://...``,
            ``azure://...``, ``hf://datasets/...``); see docs/configs.md, "Shards", for the credentials.
        num_channels: 1 decodes to grayscale ("L"), 3 to "RGB".
        classes: the class names of another split, indexed by label (the train split's): labels are
            numbered by them, images of other classes are left out with a warning (as ``ImageFolder``).
        key: the config key or option naming ``uri`` in error messages.

    Attributes:
        names: image paths relative to the sharded folder, by index.
        labels: int64 numpy array of shape (images,), or None when unlabelled.
        classes: class names indexed by label, or None when unlabelled.
        num_channels: channels of every returned image.

    Raises:
        SoveError: LitData is missing. DataError: bad ``num_channels``; ``uri`` missing, not shards,
            or its index and sidecar disagree; (on access) an image that cannot be decoded.
    """

    def __init__(self, uri: str | Path, num_channels: int = 3, classes: Sequence[str] | None = None,
                 key: str = "data.root") -> None:
        if num_channels not in (1, 3):
            raise DataError(f"data.num_channels must be 1 or 3, got {num_channels}")
        self.uri = str(uri) if is_remote(uri) else str(Path(uri).expanduser())
        self.num_channels = num_channels
        self.dataset = _open_streaming(self.uri, key)
        meta = _read_meta(self.uri, self.dataset, key)
        stored = _num_items(self.dataset)
        if len(meta["names"]) != stored:
            raise DataError(f"{key} '{self.uri}': {SHARD_INDEX} names {len(meta['names'])} images but the chunks "
                            f"hold {stored}; write the shards again")
        self.names: list[str] = list(meta["names"])
        self.rows = np.arange(len(self.names))  # chunk index of each item
        self.classes, self.labels = None, None
        if meta["labels"] is not None:
            by_name = [meta["classes"][label] for label in meta["labels"]]
            self.classes, self.labels, kept = label_by_name(by_name, classes, self.uri)
            self.rows = self.rows[np.array(kept, dtype=bool)]
            self.names = [name for name, keep in zip(self.names, kept) if keep]

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int) -> str:
        """Image ``index``'s path relative to the sharded folder."""
        return self.names[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` and its label.

        Returns:
            uint8 tensor of shape (num_channels, height, width) and the int label (-1 when unlabelled).

        Raises:
            DataError: the stored bytes cannot be decoded; the message names the shards and the image.
        """
        data, _ = self.dataset[int(self.rows[index])]
        image = decode_image(f"{self.uri}::{self.names[index]}", self.num_channels, bytes(data))
        return image, -1 if self.labels is None else int(self.labels[index])


def folder_or_shards(path: str | Path, num_channels: int, key: str) -> Dataset:
    """:class:`ShardSource` when ``path`` is shards (:func:`is_shard_folder`), else
    :class:`sove.data.sources.ImageFolder` (``sove embed --images`` takes either)."""
    if is_shard_folder(path):
        return ShardSource(path, num_channels=num_channels, key=key)
    return ImageFolder(path, num_channels=num_channels, key=key)
