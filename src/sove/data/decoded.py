"""The loader half of ``data.augment_on=device``: decode, bound, draw; the views come later.

:class:`DecodedDataset` items hold the decoded uint8 image (its longer side bounded by
``data.max_image_side``), the sample's random draws and its patch masks; :class:`CollateDecoded`
pads a batch into one canvas and turns the draws into per-view parameters
(:func:`view_params`); :meth:`DecodedDataset.augment_batch` moves the batch to the training
device and makes the views there (:class:`sove.data.device_augment.DeviceMultiCrop`).

Same randomness as the loader path: a sample's draws come from the ``augmentation`` stream
(:mod:`sove.seeding`) at keys (epoch, index), consumed in the same order (the view draws, then the two
masks), so both paths give every sample the same crop boxes, flips, colour factors and masks;
only the resampling kernel differs (see :mod:`sove.data.device_augment`). The parameters are
computed on the CPU in float64, so they do not depend on the device either.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision.transforms.v2.functional as F

from sove.data.device_augment import DeviceMultiCrop
from sove.data.multicrop import (
    _CROP_DRAWS, _DRAWS, BLUR_SIGMA, CROP_ATTEMPTS, CROP_LOG_RATIO, NUM_GLOBAL_CROPS, JITTER_STRENGTH,
    MultiCropAugmentation, SSLDataset,
)
from sove.seeding import generator as seeded_generator


def bound_size(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """``image`` (C, H, W) uint8, downscaled (bilinear, antialiased, aspect kept) so that its
    longer side is at most ``max_side``; unchanged when it already is or ``max_side`` is 0."""
    height, width = image.shape[-2:]
    if max_side <= 0 or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return F.resize_image(image, size, antialias=True)


def crop_boxes(height: torch.Tensor, width: torch.Tensor, scale: tuple[float, float],
               u: torch.Tensor) -> torch.Tensor:
    """:func:`sove.data.multicrop.random_crop_box` for many crops at once, same numbers.

    Args:
        height, width: float64 (n,) image sizes in pixels.
        scale: (min, max) area fraction.
        u: float64 (n, 4 * CROP_ATTEMPTS) uniforms.

    Returns:
        float64 (n, 4): top, left, box height, box width (integers).
    """
    u = u.view(-1, CROP_ATTEMPTS, 4)
    h, w = height.unsqueeze(1), width.unsqueeze(1)
    target = h * w * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    ratio = torch.exp(CROP_LOG_RATIO[0] + u[..., 1] * (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]))
    box_w, box_h = torch.sqrt(target * ratio).round(), torch.sqrt(target / ratio).round()
    fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
    top, left = (u[..., 2] * (h - box_h + 1)).floor(), (u[..., 3] * (w - box_w + 1)).floor()
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits
    tried = torch.stack([top, left, box_h, box_w], -1).gather(1, first.unsqueeze(-1).expand(-1, 1, 4)).squeeze(1)
    # No attempt fits: the whole image, its aspect ratio clamped to [3/4, 4/3], centred.
    fb_h = torch.where(width / height < 3 / 4, torch.minimum(height, (width * 4 / 3).round()), height)
    fb_w = torch.where(width / height > 4 / 3, torch.minimum(width, (height * 4 / 3).round()), width)
    fallback = torch.stack([((height - fb_h) / 2).floor(), ((width - fb_w) / 2).floor(), fb_h, fb_w], -1)
    return torch.where(fits.any(1, keepdim=True), tried, fallback)


def view_params(draws: torch.Tensor, sizes: torch.Tensor, aug: MultiCropAugmentation) -> dict[str, torch.Tensor]:
    """Per-view parameters of a batch from its uniform draws, as the loader path reads them.

    Args:
        draws: float32 (B, V, _DRAWS), the rows ``MultiCropAugmentation.__call__`` draws.
        sizes: int64 (B, 2), (height, width) of every image.
        aug: the recipe.

    Returns:
        the ``params`` of :meth:`sove.data.device_augment.DeviceMultiCrop.crops` (CPU tensors).
    """
    batch, num_views = draws.shape[:2]
    u = draws.double()
    boxes = torch.empty(batch, num_views, 4, dtype=torch.float64)
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    for v, spec in enumerate(aug.views):
        boxes[:, v] = crop_boxes(h, w, spec.scale, u[:, v, :_CROP_DRAWS])
    top, left, box_h, box_w = boxes.unbind(-1)
    rest = u[..., _CROP_DRAWS:]  # flip, jitter?, 4 factors, 4 order keys, gray?, blur?, sigma, solarize?
    strength = torch.tensor(JITTER_STRENGTH, dtype=torch.float64)
    factors = 1.0 + strength * (2.0 * rest[..., 2:6] - 1.0)
    factors[..., 3] -= 1.0  # hue: a shift, not a factor
    num_ops = 2 if aug.num_channels == 1 else 4
    blur_p = torch.tensor([s.blur_p for s in aug.views], dtype=torch.float64)
    solarize_p = torch.tensor([s.solarize_p for s in aug.views], dtype=torch.float64)
    return {
        "boxes": torch.stack([left, top, left + box_w, top + box_h], -1).float(),
        "flip": rest[..., 0] < 0.5,
        "jitter": rest[..., 1] < aug.color_jitter,
        "factors": factors.float(),
        "order": torch.argsort(rest[..., 6:6 + num_ops], dim=-1, stable=True),
        "gray": rest[..., 10] < aug.grayscale_p,
        "blur": rest[..., 11] < blur_p,
        "sigma": (BLUR_SIGMA[0] + rest[..., 12] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])).float(),
        "solarize": rest[..., 13] < solarize_p,
    }


def pad_to_canvas(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (C, H_i, W_i) uint8 images into (B, C, max H, max W), each in the top-left corner,
    its last row and column replicated into the padding (so bilinear samples at an image's
    edge see the edge pixel, as in an unpadded image)."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    if all(i.shape[1:] == (height, width) for i in images):
        return torch.stack(list(images))
    canvas = torch.empty(len(images), images[0].shape[0], height, width, dtype=torch.uint8)
    for c, image in zip(canvas, images):
        h, w = image.shape[1:]
        c[:, :h, :w] = image
        c[:, :h, w:] = image[:, :, w - 1:]
        c[:, h:] = c[:, h - 1:h]
    return canvas


class CollateDecoded:
    """DataLoader ``collate_fn`` of :class:`DecodedDataset` (runs in the loader workers).

    Returns:
        dict with ``image`` uint8 (B, C, H, W) (see :func:`pad_to_canvas`), ``params`` (see
        :func:`view_params`), ``masks`` bool (2, B, L), ``index`` and ``label`` int64 (B,),
        ``skipped`` list of str.
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.aug = augmentation

    def __call__(self, samples: Sequence[dict]) -> dict:
        images = [s["image"] for s in samples]
        sizes = torch.tensor([i.shape[1:] for i in images], dtype=torch.int64)
        return {
            "image": pad_to_canvas(images),
            "params": view_params(torch.stack([s["draws"] for s in samples]), sizes, self.aug),
            "masks": torch.stack([s["masks"] for s in samples], dim=1),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "skipped": [m for s in samples for m in s["skipped"]],
        }


class DecodedDataset(SSLDataset):
    """:class:`SSLDataset` whose views are made on the training device (``data.augment_on=device``).

    Same arguments, errors and unreadable-image handling as :class:`SSLDataset`, plus
    ``max_image_side`` (``data.max_image_side``; 0 = no bound). Use :attr:`collate` as the
    DataLoader's ``collate_fn`` and :meth:`augment_batch` on each collated batch.
    """

    def __init__(self, *args, max_image_side: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if max_image_side < 0:
            raise ValueError(f"max_image_side must be >= 0, got {max_image_side}")
        self.max_image_side = max_image_side
        self.collate = CollateDecoded(self.augmentation)
        self.device_crops = DeviceMultiCrop(self.augmentation)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item ``key`` (an index, or (epoch, index)): ``image`` uint8 (C, H, W) with
        max(H, W) <= ``max_image_side``, ``draws`` float32 (V, _DRAWS), ``masks``, ``index``,
        ``label``, ``skipped`` as in :meth:`SSLDataset.__getitem__`."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image, label, used, skipped = self._read(index)
        aug = self.augmentation
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != aug.num_channels:
            raise ValueError(f"expected a uint8 image of shape ({aug.num_channels}, height, width), got "
                             f"{image.dtype} {tuple(image.shape)}")
        generator = seeded_generator(self.seed, "augmentation", epoch, used)
        draws = torch.rand(len(aug.views), _DRAWS, generator=generator)  # as MultiCropAugmentation
        masks = torch.stack([self.mask_generator(generator) for _ in range(NUM_GLOBAL_CROPS)])
        return {"image": bound_size(image, self.max_image_side), "draws": draws, "masks": masks,
                "index": used, "label": int(label), "skipped": skipped}

    def augment_batch(self, batch: dict, device: torch.device) -> dict:
        """Move a collated batch to ``device`` and make its views there.

        Returns:
            the batch of :func:`sove.data.multicrop.collate_views` (``crops``, ``masks``,
            ``index``, ``label``, ``skipped``), tensors on ``device``.
        """
        image = batch["image"].to(device, non_blocking=True)
        return {"crops": self.device_crops.crops(image, batch["params"]),
                "masks": batch["masks"].to(device, non_blocking=True),
                "index": batch["index"].to(device, non_blocking=True),
                "label": batch["label"].to(device, non_blocking=True), "skipped": batch["skipped"]}


class DeviceViews:
    """Iterable over a loader of :class:`DecodedDataset` batches that yields them with their views
    made on ``device`` (:meth:`DecodedDataset.augment_batch`): the one place where a batch of the
    device path reaches the training device.

    Args:
        loader: yields :class:`CollateDecoded` batches (CPU tensors, pinned on CUDA hosts).
        dataset: the :class:`DecodedDataset` behind ``loader``.
        device: the training device.
    """

    def __init__(self, loader, dataset: DecodedDataset, device: torch.device) -> None:
        self.loader, self.dataset, self.device = loader, dataset, device

    def __iter__(self):
        return (self.dataset.augment_batch(batch, self.device) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)
