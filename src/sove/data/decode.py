"""Decode one image file into a uint8 tensor, whatever its mode, orientation or damage.

Every image source that reads files goes through :func:`decode_image`, so odd images are
handled in one place:

* grayscale, bilevel ("1"), palette ("P"), RGB, CMYK and YCbCr images are converted with
  Pillow; CMYK JPEGs are read with Adobe's inverted-CMYK convention and converted to RGB
  without their ICC profile (colours close to, not exactly, what a colour-managed viewer shows);
* transparency (RGBA, LA, PA, a palette or grayscale PNG with a ``tRNS`` chunk) is
  composited over a white background, as a browser shows it on a blank page, instead of
  keeping the undefined colour under transparent pixels;
* 16-bit grayscale ("I;16", "I;16B", "I" from 16-bit PNG / TIFF / PGM) is scaled to 8 bit
  by its bit depth (``value >> 8``), not clipped at 255 as ``Image.convert("L")`` does;
  "I" images are assumed to hold 16-bit values and anything above 65535 saturates;
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``);
* the first frame of an animated GIF / WebP or a multi-page TIFF is used.

Very large images: Pillow's decompression-bomb guard is left as it is (a process-wide
setting, ``PIL.Image.MAX_IMAGE_PIXELS``, default ~89 M pixels: Pillow warns above it and
raises above twice it, ~179 M pixels). An image over the hard limit is reported as
unreadable with that reason, so with ``SSLDataset(on_error="skip")`` pretraining passes it
over: decoding it on every access would take seconds and gigabytes per worker. Raise
``PIL.Image.MAX_IMAGE_PIXELS`` in your own code to accept such images.

Truncated, empty and non-image files raise :class:`sove.errors.DataError` naming the path
and the reason. Truncation is detected because the pixels are loaded inside the ``try``
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sove.errors import DataError

CHANNEL_MODES = {1: "L", 3: "RGB"}
BACKGROUND = (255, 255, 255, 255)  # white, opaque: what transparent pixels become
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# What Pillow raises on damaged or hostile files: OSError (truncated data, decoder errors,
# UnidentifiedImageError, missing file), ValueError / SyntaxError / EOFError / struct.error /
# KeyError / IndexError / TypeError from malformed headers or metadata, and the bomb guard.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, KeyError, IndexError, TypeError,
    Image.DecompressionBombError,
)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` converted to ``mode`` ("L" or "RGB"): 16 bit scaled, transparency on white."""
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        gray = np.array(img).astype(np.int64)  # (H, W)
        img = Image.fromarray((np.clip(gray, 0, 65535) >> 8).astype(np.uint8))
    elif img.mode in _ALPHA_MODES or "transparency" in img.info:
        background = Image.new("RGBA", img.size, BACKGROUND)
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)


def _failure_reason(path: str | Path, error: Exception, data: bytes | None = None) -> str:
    """A short, human reason why ``path`` (or its bytes ``data``) could not be decoded."""
    if isinstance(error, OSError) and error.errno is not None:  # missing, no permission, ...
        return f"cannot read the file ({error.strerror})"
    size = len(data) if data is not None else path.stat().st_size if path.is_file() else None
    if size == 0:
        return "empty file (0 bytes)"
    if isinstance(error, Image.DecompressionBombError):
        return (f"too large for Pillow's decompression-bomb guard ({error}); downscale it or "
                "raise PIL.Image.MAX_IMAGE_PIXELS")
    if isinstance(error, UnidentifiedImageError):
        return "not an image in a format Pillow can read"
    return f"truncated or corrupt ({type(error).__name__}: {error})"


def decode_array(path: str | Path, num_channels: int, data: bytes | None = None) -> np.ndarray:
    """:func:`decode_image` as a numpy array: uint8, shape (height, width) for 1 channel, (height,
    width, 3) for 3; same arguments and errors. ``sove shard`` checks files with it."""
    if num_channels not in CHANNEL_MODES:
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    if data is None:
        path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()  # decode now, inside the try, so truncated data raise here
            img = _to_mode(ImageOps.exif_transpose(img), CHANNEL_MODES[num_channels])
            return np.array(img, dtype=np.uint8)  # (H, W) or (H, W, 3), writable copy
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image '{path}': {_failure_reason(path, e, data)}") from e


def decode_image(path: str | Path, num_channels: int, data: bytes | None = None) -> torch.Tensor:
    """Decode the image file ``path`` (see the module docstring for the odd cases handled).

    Args:
        path: image file (any format Pillow reads: JPEG, PNG, WebP, BMP, TIFF, GIF, ...); with ``data``,
            only the name used in error messages (kept as given, e.g. a URI).
        num_channels: 1 decodes to grayscale ("L"), 3 to "RGB".
        data: the file's bytes, already read (an item of a shard, :mod:`sove.data.shards`): decoded
            exactly as the file would be.

    Returns:
        uint8 tensor, shape (num_channels, height, width), height and width after the
        EXIF rotation.

    Raises:
        ValueError: ``num_channels`` is not 1 or 3.
        DataError: the file is missing, empty, not an image, truncated or corrupt, or over
            Pillow's decompression-bomb limit; the one-line message names the path and the
            reason: ``cannot decode image '<path>': <reason>``.
    """
    image = torch.from_numpy(decode_array(path, num_channels, data))
    return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()


def unreadable_report(messages: list[str], total: int, list_path: str | Path) -> str:
    """Write the unreadable files to ``list_path`` (one message per line) and summarise them.

    Args:
        messages: one :class:`DataError` message per distinct unreadable file (it names the path).
        total: images listed, readable or not.
        list_path: the text file to (over)write; its folder is created.

    Returns:
        ``skipped N unreadable file(s) of TOTAL (list in LIST_PATH); TOTAL - N images used``.
    """
    list_path = Path(list_path)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("".join(m + "\n" for m in messages))
    n = len(messages)
    return (f"skipped {n} unreadable file{'' if n == 1 else 's'} of {total} (list in {list_path}); "
            f"{total - n} images used")


#: Appended to the error of an unreadable image under ``data.on_error=raise``.
RAISE_HINT = "data.on_error=raise stops at the first unreadable image; data.on_error=skip leaves such files out"
