"""Builders the trainer composes: dataset, loss, precision (from the config), and the pre-flight checks
of ``sove pretrain`` (the run directory itself: :mod:`sove.run`)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch.utils.data import Dataset

from sove.config import token_stride
from sove.data import MultiCropAugmentation, SSLDataset, build_source
from sove.data.decoded import DecodedDataset
from sove.preflight import check_run_name, check_trainer_device, check_writable
from sove.run import check_run_dir
from sove.train.loggers import check_installed


def _uses_cuda(cfg: DictConfig) -> bool:
    """Whether Fabric will train on a CUDA device (``trainer.accelerator`` auto / gpu / cuda)."""
    return torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")


def resolve_augment_on(cfg: DictConfig) -> str:
    """``data.augment_on``; ``auto`` = ``device`` on CUDA, and on the CPU when the data is made in
    the training process (``data.num_workers=0``: the device path costs 5x less CPU per image
    on the demo); ``loader`` on the CPU with workers, which then make the views in parallel
    with the training step (docs/benchmarks.md, "Input pipeline")."""
    if cfg.data.augment_on != "auto":
        return cfg.data.augment_on
    return "device" if _uses_cuda(cfg) or cfg.data.num_workers == 0 else "loader"


def loader_options(cfg: DictConfig, device: torch.device) -> dict:
    """DataLoader keyword arguments of ``cfg.data`` for a run on ``device``: workers, pinned
    memory on CUDA, persistent workers and ``data.prefetch_factor`` when there are workers."""
    d = cfg.data
    options = {"num_workers": d.num_workers, "pin_memory": device.type == "cuda"}
    if d.num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=d.prefetch_factor)
    return options


def build_train_dataset(cfg: DictConfig, source: Dataset | None = None) -> SSLDataset:
    """The multi-crop, masked training dataset of ``cfg.data`` / ``cfg.mask``: a
    :class:`DecodedDataset` (views made on the training device) when :func:`resolve_augment_on`
    says ``device``, else an :class:`SSLDataset` (views made in the loader). ``source``: the images
    (default: :func:`build_source` of ``cfg.data``; a :class:`sove.data.python_source.PythonSource`
    for ``data.source=python``)."""
    d = cfg.data
    if source is None:
        source = build_source(d.source, d.root, "train", d.download, d.num_channels, d.test_root)
    aug = MultiCropAugmentation(
        d.global_crop_size, d.local_crop_size, d.num_local_crops, tuple(d.global_crop_scale),
        tuple(d.local_crop_scale), tuple(d.mean), tuple(d.std), d.num_channels, d.color_jitter,
        d.grayscale, d.blur, d.solarize,
    )
    # Masks live on the backbone's output-token grid (Swin: final stage; see sove.models.swin).
    args = (source, aug, token_stride(cfg.model), cfg.mask.mode, cfg.mask.ratio, d.on_error, cfg.trainer.seed)
    kwargs = {"mask_fill_remainder": cfg.mask.fill_remainder}
    if resolve_augment_on(cfg) == "device":
        return DecodedDataset(*args, max_image_side=d.max_image_side, **kwargs)
    return SSLDataset(*args, **kwargs)


def preflight(cfg: DictConfig, overwrite: bool) -> Path:
    """Checks of ``sove pretrain`` before any work or file: ``trainer.name``, the device and precision,
    the packages of ``trainer.loggers``, the existing run directory, a writable ``trainer.out_dir``.
    Returns the run directory.

    Raises:
        SoveError / ConfigError: naming the key or folder.
    """
    run_dir = Path(cfg.trainer.out_dir) / check_run_name(cfg.trainer.name)
    check_trainer_device(cfg, resolve_precision(cfg))
    check_installed(list(cfg.trainer.loggers))
    if rank_zero_only.rank == 0:  # under torchrun the other ranks start while rank 0 prepares the folder
        check_run_dir(run_dir, overwrite)
    check_writable(run_dir, "the run directory", "choose another trainer.out_dir")
    return run_dir


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision``; ``auto`` = bf16-mixed on GPU, 32-true elsewhere.

    See docs/method.md, "Precision, memory and reproducibility".
    """
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if _uses_cuda(cfg) else "32-true"
