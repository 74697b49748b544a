"""Frozen features for evaluation: teacher backbone, after the final norm (docs/method.md, "Evaluation protocols")."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from sove.data import build_source
from sove.data.decode import RAISE_HINT, unreadable_report
from sove.errors import DataError, SoveError, warn
from sove.models import MaskedViT, build_networks


class EvalImages(Dataset):
    """Deterministic evaluation view of a source: resize + centre crop to the global crop size, normalise.

    Items are ``(float32 image (channels, size, size), int label)``. An unreadable image follows
    ``on_error`` (``data.on_error``): ``"raise"`` stops with a :class:`DataError` naming the file;
    ``"skip"`` returns an all-NaN image in its place (the *unreadable marker*, never produced by a
    decoded image) and records the error message in :attr:`unreadable` (index -> message). The
    feature extractors turn a marker into an all-NaN feature row and :func:`readable_rows` drops
    such rows together with their labels.
    """

    def __init__(self, source: Dataset, size: int, mean: list[float], std: list[float],
                 on_error: str = "raise") -> None:
        self.source, self.size = source, size
        self.mean, self.std = list(mean), list(std)
        self.on_error = on_error
        self.unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image, label = self.source[i]
        except DataError as e:
            if self.on_error == "raise":
                raise DataError(f"{e}; {RAISE_HINT}") from e
            self.unreadable[i] = str(e)
            labels = getattr(self.source, "labels", None)
            marker = torch.full((len(self.mean), self.size, self.size), float("nan"))
            return marker, -1 if labels is None else int(labels[i])
        if image.shape[-2:] != (self.size, self.size):
            image = TF.center_crop(TF.resize(image, self.size, antialias=True), [self.size, self.size])
        image = TF.to_dtype(image, torch.float32, scale=True)
        return TF.normalize(image, self.mean, self.std), int(label)


def eval_split(cfg: DictConfig, split: str, classes: Sequence[str] | None = None) -> EvalImages:
    """The labelled ``train`` or ``test`` split of the run's data, as :class:`EvalImages` following
    ``data.on_error``.

    Args:
        classes: class names by label of a labelled folder (the train split's, see
            :class:`sove.data.ImageFolder`); use :func:`eval_splits` to get both splits consistently.

    Raises:
        DataError: the split has no labels (a flat folder) or no test folder is configured.
    """
    d = cfg.data
    source = build_source(d.source, d.root, split, d.download, d.num_channels, d.test_root, classes)
    if getattr(source, "labels", None) is None:
        where = d.test_root if split == "test" else d.root
        raise DataError(f"'{where}' has no labels (images must lie in one sub-folder per class) "
                        f"for a supervised evaluation of the {split} split")
    return EvalImages(source, d.global_crop_size, d.mean, d.std, d.on_error)


def eval_splits(cfg: DictConfig) -> tuple[EvalImages, EvalImages]:
    """The labelled train and test splits, the test split's labels numbered by the train split's class
    names (a test folder lacking a class, or holding an empty one, keeps every label meaning the same
    class; a test class unknown to the train split is left out with a warning).

    Raises:
        DataError: see :func:`eval_split`; no test image is in a train class.
    """
    train = eval_split(cfg, "train")
    return train, eval_split(cfg, "test", train.source.classes)


def labels_of(dataset: EvalImages) -> torch.Tensor:
    """int64 tensor (N,) of the dataset's labels (unreadable images included, as feature rows are)."""
    return torch.as_tensor(dataset.source.labels, dtype=torch.long)


def batch_features(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``forward(images)`` as float32 (B, F), with an all-NaN row for each unreadable marker image.

    Args:
        forward: images (B, C, H, W) -> features (B, F).
        images: float tensor (B, C, H, W); an all-NaN image is an unreadable marker (:class:`EvalImages`)
            and is replaced by zeros for the forward pass.

    Raises:
        SoveError: a readable image gives a non-finite feature (the backbone's weights are non-finite).
    """
    bad = images.flatten(1).isnan().all(1)  # (B,)
    out = forward(images.masked_fill(bad.view(-1, 1, 1, 1), 0.0)).float()
    if not bool(out[~bad].isfinite().all()):
        raise SoveError("the backbone gives non-finite (NaN/inf) features for readable images: its weights are "
                        "non-finite (a diverged run); evaluate an earlier checkpoint")
    out[bad] = float("nan")
    return out


def readable_rows(features: torch.Tensor, dataset: EvalImages, split: str, list_dir: str | Path,
                  index: Sequence[int] | None = None) -> torch.Tensor:
    """Which feature rows come from readable images (all-NaN rows mark unreadable ones), following the
    dataset's ``on_error``.

    With ``"skip"`` one line is printed to stderr, ``warning: <split> split: skipped N unreadable file(s)
    of M (list in <list_dir>/unreadable_<split>.txt); M - N images used``, and the list is written. Drop
    the same rows from the labels (``labels_of(dataset)[keep]``) to keep them aligned.

    Args:
        features: float tensor (M, F) extracted from ``dataset`` (possibly read back from a cache).
        index: the dataset index of each row when the rows come from a subset (default: row i = item i).

    Returns:
        bool tensor (M,), True for the rows to keep.

    Raises:
        DataError: an unreadable image under ``on_error="raise"`` (first one named; possible when the
            features were cached under ``skip``: such rows are read again for the reason), a cached
            unreadable row whose image is readable now under ``"raise"``, or every image is unreadable.
    """
    bad = features.isnan().all(1)
    if not bool(bad.any()):
        return ~bad
    items = [index[r] if index is not None else r for r in bad.nonzero().squeeze(1).tolist()]
    for i in items:
        if i not in dataset.unreadable:  # a cached row: read it again for the reason (raises under "raise")
            dataset[i]
    path = getattr(dataset.source, "path", None)
    messages = [dataset.unreadable.get(i) or f"'{path(i) if path else f'{split} item {i}'}' was unreadable when its "
                "cached features were extracted but is readable now; delete the feature cache" for i in items]
    if dataset.on_error == "raise":
        raise DataError(f"{messages[0]}; {RAISE_HINT}")
    if bool(bad.all()):
        raise DataError(f"every image of the {split} split is unreadable (first: {messages[0]})")
    warn(f"{split} split: " + unreadable_report(messages, len(features), Path(list_dir) / f"unreadable_{split}.txt"))
    return ~bad


#: Feature modes of :func:`image_features` for a dataset (:func:`extract_features`): ``global`` = the
#: L2-normalised image representation (``sove eval knn``); ``cls4`` = [CLS] of the last 4 blocks, each after
#: the final norm, concatenated (ViT-S linear protocol); ``cls_mean`` = last [CLS] ⊕ mean patch token (ViT-B/L).
FEATURE_MODES = ("cls4", "cls_mean", "global")


def image_features(backbone: torch.nn.Module, images: torch.Tensor, mode: str = "global",
                   num_blocks: int = 4) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of one batch, after the final norm, never from a projection head.

    Args:
        backbone: a teacher backbone (``MaskedViT``, or ``MaskedSwin`` for ``global`` / ``patches``).
        images: float tensor (batch, channels, height, width), normalised; height and width multiples
            of the backbone's token stride.
        mode: ``global`` -> L2-normalised image representation ([CLS], or the mean patch token with
            ``model.global_pool=mean_patch``; Swin: the mean final-stage token), (batch, dim);
            ``cls4`` -> [CLS] of the last ``min(num_blocks, depth)`` blocks, each through the final
            norm, concatenated oldest first (timm's ``forward_intermediates``), (batch, blocks * dim),
            its last ``dim`` columns the usual [CLS]; ``cls_mean`` -> [CLS] ⊕ mean patch token of the last
            block, (batch, 2 * dim); ``patches`` -> (global feature (batch, dim) not normalised, patch
            tokens (batch, rows, cols, dim)) with rows = height / stride, cols = width / stride (stride: the
            backbone's ``token_stride`` attribute, pixels per output token).

    Returns:
        float32 tensors of the shapes above (on the backbone's device).

    Raises:
        ValueError: unknown mode.
        SoveError: ``cls4`` / ``cls_mean`` for a backbone without a [CLS] token (Swin: use ``global``).
    """
    if mode not in FEATURE_MODES + ("patches",):
        raise ValueError(f"unknown feature mode {mode!r}; use one of {', '.join(FEATURE_MODES)} or patches")
    if mode in ("cls4", "cls_mean") and not isinstance(backbone, MaskedViT):
        raise SoveError(f"--features {mode} needs a ViT with a [CLS] token; for {type(backbone).__name__} "
                        "use --features global (its mean final-stage token)")
    if mode == "cls4":
        vit = backbone.vit
        blocks = vit.forward_intermediates(images, indices=min(num_blocks, len(vit.blocks)), return_prefix_tokens=True,
                                           norm=True, output_fmt="NLC", intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in blocks], dim=1).float()
    out = backbone(images)
    if mode == "cls_mean":
        return torch.cat([out["cls"], out["patches"].mean(dim=1)], dim=1).float()
    if mode == "global":
        return torch.nn.functional.normalize(out["global"].float(), dim=1)
    rows, cols = images.shape[-2] // backbone.token_stride, images.shape[-1] // backbone.token_stride
    patches = out["patches"]
    return out["global"].float(), patches.reshape(patches.shape[0], rows, cols, patches.shape[-1]).float()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", desc: str = "features", *,
                     mode: str = "global", progress: bool = True) -> torch.Tensor:
    """:func:`image_features` of every item of ``dataset``, in order, on the CPU (the one extractor of
    the dataset protocols: ``sove eval knn|linear|lowshot``, ``sove embed``, the periodic k-NN).

    Args:
        backbone: a teacher backbone (no mask token); put in eval mode on ``device`` here.
        dataset: items ``(float image (C, H, W), label)``.
        batch_size: images per forward.
        device: where to run the backbone.
        mode: one of :data:`FEATURE_MODES`.
        progress: a tqdm bar named ``desc`` on stderr (tqdm's defaults, e.g. ``TQDM_DISABLE``); False: none
            (the periodic k-NN under ``trainer.progress=false``).

    Returns:
        float32 tensor (N, F) on the CPU: F = dim (``global``, unit rows), 4 * dim (``cls4``) or
        2 * dim (``cls_mean``); all-NaN rows for unreadable images (see :func:`batch_features`,
        :func:`readable_rows`).
    """
    if mode not in FEATURE_MODES:
        raise ValueError(f"unknown feature mode {mode!r}; use one of {', '.join(FEATURE_MODES)}")
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    bar = {} if progress else {"disable": True}
    return torch.cat([batch_features(lambda x: image_features(backbone, x, mode), images.to(device)).cpu()
                      for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False, **bar)])


def pixel_features(dataset: Dataset, center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw-pixel baseline: flattened normalised pixels, minus ``center`` (default: the mean of the readable
    images), L2-normalised; all-NaN rows for unreadable images.

    Returns:
        (features (N, C*H*W) float32, the centre used (C*H*W,)).
    """
    loader = DataLoader(dataset, batch_size=1024, shuffle=False, num_workers=0)
    x = torch.cat([images.flatten(1) for images, _ in loader])
    center = x[~x.isnan().all(1)].mean(0) if center is None else center
    return torch.nn.functional.normalize(x - center, dim=1), center


def random_init_backbone(cfg: DictConfig) -> MaskedViT:
    """The run's teacher backbone as initialised before training (same seed, same architecture)."""
    return build_networks(cfg, seed=cfg.trainer.seed)[1].backbone
