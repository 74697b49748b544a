"""Checks run before any work or any file is written: run names, writable outputs, devices.

A command that would fail only after minutes of feature extraction (a read-only output folder) or
after half-creating its run directory (an absent GPU) fails here instead, with one line naming
the key, folder or option.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from sove.errors import ConfigError, SoveError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def check_run_name(name: object) -> str:
    """``trainer.name`` as a plain folder name (the run is ``trainer.out_dir/trainer.name``).

    Raises:
        ConfigError: empty, ``.``, ``..``, or containing ``/`` or ``\\`` (a name that would put the
            run, and what ``--overwrite`` deletes, somewhere other than one folder of ``out_dir``).
    """
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"trainer.name={name!r} is not a plain folder name (it must be non-empty, not '.' "
                          "or '..', without '/' or '\\'); the run directory is trainer.out_dir/trainer.name")
    return name


def _probe(folder: Path) -> None:
    """Create and drop an unnamed file in ``folder`` (raises OSError if that is impossible)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def check_writable(folder: str | Path, what: str,
                   hint: str = "write elsewhere (copy the run, or --out where offered)") -> None:
    """Pre-flight: ``folder`` (or, while it does not exist, its nearest existing parent, where it
    would be created) is a folder this process can write to. Creates nothing.

    Args:
        folder: where the command will write.
        what: what would be written, for the message (e.g. "k-NN results").
        hint: the alternative the message offers besides making the folder writable.

    Raises:
        SoveError: naming the folder and the reason (read-only, permission denied, not a folder).
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SoveError(f"cannot write {what} to '{folder}': '{existing}' is not a folder")
    try:
        _probe(existing)
    except OSError as e:
        raise SoveError(f"cannot write {what} to '{folder}': '{existing}' is not writable ({e.strerror}); "
                        f"make it writable or {hint}") from None


def check_torch_device(device: str, option: str = "--device") -> None:
    """Pre-flight of an evaluation device (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Raises:
        SoveError: not a torch device, or not present on this machine.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SoveError(f"{option} {device}: not a device name (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise SoveError(f"{option} {device}: this machine has {count} CUDA GPU(s); use {option} cpu")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SoveError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")


def check_trainer_device(cfg: DictConfig, precision: str) -> None:
    """Pre-flight: ``trainer.accelerator`` / ``devices`` / ``strategy`` and the resolved ``precision``
    are usable here, checked before the run directory is made (Lightning Fabric's own errors come
    only after it).

    Raises:
        ConfigError: naming the key and what this machine has.
    """
    import torch
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.trainer
    acc = str(t.accelerator)
    cuda = torch.cuda.is_available()
    if acc in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={acc}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                          "False); use trainer.accelerator=cpu or auto")
    if acc == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: MPS is not available on this machine; use trainer.accelerator=cpu")
    on_cuda = cuda and acc in ("auto", "gpu", "cuda")
    if precision.startswith("16") and not on_cuda:
        raise ConfigError(f"trainer.precision={precision}: float16 needs a CUDA GPU; use bf16-mixed or 32-true here")
    if precision.startswith("bf16") and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={precision}: this GPU has no bfloat16; use 16-mixed or 32-true")
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    strategies = ["auto", *STRATEGY_REGISTRY.available_strategies()]
    if str(t.strategy) not in strategies:
        raise ConfigError(f"trainer.strategy: must be one of {', '.join(strategies)}; got {t.strategy!r}")
    if os.environ.get("LT_CLI_USED"):  # under `fabric run` a Fabric sets up the process group at once
        return
    quiet = logging.getLogger("lightning.fabric")
    level = quiet.level
    try:  # a trial construction catches what remains (device count, strategy name); it starts nothing
        quiet.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Fabric(accelerator=acc, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=precision)
    except (ValueError, RuntimeError, TypeError, ImportError, MisconfigurationException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"trainer.accelerator={acc} devices={t.devices} strategy={t.strategy} "
                          f"precision={precision}: {reason}") from None
    finally:
        quiet.setLevel(level)
