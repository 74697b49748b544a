"""Shared plumbing of the supervised frozen-feature protocols (linear probe, low-shot; docs/evaluation.md).

The frozen encoder comes from a run directory (its teacher backbone, ``checkpoints/last.pt``) or from
an exported ``backbone.json`` (``sove export``); features are taken after the final norm, never from
the projection head. Features of a split can be cached on disk next to the results, keyed on
everything that determines them (:mod:`sove.eval.provenance`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sove.errors import SoveError
from sove.models import MaskedViT
from sove.preflight import check_writable

#: Feature modes: ``cls4`` = CLS of the last 4 blocks, each after the final norm, concatenated (ViT-S
#: linear protocol); ``cls_mean`` = last CLS ⊕ mean patch token (ViT-B/L protocol); ``global`` = the
#: L2-normalised image representation used by ``sove eval knn`` (:func:`sove.eval.features.extract_features`).
FEATURE_MODES = ("cls4", "cls_mean", "global")


@dataclass
class FrozenEncoder:
    """A frozen teacher backbone, the config that describes its data, and where results go.

    Attributes:
        backbone: :class:`~sove.models.MaskedViT` (or ``MaskedSwin``), eval mode, no mask token.
        cfg: config whose ``data.*`` keys give the labelled train/test splits and preprocessing.
        out_dir: folder for ``<protocol>.json`` and feature caches (``RUN/eval`` or ``<backbone dir>/eval``).
        identity: what features and results depend on: ``encoder``
            (:func:`sove.eval.provenance.encoder_identity`: weights hash, step, architecture, global
            pool) and ``data`` (:func:`sove.eval.provenance.data_identity`).
    """

    backbone: torch.nn.Module
    cfg: DictConfig
    out_dir: Path
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalBackbone:
    """A frozen backbone loaded for evaluation and the preprocessing it was trained with.

    The one place that resolves ``--run RUN`` / ``--backbone backbone.json`` (:func:`load_eval_backbone`);
    :func:`load_frozen`, :func:`sove.eval.dense.load_dense_encoder` and ``sove embed`` wrap it.

    Attributes:
        module: :class:`~sove.models.MaskedViT` (or ``MaskedSwin``), eval mode, no mask token; its
            output ``global`` is the image representation of ``sove eval knn`` (docs/method.md, "Evaluation protocols").
        image_size: the global crop size the backbone was trained at, in pixels.
        patch_size: the patch-embedding size in pixels.
        token_stride: pixels per output token (the ViT patch size; a Swin's final-stage stride).
        mean, std: per-channel normalisation of images scaled to [0, 1].
        channels: 1 (grayscale) or 3 (RGB).
        global_pool: ``cls`` or ``mean_patch`` (the module's image representation).
        arch: the run config's ``model.arch``, or the timm name in backbone.json's ``architecture``.
        weights: the weights file (``RUN/checkpoints/last.pt`` or the file named in backbone.json).
        cfg: the run's config (⊕ overrides) when loaded from a run, else None.
        meta: the parsed backbone.json when loaded from an export, else None.
        meta_path: the backbone.json path when loaded from an export, else None.
        step: the training step of the weights (the checkpoint's; backbone.json's ``step``), None if unknown.
        weights_sha256: :func:`sove.eval.provenance.weights_sha256` of ``module``'s state dict.
    """

    module: torch.nn.Module
    image_size: int
    patch_size: int
    token_stride: int
    mean: list[float]
    std: list[float]
    channels: int
    global_pool: str | None
    arch: str
    weights: Path
    cfg: DictConfig | None = None
    meta: dict[str, Any] | None = None
    meta_path: Path | None = None
    step: int | None = None
    weights_sha256: str | None = None

    def identity(self) -> dict[str, Any]:
        """:func:`sove.eval.provenance.encoder_identity` of this backbone."""
        from sove.eval.provenance import encoder_identity

        return encoder_identity(self.weights_sha256, self.step, self.arch, self.global_pool, self.weights)


def _wrap(timm_model: torch.nn.Module, global_pool: str) -> torch.nn.Module:
    """The sove wrapper (no mask token) of an exported timm ViT or Swin."""
    if hasattr(timm_model, "blocks"):
        return MaskedViT(timm_model, with_mask_token=False, global_pool=global_pool)
    from sove.models import MaskedSwin

    return MaskedSwin(timm_model, with_mask_token=False)


def load_eval_backbone(run_dir: str | Path | None = None, backbone: str | Path | None = None,
                       overrides: list[str] | tuple[str, ...] = ()) -> EvalBackbone:
    """Load the frozen backbone of an evaluation: an exported one if ``backbone`` is given, else the
    teacher of ``run_dir``'s ``checkpoints/last.pt``.

    Args:
        run_dir: a directory written by ``sove pretrain``; used for the backbone only when ``backbone``
            is None (its ``config.yaml`` ⊕ ``overrides`` gives the preprocessing).
        backbone: a ``backbone.json`` written by ``sove export`` (or its folder); preprocessing from it.
        overrides: dotted config overrides for the run's config (ignored for an exported backbone).

    Returns:
        :class:`EvalBackbone`, its module in eval mode on the CPU, with the step and weights hash.

    Raises:
        SoveError: neither given; not a run directory, missing checkpoint, backbone.json or weights file.
    """
    from sove.eval.features import load_run_config, teacher_backbone
    from sove.eval.provenance import checkpoint_step, weights_sha256
    from sove.export import load_backbone

    if run_dir is None and backbone is None:
        raise SoveError("give --run RUN_DIR (its teacher backbone and data) and/or --backbone backbone.json")
    if backbone is None:
        cfg = load_run_config(run_dir, overrides)
        module = teacher_backbone(run_dir, cfg).eval()
        d, weights = cfg.data, Path(run_dir) / "checkpoints" / "last.pt"
        return EvalBackbone(module, d.global_crop_size, module.patch_size,
                            getattr(module, "token_stride", module.patch_size), list(d.mean), list(d.std),
                            d.num_channels, getattr(module, "global_pool", None), cfg.model.arch,
                            weights, cfg=cfg, step=checkpoint_step(weights),
                            weights_sha256=weights_sha256(module.state_dict()))
    meta_path = Path(backbone)
    meta_path = meta_path / "backbone.json" if meta_path.is_dir() else meta_path
    timm_model = load_backbone(meta_path)
    meta = json.loads(meta_path.read_text())
    module = _wrap(timm_model, meta.get("global_pool", "cls")).eval()
    k = meta["model_kwargs"]
    return EvalBackbone(module, k["img_size"], k["patch_size"], getattr(module, "token_stride", module.patch_size),
                        list(meta["mean"]), list(meta["std"]), k["in_chans"], getattr(module, "global_pool", None),
                        meta["architecture"], meta_path.parent / meta["weights"], meta=meta, meta_path=meta_path,
                        step=meta.get("step"), weights_sha256=weights_sha256(module.state_dict()))


def load_frozen(run_dir: str | Path | None = None, backbone: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> FrozenEncoder:
    """Resolve the encoder and the data of a supervised frozen-feature evaluation.

    * ``run_dir`` only: the run's teacher backbone and its ``config.yaml`` (⊕ overrides); results in ``RUN/eval``.
    * ``backbone`` (+ optional ``run_dir``): the exported backbone; data from the run's config when
      ``run_dir`` is given (results in ``RUN/eval``), otherwise from the package defaults ⊕ ``overrides``
      (e.g. ``data.source=folder data.root=... data.test_root=...``; the default is Fashion-MNIST) with
      crop size, patch size, channels, mean and std taken from ``backbone.json`` (results in
      ``<backbone dir>/eval``).

    Raises:
        SoveError: neither given, not a run directory, missing checkpoint / backbone file, results
            folder not writable.
    """
    from sove.config import load_config
    from sove.eval.features import load_run_config
    from sove.eval.provenance import data_identity

    if run_dir is not None:  # where results go, checked before loading or extracting anything
        check_writable(Path(run_dir) / "eval", "results and feature caches")
    elif backbone is not None:
        folder = Path(backbone) if Path(backbone).is_dir() else Path(backbone).parent
        check_writable(folder / "eval", "results and feature caches")
    loaded = load_eval_backbone(run_dir, backbone, overrides)
    if loaded.cfg is not None:
        cfg, out_dir = loaded.cfg, Path(run_dir) / "eval"
    elif run_dir is not None:
        cfg, out_dir = load_run_config(run_dir, overrides), Path(run_dir) / "eval"
    else:
        b = loaded
        prep = [f"data.global_crop_size={b.image_size}", f"data.local_crop_size={b.image_size}",
                f"model.patch_size={b.patch_size}", f"data.num_channels={b.channels}",
                f"data.mean={b.mean}", f"data.std={b.std}"]
        cfg, out_dir = load_config(None, prep + list(overrides)), loaded.meta_path.parent / "eval"
    return FrozenEncoder(loaded.module, cfg, out_dir, {"encoder": loaded.identity(), "data": data_identity(cfg)})


@torch.no_grad()
def token_features(backbone: MaskedViT, images: torch.Tensor, mode: str, num_blocks: int = 4) -> torch.Tensor:
    """Linear-probe features of a batch (not L2-normalised).

    Args:
        backbone: frozen backbone.
        images: float tensor (batch, channels, height, width), normalised.
        mode: ``cls4`` -> CLS of the last ``min(num_blocks, depth)`` blocks, each passed through the
            final norm, concatenated oldest first: (batch, min(num_blocks, depth) * dim); ``cls_mean`` ->
            final-norm CLS ⊕ mean final-norm patch token of the last block: (batch, 2 * dim).

    Returns:
        float32 tensor of the shape above; the last ``dim`` columns of ``cls4`` are the usual CLS feature.

    Raises:
        ValueError: unknown mode.
        SoveError: the backbone is not a ViT (a Swin has no [CLS] token; use the ``global`` mode).
    """
    if mode not in ("cls4", "cls_mean"):
        raise ValueError(f"unknown linear feature mode {mode!r}; use cls4 or cls_mean")
    if not isinstance(backbone, MaskedViT):
        raise SoveError(f"--features {mode} needs a ViT with a [CLS] token; for {type(backbone).__name__} "
                        "use --features global (its mean final-stage token)")
    vit = backbone.vit
    x = backbone.embed(images)  # (batch, tokens, dim)
    depth, kept = len(vit.blocks), []
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if mode == "cls4" and i >= depth - num_blocks:
            kept.append(vit.norm(x)[:, 0])
    if mode == "cls_mean":
        x = vit.norm(x)
        kept = [x[:, 0], x[:, vit.num_prefix_tokens:].mean(dim=1)]
    return torch.cat(kept, dim=1).float()


@torch.no_grad()
def extract(backbone: torch.nn.Module, dataset: Dataset, mode: str, batch_size: int = 256,
            device: str | torch.device = "cpu", desc: str = "features") -> torch.Tensor:
    """Features of every item of ``dataset`` in order, on the CPU.

    Args:
        mode: one of :data:`FEATURE_MODES`.

    Returns:
        float32 tensor (N, F): F = 4*dim (``cls4``), 2*dim (``cls_mean``) or dim (``global``, unit rows);
        all-NaN rows for unreadable images (:func:`sove.eval.features.readable_rows` drops them).
    """
    from sove.eval.features import batch_features, extract_features

    if mode == "global":
        return extract_features(backbone, dataset, batch_size, device, desc)
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return torch.cat([batch_features(lambda x: token_features(backbone, x, mode), images.to(device)).cpu()
                      for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False)])


def cached_extract(encoder: FrozenEncoder, dataset: Dataset, split: str, mode: str, name: str,
                   device: str = "cpu", cache: bool = True) -> torch.Tensor:
    """:func:`extract`, reusing ``out_dir/<name>_features_<mode>_<split>.pt`` when it matches.

    The file stores the features and the key they were made from: ``encoder.identity`` (weights
    hash, checkpoint step, architecture, global pool, ``data.*`` keys with absolute roots), the mode,
    the split and :func:`sove.eval.provenance.items_identity` of ``dataset`` (item count, image files
    with their sizes, modification times and inodes, class names). Any difference, or an unreadable
    file, re-extracts and atomically overwrites it. ``cache=False`` neither reads nor writes the file.

    Returns:
        float32 tensor (N, F), as :func:`extract`.
    """
    from sove.eval.provenance import digest, items_identity
    from sove.train.checkpoint import atomic_save

    key = digest({**encoder.identity, "mode": mode, "split": split, "items": items_identity(dataset)})
    path = encoder.out_dir / f"{name}_features_{mode}_{split}.pt"
    if cache and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            print(f"warning: feature cache '{path}' is unreadable ({e}); extracting again", file=sys.stderr)
            stored = {}
        if stored.get("key") == key:
            return stored["features"]
    features = extract(encoder.backbone, dataset, mode, encoder.cfg.eval.batch_size, device, f"{split} features")
    if cache:
        atomic_save({"features": features, "key": key}, path)
    return features


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int, leave_one: bool = False) -> torch.Tensor:
    """Seeded class-balanced subset: each class keeps ``round(fraction * count)`` of its items, at least 1.

    Args:
        labels: int64 tensor (N,).
        fraction: in (0, 1].
        seed: numpy seed; the same seed gives the same subset.
        leave_one: cap each class at ``count - 1`` (so the complement still holds every class with
            at least 2 items); used for the held-out validation part of the linear probe.

    Returns:
        int64 tensor of sorted indices into ``labels``.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(members))))
        n = min(n, len(members) - 1) if leave_one else min(n, len(members))
        chosen.append(rng.permutation(members)[:n])
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


def balanced_subset(labels: torch.Tensor, num: int, seed: int | list[int]) -> torch.Tensor:
    """Seeded class-balanced subset of ``num`` items (all items if ``num >= N``).

    Every class gets the same share where possible: ``num // C`` each, one more for ``num % C`` of
    them (chosen by the seed); a class with fewer items gives all it has and the rest is shared
    equally among the others. Within a class the items are a seeded random draw.

    Args:
        labels: int64 tensor (N,).
        num: subset size.
        seed: numpy seed (an int or a list of ints, e.g. ``[run seed, stream]``); same seed, same subset.

    Returns:
        int64 tensor of sorted indices into ``labels``.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    quota, left = np.zeros_like(counts), min(num, len(y))
    while left > 0:
        open_ = np.flatnonzero(quota < counts)
        share = left // len(open_)
        if share == 0:
            quota[rng.choice(open_, left, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    members = np.split(np.argsort(y, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.permutation(m)[:q] for m, q in zip(members, quota)]
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


def command_line() -> str:
    """The ``sove ...`` command that is running, for the result JSON."""
    return " ".join(["sove"] + sys.argv[1:]) if sys.argv else ""


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` atomically (temporary file, then rename; parents
    created): a crash leaves the previous file or the new one. Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_result(encoder: FrozenEncoder, name: str, result: dict[str, Any], train: Dataset, test: Dataset,
                 settings: dict[str, Any]) -> Path:
    """Stamp ``result`` with its provenance and write it as ``out_dir/<name>.json``; returns the path.

    Adds ``checkpoint_step``, ``weights_sha256``, ``inputs`` (``encoder.identity``, the items of the
    ``train`` / ``test`` splits, the protocol ``settings``) and their ``fingerprint``
    (:func:`sove.eval.provenance.stamp`); ``sove summary`` compares them with the run's last checkpoint.
    """
    from sove.eval.provenance import items_identity, stamp

    items = {"train": items_identity(train), "test": items_identity(test)}
    stamp(result, {**encoder.identity, "items": items, "settings": settings})
    return write_json(result, encoder.out_dir / f"{name}.json")
