"""Multi-crop augmentation, the self-supervised dataset and its collate function.

docs/method.md, "Views and augmentation" (DINO-style multi-crop): two global crops and ``num_local_crops`` local crops
per image, bicubic RandomResizedCrop, flip, colour jitter, grayscale, Gaussian blur and
solarization with view-specific probabilities; every view is normalised with mean / std.

The image kernels are ``torchvision.transforms.v2.functional``'s; the random parameters are
drawn here, all views' at once with one ``torch.rand`` call, instead of composing ``v2``
transform objects: on 28 px images a ``v2.Compose`` pipeline per view spent most of its
time in per-transform dispatch and parameter sampling (3.3 ms vs 1.2 ms per image for
6 views on one CPU core). The distributions match the ``v2``
transforms (RandomResizedCrop with ratio (3/4, 4/3) and 10 attempts, ColorJitter in random
order, GaussianBlur with sigma uniform in [0.1, 2]). Randomness comes from torch's global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from sove.choices import ON_ERROR
from sove.data.decode import RAISE_HINT
from sove.data.masking import build_mask_generator
from sove.errors import DataError
from sove.seeding import generator as seeded_generator

NUM_GLOBAL_CROPS = 2
CROP_ATTEMPTS = 10
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
MAX_CONSECUTIVE_FAILURES = 50  # on_error="skip" gives up after this many unreadable in a row
# Uniform draws per view: crop attempts x (scale, ratio, top, left), then
# flip, jitter?, 4 jitter factors, 4 jitter-order keys, grayscale?, blur?, sigma, solarize?.
_CROP_DRAWS = 4 * CROP_ATTEMPTS
_DRAWS = _CROP_DRAWS + 14


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian-blur kernel size of about 10% of the crop size, at least 3."""
    size = max(3, round(0.1 * crop_size))
    return size if size % 2 == 1 else size + 1


def random_crop_box(
    height: int, width: int, scale: tuple[float, float], draws: Sequence[float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, box_height, box_width) from uniform draws.

    Up to ``CROP_ATTEMPTS`` tries of an area fraction uniform in ``scale`` and an aspect
    ratio log-uniform in [3/4, 4/3]; if none fits, a central crop of the whole image with
    its aspect ratio clamped to that range.

    Args:
        height, width: image size in pixels.
        scale: (min, max) fraction of the image area.
        draws: ``4 * CROP_ATTEMPTS`` uniforms in [0, 1).
    """
    area = height * width
    for i in range(CROP_ATTEMPTS):
        u_scale, u_ratio, u_top, u_left = draws[4 * i : 4 * i + 4]
        target = area * (scale[0] + u_scale * (scale[1] - scale[0]))
        ratio = math.exp(CROP_LOG_RATIO[0] + u_ratio * (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]))
        box_w = round(math.sqrt(target * ratio))
        box_h = round(math.sqrt(target / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            top, left = int(u_top * (height - box_h + 1)), int(u_left * (width - box_w + 1))
            return top, left, box_h, box_w
    box_h, box_w = height, width
    if width / height < 3 / 4:
        box_h = min(height, round(width * 4 / 3))
    elif width / height > 4 / 3:
        box_w = min(width, round(height * 4 / 3))
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


@dataclass(frozen=True)
class ViewSpec:
    """One view's recipe: output size, crop scale, blur and solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCropAugmentation:
    """Multi-crop views of one image (docs/method.md, "Views and augmentation"; DINO's recipe).

    Every view: RandomResizedCrop (bicubic, antialiased) + horizontal flip p 0.5 + colour
    jitter (p ``color_jitter``, strengths brightness 0.4, contrast 0.4, saturation 0.2,
    hue 0.1, in random order) + grayscale (p ``grayscale_p``). Global view 1: Gaussian blur
    always. Global view 2: blur p 0.1, solarize p ``solarize_p``. Local views: blur p 0.5.
    Blur sigma is uniform in [0.1, 2] with an odd kernel of ~10% of the crop size. On
    1-channel input only brightness and contrast are jittered and grayscale is skipped.

    Args:
        global_crop_size: side of the global crops in pixels (224 in the paper preset).
        local_crop_size: side of the local crops in pixels (96 in the paper preset).
        num_local_crops: number of local crops (10 in the paper preset; 0 allowed).
        global_crop_scale: RandomResizedCrop area range of global crops.
        local_crop_scale: RandomResizedCrop area range of local crops.
        mean: per-channel normalisation mean (length 1 or ``num_channels``), in [0, 1] units.
        std: per-channel normalisation std (length 1 or ``num_channels``).
        num_channels: channels of the input images (1 or 3).
        color_jitter: probability of colour jitter (0 disables it).
        grayscale_p: probability of grayscale conversion (skipped when num_channels == 1).
        blur: enable the Gaussian blurs.
        solarize_p: probability of solarization of global view 2.

    Attributes:
        views: the :class:`ViewSpec` of every output view, globals first.

    Raises:
        ValueError: invalid sizes, probabilities, channels or mean / std values.

    Example:
        >>> aug = MultiCropAugmentation(28, 12, num_local_crops=4)
        >>> views = aug(torch.zeros(1, 32, 32, dtype=torch.uint8))
        >>> [tuple(v.shape) for v in views][:3]
        [(1, 28, 28), (1, 28, 28), (1, 12, 12)]
    """

    def __init__(
        self,
        global_crop_size: int,
        local_crop_size: int,
        num_local_crops: int,
        global_crop_scale: tuple[float, float] = (0.14, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        num_channels: int = 1,
        color_jitter: float = 0.8,
        grayscale_p: float = 0.2,
        blur: bool = True,
        solarize_p: float = 0.2,
    ) -> None:
        if global_crop_size < 1 or local_crop_size < 1 or num_local_crops < 0:
            raise ValueError(
                f"crop sizes must be >= 1 and num_local_crops >= 0, got global_crop_size="
                f"{global_crop_size}, local_crop_size={local_crop_size}, "
                f"num_local_crops={num_local_crops}"
            )
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        if len(mean) not in (1, num_channels) or len(std) not in (1, num_channels) or 0 in std:
            raise ValueError(
                f"mean {tuple(mean)} and std {tuple(std)} need 1 or num_channels="
                f"{num_channels} values, std non-zero"
            )
        for name, p in (("color_jitter", color_jitter), ("grayscale_p", grayscale_p),
                        ("solarize_p", solarize_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        for name, (low, high) in (("global_crop_scale", global_crop_scale),
                                  ("local_crop_scale", local_crop_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({low}, {high})")
        self.global_crop_size = global_crop_size
        self.local_crop_size = local_crop_size
        self.num_local_crops = num_local_crops
        self.num_channels = num_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (channels, 1, 1)
        self.color_jitter = color_jitter
        self.grayscale_p = grayscale_p if num_channels == 3 else 0.0
        blur_p = (1.0, 0.1, 0.5) if blur else (0.0, 0.0, 0.0)
        global_scale, local_scale = tuple(global_crop_scale), tuple(local_crop_scale)
        self.views = [
            ViewSpec(global_crop_size, global_scale, blur_p[0], 0.0),
            ViewSpec(global_crop_size, global_scale, blur_p[1], solarize_p),
        ] + [ViewSpec(local_crop_size, local_scale, blur_p[2], 0.0)] * num_local_crops

    def _jitter(self, view: torch.Tensor, u: Sequence[float]) -> torch.Tensor:
        """Colour jitter with factors from ``u[0:4]`` and op order from ``u[4:8]``."""
        num_ops = 2 if self.num_channels == 1 else 4
        for op in sorted(range(num_ops), key=lambda i: u[4 + i]):
            factor = 1.0 + JITTER_STRENGTH[op] * (2.0 * u[op] - 1.0)
            if op == 0:
                view = F.adjust_brightness_image(view, factor)
            elif op == 1:
                view = F.adjust_contrast_image(view, factor)
            elif op == 2:
                view = F.adjust_saturation_image(view, factor)
            else:
                view = F.adjust_hue_image(view, factor - 1.0)
        return view

    def _view(self, image: torch.Tensor, spec: ViewSpec, u: Sequence[float]) -> torch.Tensor:
        """One view of a float image (channels, height, width) in [0, 1] from uniforms ``u``."""
        top, left, box_h, box_w = random_crop_box(image.shape[-2], image.shape[-1], spec.scale,
                                                  u[:_CROP_DRAWS])
        view = F.resized_crop_image(image, top, left, box_h, box_w, [spec.size, spec.size],
                                    interpolation=InterpolationMode.BICUBIC, antialias=True)
        # Out of place: an unresized crop is a view of ``image``, shared by all views.
        view = view.clamp(0.0, 1.0)  # bicubic overshoots; keep the colour ops in range
        (flip, jitter, *jitter_u, gray, blur, sigma, solarize) = u[_CROP_DRAWS:]
        if flip < 0.5:
            view = F.horizontal_flip_image(view)
        if jitter < self.color_jitter:
            view = self._jitter(view, jitter_u)
        if gray < self.grayscale_p:
            view = F.rgb_to_grayscale_image(view, num_output_channels=3)
        if blur < spec.blur_p:
            s = BLUR_SIGMA[0] + sigma * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
            k = blur_kernel_size(spec.size)
            view = F.gaussian_blur_image(view, [k, k], [s, s])
        if solarize < spec.solarize_p:
            view = F.solarize_image(view, 0.5)
        return view.sub(self.mean).div_(self.std)  # `view` may be an expanded grayscale

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Make all views of one image.

        Args:
            image: uint8 tensor, shape (channels, height, width).

        Returns:
            float32 tensors ``[global_1, global_2, local_1, ..., local_N]``, globals of
            shape (channels, global_crop_size, global_crop_size), locals of shape
            (channels, local_crop_size, local_crop_size), normalised with mean / std.

        Raises:
            ValueError: the image is not uint8 (channels, height, width) with
                ``num_channels`` channels.
        """
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != self.num_channels:
            raise ValueError(
                f"expected a uint8 image of shape ({self.num_channels}, height, width), got "
                f"{image.dtype} {tuple(image.shape)}"
            )
        image = F.to_dtype_image(image, torch.float32, scale=True)  # (channels, H, W) in [0, 1]
        draws = torch.rand(len(self.views), _DRAWS, generator=generator).tolist()  # (views, draws)
        return [self._view(image, spec, u) for spec, u in zip(self.views, draws)]


class SSLDataset(Dataset):
    """Self-supervised dataset: multi-crop views and student masks of each source image.

    Each item holds the crops of :class:`MultiCropAugmentation` and one patch mask per
    global view (docs/method.md, "Masking": both student global views are masked, locals never). Crops
    and masks draw from the ``augmentation`` stream of the seed at keys (epoch, index) (:mod:`sove.seeding`): a
    sample's views depend neither on the global RNG, the number of DataLoader workers, the
    number of ranks, nor on where a resumed run restarted. Call :meth:`set_epoch` each epoch.

    Unreadable images: when the source raises :class:`DataError` for an index (a truncated,
    empty or non-image file), ``on_error="skip"`` uses the next readable index instead
    (``index + 1``, ``index + 2``, ... wrapping around), so one bad file never stops
    pretraining; the item's ``index`` is the index actually used and its ``skipped`` lists
    the error message (path and reason) of every image passed over. The replacement image
    then appears twice in that epoch. ``on_error="raise"`` stops with the file's error (plus
    what to change).

    Args:
        source: dataset returning ``(uint8 image (channels, height, width), int label)``.
        augmentation: the multi-crop augmentation.
        patch_size: pixels per output token of the backbone (ViT: the patch size; Swin: the
            final-stage stride, ``sove.config.token_stride``); the mask grid is
            (global_crop_size // patch_size)².
        mask_mode: ``mask.mode``, ``"blockwise"`` or ``"random"``.
        mask_ratio: ``mask.ratio`` in [0, 1).
        on_error: ``"skip"`` (default) or ``"raise"``, what to do with unreadable images.
        seed: the run's seed (``trainer.seed``).
        mask_fill_remainder: ``mask.fill_remainder``: blockwise masks topped up to the exact count.

    Attributes:
        grid: (height, width) patch grid of a global crop.
        num_patches: L = height * width.
        mask_generator: callable ``generator -> bool tensor (L,)``.

    Raises:
        ValueError: global_crop_size is not a multiple of patch_size, or ``on_error`` is
            not ``"skip"`` or ``"raise"``.
        DataError: invalid ``mask.mode`` or ``mask.ratio``.
    """

    def __init__(
        self,
        source: Dataset,
        augmentation: MultiCropAugmentation,
        patch_size: int,
        mask_mode: str = "blockwise",
        mask_ratio: float = 0.3,
        on_error: str = "skip",
        seed: int = 0,
        mask_fill_remainder: bool = False,
    ) -> None:
        size = augmentation.global_crop_size
        if patch_size < 1 or size % patch_size != 0:
            raise ValueError(
                f"global_crop_size ({size}) must be a multiple of patch_size ({patch_size})"
            )
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
        self.on_error = on_error
        self.source = source
        self.augmentation = augmentation
        self.grid = (size // patch_size, size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mask_generator = build_mask_generator(mask_mode, self.grid, mask_ratio, mask_fill_remainder)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation randomness ``__getitem__`` uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> tuple[torch.Tensor, int, int, list[str]]:
        """Source item ``index`` or, with ``on_error="skip"``, the next readable one.

        Returns:
            (image, label, index used, messages of the unreadable images passed over).

        Raises:
            DataError: ``on_error="raise"`` and the image is unreadable, or
                ``MAX_CONSECUTIVE_FAILURES`` images in a row (or all of them) are.
        """
        skipped: list[str] = []
        num_images = len(self.source)
        for step in range(min(MAX_CONSECUTIVE_FAILURES, num_images)):
            # Step 0 keeps ``index`` as given so an out-of-range index still raises IndexError.
            used = index if step == 0 else (index + step) % num_images
            try:
                image, label = self.source[used]
                return image, label, used, skipped
            except DataError as e:
                if self.on_error == "raise":
                    raise DataError(f"{e}; {RAISE_HINT}") from e
                skipped.append(str(e))
        raise DataError(
            f"{len(skipped)} images in a row from index {index} are unreadable (first: "
            f"{skipped[0]}); the data folder looks damaged, check data.root"
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item ``key``, an index or ``(epoch, index)`` (:class:`sove.data.sampler.EpochKeys`;
        a bare index uses :meth:`set_epoch`'s epoch), or the next readable one (class docstring).

        Returns:
            dict with ``crops`` (list of float32 tensors, see
            :meth:`MultiCropAugmentation.__call__`), ``masks`` (bool tensor, shape
            (2, L), one row per global view, True = masked), ``index`` (int, the source
            index actually used), ``label`` (int, -1 when unlabelled) and ``skipped``
            (list of str, one ``DataError`` message per unreadable image passed over,
            ``[]`` normally).

        Raises:
            DataError: see :meth:`_read`.
        """
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image, label, used, skipped = self._read(index)
        generator = seeded_generator(self.seed, "augmentation", epoch, used)
        crops = self.augmentation(image, generator)
        masks = torch.stack([self.mask_generator(generator) for _ in range(NUM_GLOBAL_CROPS)])
        return {"crops": crops, "masks": masks, "index": used, "label": int(label),
                "skipped": skipped}


def collate_views(samples: Sequence[dict]) -> dict:
    """Batch :class:`SSLDataset` items (use as the DataLoader's ``collate_fn``).

    Args:
        samples: B items from :meth:`SSLDataset.__getitem__`.

    Returns:
        dict with ``crops``: list over views of float32 tensors, shape (batch, channels,
        size, size), globals first; ``masks``: bool tensor, shape (2, batch, L);
        ``index``: int64 tensor, shape (batch,); ``label``: int64 tensor, shape (batch,);
        ``skipped``: list of str, the items' ``skipped`` messages concatenated in batch
        order (``[]`` when every image was readable).
    """
    num_views = len(samples[0]["crops"])
    crops = [torch.stack([s["crops"][v] for s in samples]) for v in range(num_views)]
    return {
        "crops": crops,
        "masks": torch.stack([s["masks"] for s in samples], dim=1),  # (2, batch, L)
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "skipped": [message for s in samples for message in s["skipped"]],
    }
