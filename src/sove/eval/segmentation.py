"""Semantic segmentation with a linear layer on frozen patch features (paper Tab. A.2, "Seg. w/ Lin.").

An ADE20k-style folder holds ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (same stem; pixel value = class index, 255 = ignore).
Training images are resized to a square of ``image_size`` pixels, encoded once by the frozen
backbone (patch tokens cached in memory as float16), and a 1×1 linear layer (dim -> classes) is
trained on them: per-patch logits are upsampled bilinearly to the label size and trained with
cross-entropy (ignore index 255). Validation logits are upsampled to each annotation's own size;
mIoU and mAcc come from the accumulated confusion matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from sove.errors import DataError
from sove.eval.encoder import FrozenBackbone, load_frozen, result_path
from sove.eval.provenance import write_result
from sove.seeding import generator

IGNORE = 255
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _check_classes(values: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise ValueError naming the first value of ``values`` outside [0, num_classes) and their count."""
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        raise ValueError(f"{what} must be class indices in [0, {num_classes}); got {int(values[bad][0])} "
                         f"({int(bad.sum())} pixel(s))")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """Pixel confusion matrix, int64 (classes, classes): row = true class, column = predicted class.

    Pixels whose target equals ``ignore_index`` are skipped whatever their prediction (as in
    mmsegmentation's ``IoUMetric.intersect_and_union``), so an image whose pixels are all ignored
    adds an all-zero matrix. Where mmsegmentation silently drops other values outside
    [0, C) from its histograms, an out-of-range value here is refused: it means a wrong
    ``num_classes`` or a corrupted prediction, and counting it would shift it into another cell.

    Args:
        pred, target: int tensors of the same shape (any): predicted and true class indices.
        num_classes: number of classes C.
        ignore_index: target value of unlabelled pixels (255).

    Raises:
        ValueError: shapes differ; a counted pixel whose prediction is outside [0, C) (the ignore
            index included) or whose target is outside [0, C) and not ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    _check_classes(t, num_classes, f"ground-truth labels other than the ignore index {ignore_index}")
    _check_classes(p, num_classes, "predictions at labelled pixels")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict[str, Any]:
    """mIoU, mAcc and pixel accuracy (percent) from a confusion matrix (rows true, columns predicted).

    Source: mmsegmentation's ``IoUMetric.total_area_to_metrics`` (the ADE20k convention):
    IoU_c = TP / (TP + FP + FN), NaN for a class absent from both ground truth and prediction;
    Acc_c = TP / (TP + FN), NaN for a class absent from the ground truth; mIoU and mAcc are the
    means over the non-NaN classes; aAcc = sum TP / labelled pixels. With no labelled pixel
    (every pixel ignored) all three are NaN, as mmsegmentation's 0 / 0.

    Args:
        conf: int (classes, classes) from :func:`confusion_matrix`, summed over images.

    Returns:
        dict with ``mIoU``, ``mAcc``, ``aAcc`` (float, NaN as above) and per-class ``iou`` / ``acc``
        lists (None = NaN).
    """
    conf = conf.double()
    tp, gt, predicted = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
    total = gt.sum()

    def listed(x: torch.Tensor) -> list[float | None]:
        return [None if torch.isnan(v) else 100 * float(v) for v in x]

    return {"mIoU": 100 * float(iou.nanmean()), "mAcc": 100 * float(acc.nanmean()),
            "aAcc": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": listed(iou), "acc": listed(acc)}


def segmentation_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of ``images/<split>`` and ``annotations/<split>``, sorted.

    Raises:
        DataError: a missing folder, no image, or an image without its annotation (names the file).
    """
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir():
        raise DataError(f"image folder '{img_dir}' not found; expected images/{{training,validation}} and "
                        "annotations/{training,validation} (ADE20k layout)")
    if not ann_dir.is_dir():
        raise DataError(f"no annotations folder '{ann_dir}': linear segmentation is supervised and needs "
                        "one indexed PNG of class indices per image")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images (*.jpg, *.png) in '{img_dir}'")
    pairs = []
    for img in images:
        ann = ann_dir / (img.stem + ".png")
        if not ann.is_file():
            raise DataError(f"image '{img}' has no annotation '{ann}'")
        pairs.append((img, ann))
    return pairs


def read_label_map(path: Path, image_hw: tuple[int, int], reduce_zero_label: bool) -> torch.Tensor:
    """int64 (H, W) class indices of an annotation PNG; ``reduce_zero_label``: 0 -> 255, c -> c - 1.

    Raises:
        DataError: unreadable, colour, values > 255, or a size different from its image's ``image_hw``.
    """
    try:
        with Image.open(path) as img:
            labels = np.array(img).astype(np.int64)
    except OSError as e:
        raise DataError(f"cannot read annotation '{path}': {e}") from e
    if labels.ndim != 2 or labels.max(initial=0) > IGNORE:
        raise DataError(f"annotation '{path}' must be a single-channel PNG of class indices 0..254 (255 = ignore)")
    if labels.shape != tuple(image_hw):
        raise DataError(f"annotation '{path}' is {labels.shape[1]}x{labels.shape[0]} but its image is "
                        f"{image_hw[1]}x{image_hw[0]}; they must have the same size")
    out = torch.from_numpy(labels)
    if reduce_zero_label:
        out = torch.where(out == 0, IGNORE, out - 1).masked_fill(out == IGNORE, IGNORE)
    return out


@torch.no_grad()
def _encode(encoder: FrozenBackbone, image: torch.Tensor, image_size: int) -> torch.Tensor:
    """(rows, cols, dim) patch tokens of the image resized to image_size x image_size."""
    return encoder(encoder.prepare(image, (image_size, image_size))[None])[1][0]


def cache_training_set(encoder: FrozenBackbone, pairs: list[tuple[Path, Path]], image_size: int,
                       reduce_zero_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every training pair once.

    Returns:
        (features float16 (images, rows, cols, dim), labels uint8 (images, image_size, image_size),
        nearest-neighbour resized).
    """
    feats, labels = [], []
    for img_path, ann_path in tqdm(pairs, desc="segmentation features", unit="img", leave=False):
        image = encoder.read(img_path)
        lab = read_label_map(ann_path, tuple(image.shape[-2:]), reduce_zero_label)
        feats.append(_encode(encoder, image, image_size).half())
        labels.append(TF.resize(lab[None].to(torch.uint8), [image_size, image_size],
                                interpolation=InterpolationMode.NEAREST)[0])
    return torch.stack(feats), torch.stack(labels)


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 5,
                      lr: float = 1e-3, batch_size: int = 16, seed: int = 0, device: str = "cpu") -> nn.Conv2d:
    """Train a 1x1 convolution (a linear layer per patch) with cross-entropy, ignore index 255.

    Args:
        features: float (images, rows, cols, dim) frozen patch tokens.
        labels: int (images, height, width) class indices (255 = ignore); logits are upsampled
            bilinearly from (rows, cols) to (height, width).
        num_classes: number of classes C.
        epochs, lr, batch_size: AdamW schedule (constant lr, no weight decay).
        seed: seeds the initialisation and the shuffling.
        device: where the layer trains (the cached features stay on the CPU; batches are moved).

    Returns:
        ``nn.Conv2d(dim, C, 1)`` on the CPU, eval mode.
    """
    g = generator(seed, "segmentation_probe")
    head = nn.Conv2d(features.shape[-1], num_classes, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    head = head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    n = features.shape[0]
    for _ in tqdm(range(epochs), desc="linear segmentation", unit="epoch", leave=False):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            x = features[idx].to(device).float().permute(0, 3, 1, 2)  # (batch, dim, rows, cols)
            logits = F.interpolate(head(x), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels[idx].to(device).long(), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.cpu().eval()


@torch.no_grad()
def predict(head: nn.Conv2d, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """int64 (H, W) classes from (rows, cols, dim) patch tokens, logits upsampled bilinearly to ``size``."""
    logits = head(features.float().permute(2, 0, 1)[None])
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def evaluate_segmentation(data: str | Path, run_dir: str | Path | None = None, backbone: str | Path | None = None,
                          out: str | Path | None = None, image_size: int | None = None, epochs: int = 5,
                          lr: float = 1e-3, batch_size: int = 16, num_classes: int | None = None,
                          reduce_zero_label: bool = False, train_split: str = "training",
                          val_split: str = "validation", device: str = "cpu", seed: int = 0,
                          encoder: FrozenBackbone | None = None) -> dict[str, Any]:
    """``sove eval segmentation``: frozen patch features + linear layer; mIoU and mAcc on the validation split.

    Args:
        data: ADE20k-style folder (``images/<split>``, ``annotations/<split>``).
        run_dir / backbone: the frozen backbone (a run's teacher, or ``sove export``'s backbone.json).
        out: result JSON; default ``RUN/eval/segmentation.json``, or ``eval/`` next to ``backbone.json``.
        image_size: square input side in pixels (default: the backbone's training crop size).
        epochs, lr, batch_size, seed: see :func:`train_linear_head`.
        num_classes: default: largest training class index + 1 (255 excluded).
        reduce_zero_label: ADE20k convention: label 0 ("other") ignored, classes shifted down by one.
        train_split, val_split: folder names under ``images/`` and ``annotations/``.
        device: device of the backbone and of the linear layer's training.
        encoder: a ready :class:`FrozenBackbone` instead of run_dir/backbone.

    Returns:
        :func:`segmentation_scores` output plus ``num_classes``, ``num_train``, ``num_val``,
        ``image_size``, ``epochs``, ``lr``, ``command``; written to the result JSON.

    Raises:
        DataError: see :func:`segmentation_pairs` and :func:`read_label_map`; a validation class
            index >= num_classes; every validation pixel ignored.
        SoveError: neither or both of run_dir/backbone.
    """
    train_pairs, val_pairs = segmentation_pairs(data, train_split), segmentation_pairs(data, val_split)
    path = result_path("segmentation", run_dir, backbone, out)
    encoder = encoder or load_frozen(run_dir, backbone, device=device)
    size = image_size or encoder.image_size
    feats, labels = cache_training_set(encoder, train_pairs, size, reduce_zero_label)
    valid = labels[labels != IGNORE]
    if num_classes is None and valid.numel() == 0:
        raise DataError(f"every training pixel in '{Path(data) / 'annotations' / train_split}' is ignored (255)")
    c = num_classes or int(valid.max()) + 1
    head = train_linear_head(feats, labels, c, epochs, lr, batch_size, seed, device)
    conf = torch.zeros(c, c, dtype=torch.long)
    for img_path, ann_path in tqdm(val_pairs, desc="segmentation validation", unit="img", leave=False):
        image = encoder.read(img_path)
        target = read_label_map(ann_path, tuple(image.shape[-2:]), reduce_zero_label)
        if (target[target != IGNORE] >= c).any():
            raise DataError(f"annotation '{ann_path}' has class {int(target[target != IGNORE].max())} but "
                            f"there are {c} classes; pass --num-classes")
        conf += confusion_matrix(predict(head, _encode(encoder, image, size), tuple(target.shape)), target, c)
    if conf.sum() == 0:
        raise DataError(f"every validation pixel in '{Path(data) / 'annotations' / val_split}' is ignored (255): "
                        "nothing to score")
    result = segmentation_scores(conf)
    result.update(num_classes=c, num_train=len(train_pairs), num_val=len(val_pairs), image_size=size,
                  epochs=epochs, lr=lr, reduce_zero_label=reduce_zero_label)
    write_result(result, path, encoder.identity(),
                 {"data": str(Path(data).resolve()), "train_split": train_split, "val_split": val_split,
                  "image_size": size, "epochs": epochs, "lr": lr, "batch_size": batch_size, "num_classes": num_classes,
                  "reduce_zero_label": reduce_zero_label, "seed": seed})
    return result
