"""Linear probe on frozen features (paper Tab. 1 "Linear"; docs/method.md, "Evaluation protocols").

Features (teacher backbone, after the final norm): ``cls4`` — CLS of the last 4 blocks concatenated
(ViT-S protocol) — or ``cls_mean`` — last CLS ⊕ mean patch token (ViT-B/L protocol); ``global`` (the
L2-normalised ``sove eval knn`` feature) serves backbones without [CLS] (Swin). One linear layer
(no BatchNorm) per learning rate of a grid, all trained in the same pass over the same batches with
SGD (momentum 0.9, cosine schedule); the learning rate is chosen on a seeded, class-balanced held-out
part of the train split, and the head chosen there is evaluated on the test split (no retraining).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from sove.errors import SoveError
from sove.seeding import generator, stream_seed

#: Base learning rates (per 256 samples; scaled by batch_size / 256).
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class AugmentedImages(Dataset):
    """Training view for ``--augment``: random-resized crop (scale 0.08-1) + horizontal flip, normalised.

    Items are ``(float32 image (channels, size, size), int label)``; ``source`` yields uint8 images.
    """

    def __init__(self, source: Dataset, size: int, mean: list[float], std: list[float]) -> None:
        self.source, self.mean, self.std = source, list(mean), list(std)
        self.transform = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                                     v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[i]
        image = TF.to_dtype(self.transform(image), torch.float32, scale=True)
        return TF.normalize(image, self.mean, self.std), int(label)


@contextmanager
def _few_threads(device: str | torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for the duration of the block (restored afterwards)."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear_heads(
    features: torch.Tensor | Callable[[int], torch.Tensor], labels: torch.Tensor, lrs: list[float] | tuple[float, ...],
    num_classes: int, epochs: int = 50, batch_size: int = 1024, seed: int = 0, momentum: float = 0.9,
    weight_decay: float = 0.0, device: str | torch.device = "cpu", progress: bool = True,
) -> nn.ModuleList:
    """Train one linear classifier per learning rate, together, on the same shuffled batches.

    Every head starts from the same seeded init (weights N(0, 0.01²), bias 0) and has its own SGD
    parameter group; the summed loss gives each head exactly the gradient of its own cross-entropy,
    so the result equals training each learning rate alone with the same seed.

    Args:
        features: float tensor (N, F), or a function epoch -> (N, F) (re-extracted augmented features).
        labels: int64 tensor (N,), values in [0, num_classes).
        lrs: base learning rates; each head uses ``lr * batch_size / 256``, cosine-decayed to 0 per step.
        num_classes: C.
        epochs: passes over the data.
        batch_size: samples per step (the last, smaller batch of an epoch is kept).
        seed: init and shuffling seed.
        momentum, weight_decay: SGD settings (0.9, 0).
        device: where the heads train; on the CPU one intra-op thread is used (the heads are tiny
            GEMMs, for which extra threads only add synchronisation; on a busy 2-core machine they made
            an epoch up to 30x slower). Use a GPU for paper-scale probes.

    Returns:
        ``nn.ModuleList`` (on ``device``) of ``len(lrs)`` ``nn.Linear(F, C)`` heads; a head that diverged
        holds non-finite weights.
    """
    get = features if callable(features) else (lambda epoch: features)
    n = labels.shape[0]
    dim = get(0).shape[1]
    g = generator(seed, "linear_probe")
    init = torch.randn(num_classes, dim, generator=g) * 0.01
    heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in lrs)
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(init)
            head.bias.zero_()
    heads.to(device)
    labels = labels.to(device)
    groups = [{"params": head.parameters(), "lr": lr * batch_size / 256} for head, lr in zip(heads, lrs)]
    opt = torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    bar = {} if progress else {"disable": True}  # progress=True keeps tqdm's defaults (e.g. TQDM_DISABLE)
    for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", leave=False, **bar):
        x = get(epoch).to(device)  # augmented features are extracted here, outside the thread limit
        order = torch.randperm(n, generator=g).to(device)
        with _few_threads(device):
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x[idx], labels[idx]
                loss = sum(nn.functional.cross_entropy(head(xb), yb) for head in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return heads


@torch.no_grad()
def head_accuracy(heads: nn.ModuleList, features: torch.Tensor,
                  labels: torch.Tensor) -> list[tuple[float, float] | None]:
    """Top-1 and top-5 accuracy (percent) of each head; None for a head with non-finite weights.

    Args:
        features: float tensor (N, F); labels: int64 tensor (N,).
    """
    out: list[tuple[float, float] | None] = []
    for head in heads:
        if not all(torch.isfinite(p).all() for p in head.parameters()):
            out.append(None)
            continue
        logits = head(features.to(head.weight.device))  # (N, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hit = top == labels[:, None]
        n = labels.shape[0]
        out.append((100.0 * int(hit[:, 0].sum()) / n, 100.0 * int(hit.any(1).sum()) / n))
    return out


def select_lr(val_acc: list[tuple[float, float] | None], lrs: list[float] | tuple[float, ...]) -> int:
    """Index of the learning rate with the best validation top-1; ties go to the smaller lr.

    Args:
        val_acc: per lr, (top-1, top-5) in percent, or None for a diverged head (never chosen).
        lrs: the learning rates, same order.

    Raises:
        SoveError: every head diverged.
    """
    finite = [i for i, a in enumerate(val_acc) if a is not None]
    if not finite:
        raise SoveError(f"every learning rate diverged ({list(lrs)}); pass smaller values with --lrs")
    return max(finite, key=lambda i: (val_acc[i][0], -lrs[i]))


def _identity(f: torch.Tensor) -> torch.Tensor:
    return f


def _standardizer(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension standardisation with the statistics of ``x`` (N, F)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return lambda f: (f - mean) / std


class _AugmentedFeatures:
    """epoch -> standardised features (N_fit, F) of freshly augmented training images (``--augment``).

    Epoch ``e`` is drawn with torch's global CPU RNG seeded from the ``linear_augmentation`` stream at
    key ``e`` (:mod:`sove.seeding`; torchvision's transforms draw from it), forked so the caller's RNG is
    left as it was; the standardisation (``scale``) comes from epoch 0, which is extracted on construction.
    """

    def __init__(self, encoder: Any, train: Any, fit_idx: torch.Tensor, mode: str, standardize: bool,
                 seed: int, device: str) -> None:
        d = encoder.cfg.data
        self.images = AugmentedImages(Subset(train.source, fit_idx.tolist()), d.global_crop_size, d.mean, d.std)
        self.encoder, self.mode, self.seed, self.device = encoder, mode, seed, device
        self.epoch, self.scale = -1, _identity
        first = self(0)
        self.scale = _standardizer(first) if standardize else _identity
        self.x = self.scale(first)

    def __call__(self, epoch: int) -> torch.Tensor:
        from sove.eval.features import extract_features

        if epoch != self.epoch:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(stream_seed(self.seed, "linear_augmentation", epoch))
                x = extract_features(self.encoder.module, self.images, self.encoder.cfg.eval.batch_size,
                                     self.device, f"augmented train features (epoch {epoch})", mode=self.mode)
            self.epoch, self.x = epoch, self.scale(x)
        return self.x


def evaluate_linear(
    run_dir: str | Path | None = None, backbone: str | Path | None = None, features: str = "cls4",
    lrs: list[float] | tuple[float, ...] = DEFAULT_LRS, epochs: int = 50, batch_size: int = 1024,
    val_fraction: float = 0.1, augment: bool = False, standardize: bool = True, seed: int = 0,
    cache: bool = True, overrides: list[str] | tuple[str, ...] = (), device: str = "cpu",
) -> dict[str, Any]:
    """``sove eval linear``: linear probe on a run's (or an exported) frozen teacher backbone.

    Without ``augment`` the train and test features are extracted once (cached in memory and in
    ``<out_dir>/linear_features_<mode>_<split>.pt``; a re-run with the same weights, data and
    preprocessing skips extraction, any change re-extracts: see :func:`sove.eval.frozen.cached_extract`).
    With ``augment`` the training part is re-extracted every epoch from random-resized, flipped crops
    (one backbone pass over the train split per epoch: about ``epochs`` times slower); the held-out
    part and the test split still use the cached un-augmented features. Features are standardised
    with the training part's statistics (of the first augmented epoch with ``augment``) unless
    ``standardize=False``.

    Args:
        run_dir / backbone: see :func:`sove.eval.encoder.load_frozen`.
        features: ``cls4``, ``cls_mean`` (ViT only) or ``global`` (the k-NN feature; the choice for Swin).
        lrs: base learning-rate grid (per 256 samples).
        epochs, batch_size, seed: SGD settings (paper scale: 100 epochs).
        val_fraction: class-balanced share of the train split held out to choose the learning rate.
        cache: read/write the on-disk feature cache.
        overrides: config overrides (``data.*``, ``eval.batch_size``).
        device: device of feature extraction and of head training.

    Returns:
        dict with ``features``, ``feature_dim``, ``lrs``, ``val_top1_per_lr`` (str(lr) -> percent, None
        if diverged), ``best_lr``, ``val_top1`` (of the chosen lr), ``top1``, ``top5`` (test, of the chosen head),
        ``epochs``, ``batch_size``, ``augment``, ``standardize``, ``num_train`` (fitting part),
        ``num_val``, ``num_test``, ``seed``, ``command`` and the provenance of
:func:`sove.eval.provenance.write_result` (``checkpoint_step``, ``weights_sha256``, ``inputs``,
        ``fingerprint``); also written to ``<out_dir>/linear.json``.

    Test labels are numbered by the train split's class names (:func:`sove.eval.features.eval_splits`);
    unreadable images follow ``data.on_error`` (:func:`sove.eval.features.readable_rows`; skipped ones are
    left out of every count).

    Raises:
        SoveError: bad arguments, unlabelled data or an unreadable image with ``data.on_error=raise``
            (DataError), every learning rate diverged.
    """
    from sove.eval.encoder import load_frozen
    from sove.eval.features import FEATURE_MODES, eval_splits, labels_of, readable_rows
    from sove.eval.frozen import cached_extract, stratified_subset
    from sove.eval.provenance import command_line, data_identity, write_result

    if features not in FEATURE_MODES:
        raise SoveError(f"--features must be one of {', '.join(FEATURE_MODES)}, got {features!r}")
    if not 0.0 < val_fraction < 1.0:
        raise SoveError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not lrs or min(lrs) <= 0 or epochs < 1 or batch_size < 1:
        raise SoveError("--lrs must be positive numbers, --epochs and --batch-size at least 1")
    lrs = [float(lr) for lr in lrs]
    encoder = load_frozen(run_dir, backbone, overrides, results="results and feature caches")
    train, test = eval_splits(encoder.cfg)
    test_f = cached_extract(encoder, test, "test", features, "linear", device, cache)
    train_f = cached_extract(encoder, train, "train", features, "linear", device, cache)
    keep_train = readable_rows(train_f, train, "train", encoder.out_dir)
    keep_test = readable_rows(test_f, test, "test", encoder.out_dir)
    train_f, y_train = train_f[keep_train], labels_of(train)[keep_train]
    test_f, y_test = test_f[keep_test], labels_of(test)[keep_test]
    val_idx = stratified_subset(y_train, val_fraction, stream_seed(seed, "validation_split"), leave_one=True)
    fit_mask = torch.ones(len(y_train), dtype=torch.bool)
    fit_mask[val_idx] = False
    fit_idx = fit_mask.nonzero().squeeze(1)
    val_f = train_f[val_idx]
    if augment:  # the augmented images are read again: pass their indices in the split
        fit_x = _AugmentedFeatures(encoder, train, keep_train.nonzero().squeeze(1)[fit_idx], features, standardize,
                                   seed, device)
        scale = fit_x.scale
    else:
        fit_x = train_f[fit_idx]
        scale = _standardizer(fit_x) if standardize else _identity
        fit_x = scale(fit_x)
    heads = train_linear_heads(fit_x, y_train[fit_idx], list(lrs), len(train.source.classes), epochs, batch_size,
                               seed, device=device)
    val_acc = head_accuracy(heads, scale(val_f), y_train[val_idx])
    best = select_lr(val_acc, lrs)
    top1, top5 = head_accuracy(nn.ModuleList([heads[best]]), scale(test_f), y_test)[0]
    result = {
        "features": features, "feature_dim": int(test_f.shape[1]), "lrs": list(lrs),
        "val_top1_per_lr": {str(lr): (None if a is None else a[0]) for lr, a in zip(lrs, val_acc)},
        "best_lr": lrs[best], "val_top1": val_acc[best][0], "top1": top1, "top5": top5,
        "epochs": epochs, "batch_size": batch_size, "augment": augment, "standardize": standardize,
        "num_train": int(len(fit_idx)), "num_val": int(len(val_idx)), "num_test": int(len(y_test)),
        "seed": seed, "command": command_line(),
    }
    write_result(result, encoder.out_dir / "linear.json", encoder.identity(),
                 {"features": features, "lrs": list(lrs), "epochs": epochs, "batch_size": batch_size,
                  "val_fraction": val_fraction, "augment": augment, "standardize": standardize, "seed": seed},
                 data_identity(encoder.cfg), {"train": train, "test": test})
    return result
