"""The multi-crop recipe run batched on the training device (``data.augment_on=device``).

The loader workers of the device path only decode images, bound their size and draw each
sample's random numbers (:mod:`sove.data.decoded`); :class:`DeviceMultiCrop` turns a batch of
decoded images into the views of docs/method.md, "Views and augmentation", on whatever device
the batch is moved to (CPU or CUDA), with every sample's and view's own parameters:

* crop + resize: ``torchvision.ops.roi_align`` on the padded batch, one call per crop size.
  Chosen because it ships with torchvision (no new dependency, CPU and CUDA kernels), takes one
  box per output row with its batch index, and with ``sampling_ratio=-1`` averages
  ceil(box / output) bilinear samples per output pixel and axis, so large boxes are low-pass
  filtered (antialiased) rather than aliased. kornia's augmentation module was not used: its
  parameter sampling draws from torch's global RNG (not a per-sample seeded stream), its
  RandomResizedCrop does not antialias, and it would be a new dependency.
* flip, colour jitter (per-sample factors and per-sample random order), grayscale, Gaussian
  blur (per-sample sigma, separable grouped convolution), solarization and normalisation:
  torch tensor ops with torchvision's formulas (the ``torchvision.transforms.v2.functional``
  kernels take one scalar factor per call, not one per sample).

Interpolation differs from the loader path (bicubic with an antialias kernel, as DINO):
roi_align is bilinear with area supersampling. A crop whose box equals the output size is
copied exactly; resized crops differ by a few 1e-4 on average in [0, 1] units on smooth images
(more on sharp edges, bilinear being the softer kernel); see docs/benchmarks.md and
``tests/test_device_augment.py``. Every other step computes the loader path's pixels up to
float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torchvision.ops import roi_align

from sove.data.multicrop import NUM_GLOBAL_CROPS, MultiCropAugmentation, blur_kernel_size

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 0.5


def luminance(x: torch.Tensor) -> torch.Tensor:
    """Grayscale of RGB rows (n, 3, H, W) -> (n, 1, H, W), torchvision's weights."""
    r, g, b = x.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1]; ``factor`` has shape (n,)."""
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = luminance(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, luminance(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1)."""
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    chroma = value - low
    flat = chroma == 0
    sat = chroma / torch.where(flat, torch.ones_like(value), value)
    c = torch.where(flat, torch.ones_like(chroma), chroma)
    hue = torch.where(value == r, (g - b) / c, torch.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    hue = hue.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((hue, sat, value), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) HSV, hue in [0, 1) -> RGB: channel = v - v s clamp(min(k, 4 - k), 0, 1),
    k = (m + 6 h) mod 6 with m = 5, 3, 1 for red, green, blue."""
    hue, sat, value = x.unbind(1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (hue.unsqueeze(1) * 6.0 + offsets).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (value.unsqueeze(1) * (1.0 - sat.unsqueeze(1) * ramp)).clamp_(0.0, 1.0)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = hsv[:, 0].add(shift.view(-1, 1, 1)).remainder_(1.0)
    return hsv_to_rgb(hsv)


JITTER_OPS = (brightness, contrast, saturation, hue)  # index = position in JITTER_STRENGTH


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur every row (n, C, H, W) with its own sigma (n,): separable Gaussian of torchvision's
    form (softmax of -(t / sigma)^2, t spaced 1/sqrt(2) apart), reflect padding."""
    n, c, h, w = x.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.softmax(-(t / sigma.view(-1, 1)).pow(2), dim=1)  # (n, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * C, k)
    pad = kernel_size // 2
    y = nnf.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = nnf.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = nnf.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


class DeviceMultiCrop:
    """The views of :class:`MultiCropAugmentation`, made for a whole batch on its device.

    Args:
        augmentation: the recipe (sizes, probabilities, mean / std, channels); its random
            draws are turned into per-view parameters by :func:`sove.data.decoded.view_params`.

    Example:
        >>> batch = CollateDecoded(aug)([dataset[i] for i in range(8)])  # sove.data.decoded
        >>> views = DeviceMultiCrop(aug).crops(batch["image"].to("cuda"), batch["params"])
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.aug = augmentation
        self.num_views = len(augmentation.views)

    def crops(self, image: torch.Tensor, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """All views of a batch.

        Args:
            image: uint8 (batch, channels, height, width) on the target device, each image in
                its top-left corner, padding replicating its last row and column.
            params: CPU tensors from :func:`sove.data.decoded.view_params`, per (batch, view):
                ``boxes`` float32 (B, V, 4) as (left, top, right, bottom) in pixels, ``flip``,
                ``jitter``, ``gray``, ``blur``, ``solarize`` bool (B, V), ``factors`` float32
                (B, V, 4) (brightness, contrast, saturation factors, hue shift), ``order`` int64
                (B, V, ops) (jitter operation indices in the order applied; ops = 2 on 1 channel), ``sigma`` float32 (B, V).

        Returns:
            float32 views on ``image.device``, ``[global_1, global_2, local_1, ...]``, each of
            shape (batch, channels, size, size), normalised with mean / std.
        """
        batch = image.shape[0]
        image = image.float().div_(255.0)  # (B, C, H, W) in [0, 1], as the loader path's to_dtype
        views = []
        groups = ((0, NUM_GLOBAL_CROPS, self.aug.global_crop_size),
                  (NUM_GLOBAL_CROPS, self.num_views, self.aug.local_crop_size))
        for first, last, size in groups:
            if last > first:
                rows = {k: v[:, first:last].transpose(0, 1).flatten(0, 1) for k, v in params.items()}
                out = self._group(image, rows, size)  # (views * B, C, size, size), view-major
                views += list(out.view(last - first, batch, *out.shape[1:]).unbind(0))
        return views

    def _group(self, image: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
        """Views of one crop size; ``p`` holds one CPU row per output view, view-major."""
        device, batch = image.device, image.shape[0]
        owner = torch.arange(p["boxes"].shape[0]).remainder_(batch).unsqueeze(1).float()
        rois = torch.cat([owner, p["boxes"]], dim=1).to(device)
        x = roi_align(image, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        x = x.clamp_(0.0, 1.0)
        _apply(x, p["flip"], lambda v: v.flip(-1))
        num_ops = 2 if x.shape[1] == 1 else len(JITTER_OPS)
        for position in range(num_ops):  # colour jitter, every row in its own order
            for op in range(num_ops):
                factors = p["factors"][:, op].to(device)
                _apply(x, p["jitter"] & (p["order"][:, position] == op), JITTER_OPS[op], factors)
        if x.shape[1] == 3:
            _apply(x, p["gray"], lambda v: luminance(v).expand_as(v))
        sigma = p["sigma"].to(device)
        _apply(x, p["blur"], lambda v, s: gaussian_blur(v, s, blur_kernel_size(size)), sigma)
        _apply(x, p["solarize"], lambda v: torch.where(v >= SOLARIZE_THRESHOLD, 1.0 - v, v))
        mean, std = self.aug.mean.to(device), self.aug.std.to(device)
        return x.sub_(mean).div_(std)


def _apply(x: torch.Tensor, selected: torch.Tensor, fn, per_row: torch.Tensor | None = None) -> None:
    """``x[rows] = fn(x[rows] [, per_row[rows]])`` for the rows where the CPU bool tensor
    ``selected`` is True: the row list is made on the CPU (no device sync), only those rows
    are computed."""
    rows = selected.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    rows = rows.to(x.device, non_blocking=True)
    x[rows] = fn(x[rows]) if per_row is None else fn(x[rows], per_row[rows])
