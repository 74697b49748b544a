"""Builders the trainer composes: dataset, loss, run directory, precision (from the config), and the
pre-flight checks of ``sove pretrain``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sove.config import token_stride
from sove.data import MultiCropAugmentation, SSLDataset, build_source
from sove.data.decoded import DecodedDataset
from sove.errors import SoveError
from sove.method.sove import build_sove_loss as build_loss  # noqa: F401 (re-exported: viz, benchmarks)
from sove.preflight import check_run_name, check_trainer_device, check_writable
from sove.run_lock import LOCK_NAME, is_sove_run
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


def build_train_dataset(cfg: DictConfig) -> SSLDataset:
    """The multi-crop, masked training dataset of ``cfg.data`` / ``cfg.mask``: a
    :class:`DecodedDataset` (views made on the training device) when :func:`resolve_augment_on`
    says ``device``, else an :class:`SSLDataset` (views made in the loader)."""
    d = cfg.data
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


#: What a start writes before its first checkpoint (and the lock). A run directory holding only
#: these and no checkpoint is a failed start: it is started again without ``--overwrite``.
START_FILES = frozenset({"config.yaml", "checkpoints", "metrics.csv", "hparams.yaml", "tensorboard", "debug",
                         "wandb", "mlflow.db", "mlflow-artifacts", LOCK_NAME})


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint files of a run (``checkpoints/*.pt``; hidden temporaries excluded), sorted."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(p for p in folder.glob("*.pt") if not p.name.startswith(".")) if folder.is_dir() else []


def check_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Pre-flight of ``trainer.out_dir/trainer.name`` (reads only); True when it must be emptied first.

    An absent or empty folder is used as is. A sove run with a checkpoint (or anything a start does
    not write) is replaced only with ``overwrite``; one holding no checkpoint (a failed start) is
    started again. Any other folder is never deleted.

    Raises:
        SoveError: the folder is not a sove run, or is a run with checkpoints and ``overwrite`` is False.
    """
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise SoveError(f"run directory '{run_dir}' is a file; choose another trainer.name or trainer.out_dir")
    entries = {p.name for p in run_dir.iterdir()} - {LOCK_NAME}
    if not entries:
        return False
    if not is_sove_run(run_dir):
        raise SoveError(f"'{run_dir}' exists and is not a sove run directory (no config.yaml and checkpoints/ "
                        "written by `sove pretrain`); sove never deletes it: choose another trainer.name or "
                        "trainer.out_dir")
    if overwrite or (not saved_checkpoints(run_dir) and entries <= START_FILES):
        return True
    raise SoveError(f"run directory '{run_dir}' exists; pass --resume {run_dir} to continue it, "
                    "--overwrite to replace it, or trainer.name=NEW_NAME for a new run")


def prepare_run_dir(cfg: DictConfig, overwrite: bool) -> Path:
    """Create ``out_dir/name`` with ``checkpoints/`` and the resolved ``config.yaml``.

    An existing run is emptied first only as :func:`check_run_dir` allows (its lock file is kept).

    Raises:
        SoveError: a bad ``trainer.name``; see :func:`check_run_dir`.
    """
    run_dir = Path(cfg.trainer.out_dir) / check_run_name(cfg.trainer.name)
    if check_run_dir(run_dir, overwrite):
        if not overwrite:
            print(f"{run_dir} holds no checkpoint (an earlier start failed); starting it again")
        for child in run_dir.iterdir():
            if child.name != LOCK_NAME:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


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
    check_run_dir(run_dir, overwrite)
    check_writable(run_dir, "the run directory", "choose another trainer.out_dir")
    return run_dir


def resume_checkpoint(run_dir: Path) -> Path:
    """``RUN/checkpoints/last.pt``, the file ``--resume`` continues from.

    Raises:
        SoveError: the run holds no checkpoint at all (a failed start: start it again instead).
    """
    if not saved_checkpoints(run_dir):
        raise SoveError(f"--resume: '{run_dir}' holds no checkpoint yet (its start failed or stopped before the "
                        "first save); start it again with the same `sove pretrain` command (no --overwrite needed)")
    return Path(run_dir) / "checkpoints" / "last.pt"


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision``; ``auto`` = bf16-mixed on GPU, 32-true elsewhere.

    See docs/method.md, "Precision, memory and reproducibility".
    """
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if _uses_cuda(cfg) else "32-true"
