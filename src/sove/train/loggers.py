"""The loggers of a run (``trainer.loggers``): Lightning Fabric loggers that ``fabric.log_dict`` reaches.

* ``csv``: :class:`~sove.train.metrics_csv.MetricsCSV`, ``RUN/metrics.csv``; always on (``sove plot``
  and ``--resume`` read it).
* ``tensorboard``: Fabric's ``TensorBoardLogger``, ``RUN/tensorboard/``.
* ``wandb`` (``pip install 'sove[wandb]'``): Lightning's ``WandbLogger``; project
  ``$WANDB_PROJECT`` or ``sove``, run name ``trainer.name``, files in ``RUN/wandb/``.
  ``WANDB_MODE=offline`` keeps it on disk (``wandb sync RUN/wandb/offline-run-*`` uploads it later).
* ``mlflow`` (``pip install 'sove[mlflow]'``): Lightning's ``MLFlowLogger``; tracking URI
  ``$MLFLOW_TRACKING_URI``, else the SQLite store ``RUN/mlflow.db`` (view it with ``mlflow ui
  --backend-store-uri sqlite:///RUN/mlflow.db``); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``sove``,
  run name ``trainer.name``.

W&B and MLflow also receive the resolved config as hyperparameters (dotted keys, e.g.
``loss.cls.num_judges``). A resume opens a new W&B / MLflow run under the same name; its steps
continue from the checkpoint's step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from sove.errors import ConfigError
from sove.train.metrics_csv import MetricsCSV
from sove.train.preflight import flatten

#: Package (and extra of ``pip install 'sove[...]'``) each optional logger needs.
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """Pre-flight of ``trainer.loggers``: every optional logger's package is importable.

    Raises:
        ConfigError: naming the logger and the ``pip install`` that adds it.
    """
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trainer.loggers: {name} needs the {package} package, which is not installed; "
                              f"pip install 'sove[{name}]', or leave {name} out of trainer.loggers")


def mlflow_tracking_uri(run_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``RUN/mlflow.db`` (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers named in ``trainer.loggers``, :class:`MetricsCSV` first."""
    names = list(cfg.trainer.loggers)
    return [_BUILDERS[name](cfg, run_dir) for name in ["csv"] + [n for n in names if n != "csv"]]


def _csv(cfg: DictConfig, run_dir: Path) -> Logger:
    return MetricsCSV(run_dir / "metrics.csv")


def _tensorboard(cfg: DictConfig, run_dir: Path) -> Logger:
    return TensorBoardLogger(str(run_dir), name="tensorboard", version="")


def _wandb(cfg: DictConfig, run_dir: Path) -> Logger:
    return WandbLogger(name=cfg.trainer.name, project=os.environ.get("WANDB_PROJECT", "sove"), save_dir=str(run_dir))


def _mlflow(cfg: DictConfig, run_dir: Path) -> Logger:
    return MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "sove"), run_name=cfg.trainer.name,
                        tracking_uri=mlflow_tracking_uri(run_dir),
                        artifact_location=(Path(run_dir).resolve() / "mlflow-artifacts").as_uri())


_BUILDERS = {"csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def start_loggers(loggers: list[Logger], cfg: DictConfig) -> None:
    """On rank 0: create the TensorBoard writer now; give W&B and MLflow the config as hyperparameters."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment  # noqa: B018 - creates the event file
        elif not isinstance(logger, MetricsCSV):
            logger.log_hyperparams(flat_config(cfg))


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """``{"loss.cls.num_judges": 9, ...}``: the resolved config with dotted keys (lists kept as values)."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def finalize_loggers(loggers: list[Logger], status: str = "success") -> None:
    """``finalize`` every logger; a W&B run is finished too (its files complete; the process may start another)."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
