"""Builders the trainer composes: dataset, loss, run directory, precision (from the config)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sove.config import token_stride
from sove.data import MultiCropAugmentation, SSLDataset, build_source
from sove.errors import SoveError
from sove.method import ConceptSettings, SOVELoss


def build_train_dataset(cfg: DictConfig) -> SSLDataset:
    """The multi-crop, masked training dataset of ``cfg.data`` / ``cfg.mask``."""
    d = cfg.data
    source = build_source(d.source, d.root, "train", d.download, d.num_channels, d.test_root)
    aug = MultiCropAugmentation(
        d.global_crop_size, d.local_crop_size, d.num_local_crops, tuple(d.global_crop_scale),
        tuple(d.local_crop_scale), tuple(d.mean), tuple(d.std), d.num_channels, d.color_jitter,
        d.grayscale, d.blur, d.solarize,
    )
    # Masks live on the backbone's output-token grid (Swin: final stage; see sove.models.swin).
    return SSLDataset(source, aug, token_stride(cfg.model), cfg.mask.mode, cfg.mask.ratio, d.on_error,
                      cfg.trainer.seed, mask_fill_remainder=cfg.mask.fill_remainder)


def build_loss(cfg: DictConfig) -> SOVELoss:
    """:class:`SOVELoss` from ``cfg.loss`` (anchors seeded by ``trainer.seed``)."""
    lo = cfg.loss

    def settings(c) -> ConceptSettings:
        return ConceptSettings(**OmegaConf.to_container(c))

    return SOVELoss(settings(lo.cls), settings(lo.patch), lo.cls_weight, lo.patch_weight,
                    lo.student_temp, cfg.trainer.seed, lo.chunk_size)


def prepare_run_dir(cfg: DictConfig, overwrite: bool) -> Path:
    """Create ``out_dir/name``; refuse an existing run unless ``overwrite``.

    Raises:
        SoveError: the run directory exists and ``overwrite`` is False.
    """
    run_dir = Path(cfg.trainer.out_dir) / cfg.trainer.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise SoveError(f"run directory '{run_dir}' exists; pass --resume {run_dir} to continue it, "
                            "--overwrite to replace it, or trainer.name=NEW_NAME for a new run")
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision``; ``auto`` = bf16-mixed on GPU, 32-true elsewhere.

    See docs/method.md, "Precision, memory and reproducibility".
    """
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "32-true"
