"""A run directory written by ``sove pretrain``: its layout, config, checkpoints and teacher backbone.

Layout (docs/architecture.md, "Run directory")::

    RUN/config.yaml              the resolved config (CONFIG_FILE)
    RUN/checkpoints/last.pt      the newest checkpoint; step copies beside it (CHECKPOINT_DIR, LAST_CHECKPOINT)
    RUN/metrics.csv              one row per logged step (METRICS_FILE)
    RUN/eval/                    evaluation results and feature caches (EVAL_DIR)
    RUN/export/, RUN/backbone.json   ``sove export`` (EXPORT_DIR, BACKBONE_JSON)

This module sits below training and evaluation: the trainer creates a run with :func:`prepare_run_dir`,
evaluation, export and the concept browser read one through :class:`Run`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sove.config import load_config
from sove.errors import ConfigError, SoveError
from sove.preflight import check_run_name
from sove.run_lock import LOCK_NAME, is_sove_run

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.csv"
EVAL_DIR = "eval"
EXPORT_DIR = "export"
BACKBONE_JSON = "backbone.json"
#: Prefix of the backbone's keys in a checkpoint's ``teacher`` state dict (the heads' keys differ per method).
BACKBONE_PREFIX = "backbone."

#: What a start writes before its first checkpoint (and the lock). A run directory holding only
#: these and no checkpoint is a failed start: it is started again without ``--overwrite``.
START_FILES = frozenset({CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, "hparams.yaml", "tensorboard", "debug",
                         "wandb", "mlflow.db", "mlflow-artifacts", "loggers.json", LOCK_NAME})


def saved_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run (``checkpoints/*.pt``; hidden temporaries excluded), sorted."""
    folder = Path(run_dir) / CHECKPOINT_DIR
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
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    return run_dir


def resume_checkpoint(run_dir: Path) -> Path:
    """``RUN/checkpoints/last.pt``, the file ``--resume`` continues from.

    Raises:
        SoveError: the run holds no checkpoint at all (a failed start: start it again instead).
    """
    if not saved_checkpoints(run_dir):
        raise SoveError(f"--resume: '{run_dir}' holds no checkpoint yet (its start failed or stopped before the "
                        "first save); start it again with the same `sove pretrain` command (no --overwrite needed)")
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


#: torchrun's count of worker-group restarts: "0" at the first start, N after the N-th restart.
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"


def auto_resume_reason() -> str:
    """What makes a start resume: ``restart N (torchrun)`` when torchrun restarted the workers
    (``TORCHELASTIC_RESTART_COUNT`` = N > 0), else ``trainer.auto_resume``."""
    count = os.environ.get(RESTART_COUNT_ENV, "0")
    return f"restart {count} (torchrun)" if count.isdigit() and int(count) > 0 else "trainer.auto_resume"


def auto_resume_checkpoint(cfg: DictConfig, overwrite: bool = False) -> Path | None:
    """The checkpoint a start of ``sove pretrain`` continues instead of starting anew: ``RUN/checkpoints/last.pt``
    (RUN = ``trainer.out_dir/trainer.name``) when ``trainer.auto_resume`` is true or torchrun restarted the
    workers (:func:`auto_resume_reason`), and RUN is a sove run holding a checkpoint. None: a new start (no
    checkpoint yet: a failed start is started again, as :func:`check_run_dir` says). Prints on rank 0
    ``REASON: resuming RUN/checkpoints/last.pt at step S``. After a torchrun restart ``overwrite`` is ignored
    (it applied to the first start; the restart continues what that start saved).

    Raises:
        ConfigError: ``overwrite`` together with ``trainer.auto_resume=true`` on a first start.
        SoveError: a bad ``trainer.name``; an unreadable checkpoint.
    """
    _warn_shared_store()
    reason = auto_resume_reason()
    restarted = reason != "trainer.auto_resume"
    if not (cfg.trainer.auto_resume or restarted):
        return None
    if overwrite and not restarted:
        raise ConfigError("trainer.auto_resume=true continues the run directory and --overwrite replaces it; "
                          "pass one of them")
    run_dir = Path(cfg.trainer.out_dir) / check_run_name(cfg.trainer.name)
    if not is_sove_run(run_dir) or not saved_checkpoints(run_dir):
        return None
    path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"{reason}: resuming {path} at step {checkpoint_step(path)}", flush=True)
    return path


def _warn_shared_store() -> None:
    """Warn (rank 0) when torchrun may restart the workers (``TORCHELASTIC_MAX_RESTARTS`` > 0) and shares its
    rendezvous store with them: a restarted worker may then read a dead worker's address and fail to connect
    (pytorch/pytorch#135712)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    restarts, shared = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"), os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
    if rank_zero_only.rank == 0 and restarts.isdigit() and int(restarts) > 0 and shared == "True":
        print("sove: warning: torchrun shares its rendezvous store with the workers, so a restart may connect to the "
              "dead workers' addresses (pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 where "
              "torchrun runs, with --rdzv-backend=c10d or --standalone (docs/distributed.md, Elastic restarts)",
              file=sys.stderr, flush=True)


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved ``config.yaml`` of a run directory, with optional overrides.

    Raises:
        SoveError: the directory or its config.yaml is missing.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise SoveError(f"'{run_dir}' is not a sove run directory (no config.yaml); "
                        "pass the folder that `sove pretrain` wrote")
    return load_config(str(path), overrides)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, memory-mapped (``weights_only=True``): tensors are read when used.

    Raises:
        SoveError: the file is missing, unreadable or not a sove training checkpoint (no step/teacher).
    """
    path = Path(path)
    if not path.is_file():
        raise SoveError(f"checkpoint '{path}' not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or "step" not in state or "teacher" not in state:
            raise ValueError("not a sove training checkpoint (no step/teacher)")
        return state
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise SoveError(f"checkpoint '{path}' could not be loaded: {e}") from None


def checkpoint_step(path: str | Path) -> int:
    """The training step stored in a checkpoint (memory-mapped: the tensors are not read).

    Raises:
        SoveError: as :func:`read_checkpoint`.
    """
    return int(read_checkpoint(path)["step"])


def teacher_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a checkpoint's teacher, prefix removed (wrapper prefixes such as
    ``_orig_mod.`` stripped first); the head's keys, whose shapes differ per method, are left out.

    Raises:
        SoveError: as :func:`read_checkpoint`.
    """
    from sove.train.checkpoint import strip_prefixes

    teacher = strip_prefixes(read_checkpoint(path)["teacher"])
    n = len(BACKBONE_PREFIX)
    return {k[n:]: v for k, v in teacher.items() if k.startswith(BACKBONE_PREFIX)}


def teacher_backbone(run_dir: str | Path, cfg: DictConfig, checkpoint: str = LAST_CHECKPOINT) -> torch.nn.Module:
    """The trained teacher backbone of ``RUN/checkpoints/<checkpoint>`` (a ``MaskedViT`` or ``MaskedSwin``
    without mask token, built from ``cfg.model``), strict on the ``backbone.*`` keys only.

    Raises:
        SoveError: missing/unreadable checkpoint; a backbone key missing, unexpected or of another shape.
    """
    from sove.models import build_teacher_backbone
    from sove.train.checkpoint import load_state_strict

    path = Path(run_dir) / CHECKPOINT_DIR / checkpoint
    state = teacher_backbone_state(path)
    backbone = build_teacher_backbone(cfg)
    load_state_strict(backbone, state, f"teacher backbone in {path}")
    return backbone


class Run:
    """A run directory of ``sove pretrain`` and one of its checkpoints (default ``last.pt``); what
    ``sove.pretrain`` / ``sove.resume`` return. A path-like object (``os.fspath(run)`` is the directory).

    Args:
        path: the run directory (holding ``config.yaml``).
        checkpoint: file name in ``RUN/checkpoints`` (e.g. a step copy).
        overrides: dotted config overrides applied to :attr:`config` (e.g. ``data.root=...``).

    Raises:
        SoveError: ``path`` holds no ``config.yaml``.
    """

    def __init__(self, path: str | Path, checkpoint: str = LAST_CHECKPOINT,
                 overrides: list[str] | tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        if not (self.path / CONFIG_FILE).is_file():
            raise SoveError(f"'{path}' is not a sove run directory (no config.yaml); "
                            "pass the folder that `sove pretrain` wrote")
        self.checkpoint_name, self.overrides = checkpoint, tuple(overrides)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def config(self) -> DictConfig:
        """The resolved config (``config.yaml`` ⊕ overrides)."""
        return load_run_config(self.path, self.overrides)

    @property
    def checkpoint(self) -> Path:
        """Path of the chosen checkpoint (it may not exist yet)."""
        return self.path / CHECKPOINT_DIR / self.checkpoint_name

    @property
    def checkpoints(self) -> list[Path]:
        """Every saved checkpoint (``last.pt`` and the step copies), sorted by name."""
        return saved_checkpoints(self.path)

    @property
    def step(self) -> int:
        """The training step of :attr:`checkpoint`. Raises SoveError when it is missing or unreadable."""
        return checkpoint_step(self.checkpoint)

    @property
    def eval_dir(self) -> Path:
        """``RUN/eval``: evaluation results and feature caches."""
        return self.path / EVAL_DIR

    @property
    def export_dir(self) -> Path:
        """``RUN/export``: the timm / Hugging Face folder of ``sove export``."""
        return self.path / EXPORT_DIR

    def metrics(self) -> list[dict[str, float]]:
        """Rows of ``metrics.csv`` in file order; each maps a column to its float value (empty cells left out).

        Raises:
            SoveError: the run has no metrics.csv.
        """
        path = self.path / METRICS_FILE
        if not path.is_file():
            raise SoveError(f"no {METRICS_FILE} in '{self.path}'; the run has not logged a step yet")
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]

    def backbone(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The teacher backbone of :attr:`checkpoint` in eval mode on ``device`` (see :func:`teacher_backbone`):
        ``backbone(images)["global"]`` maps float (batch, channels, H, W), normalised with ``data.mean/std``,
        to (batch, embed_dim) image features (also ``"cls"`` and ``"patches"`` (batch, patches, embed_dim))."""
        return teacher_backbone(self.path, self.config, self.checkpoint_name).to(device).eval()

    def export(self) -> Path:
        """``sove export`` of :attr:`checkpoint`: writes ``RUN/export`` and ``RUN/backbone.json`` and returns the
        JSON's path, which :func:`sove.load_backbone` loads as a timm model (:func:`sove.export.export_backbone`).

        Raises:
            SoveError: as :func:`sove.export.export_backbone`.
        """
        from sove.export import export_backbone

        return Path(export_backbone(self.path, self.checkpoint_name)["meta"])


#: The keys every backbone.json of :func:`sove.export.export_backbone` holds.
META_KEYS = ("weights", "architecture", "model_kwargs", "mean", "std")


def read_backbone_meta(path: Path) -> dict:
    """The parsed ``backbone.json`` at ``path``.

    Raises:
        SoveError: the file is not UTF-8 JSON holding an object with :data:`META_KEYS`, naming the file.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoveError(f"'{path}' is not a backbone.json written by `sove export` (not JSON: {e}); pass the "
                        "backbone.json of RUN/export or a RUN/checkpoints/FILE.pt") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise SoveError(f"'{path}' is not a backbone.json written by `sove export` (missing {', '.join(missing)}); "
                        "pass the backbone.json of RUN/export or a RUN/checkpoints/FILE.pt")
    return meta
