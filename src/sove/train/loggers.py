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
``loss.cls.num_judges``). Their run ids are kept in ``RUN/loggers.json`` (:data:`IDS_FILE`), so a
resume (``--resume``, ``trainer.auto_resume``, a torchrun restart) logs into the same W&B run
(``resume="allow"``) and the same MLflow run, its steps continuing from the checkpoint's step (the
steps after that checkpoint logged before the stop appear twice). MLflow parameters cannot change: a
resume adds the keys the run does not have yet and keeps the first values of the others.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from sove.errors import ConfigError
from sove.train.metrics_csv import MetricsCSV
from sove.train.preflight import flatten, warn

#: ``RUN/loggers.json``: ``{"wandb": run id, "mlflow": run id}`` of the run's W&B / MLflow runs.
IDS_FILE = "loggers.json"
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
    """The loggers named in ``trainer.loggers``, :class:`MetricsCSV` first (W&B and MLflow continue the
    runs of :func:`saved_ids`, read here once)."""
    names, ids = list(cfg.trainer.loggers), saved_ids(run_dir)
    return [_BUILDERS[name](cfg, run_dir, ids) for name in ["csv"] + [n for n in names if n != "csv"]]


def _csv(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> Logger:
    return MetricsCSV(run_dir / "metrics.csv")


def _tensorboard(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> Logger:
    return TensorBoardLogger(str(run_dir), name="tensorboard", version="")


def saved_ids(run_dir: str | Path, quiet: bool = False) -> dict[str, str]:
    """The logger run ids of ``RUN/loggers.json`` (empty for a new run; a file that is not such JSON is
    ignored with a ``sove: warning:`` on rank 0 unless ``quiet``, and the loggers start new runs)."""
    path = Path(run_dir) / IDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if not quiet:
            warn(f"'{path}' is unreadable ({e}); W&B / MLflow log into new runs")
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _wandb(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> Logger:
    return WandbLogger(name=cfg.trainer.name, project=os.environ.get("WANDB_PROJECT", "sove"), save_dir=str(run_dir),
                       id=ids.get("wandb"), resume="allow")


def _mlflow(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> Logger:
    uri = mlflow_tracking_uri(run_dir)
    run_id = ids.get("mlflow")
    # rank 0 only (the only rank that logs): N processes opening RUN/mlflow.db at once is asking for trouble
    if run_id is not None and rank_zero_only.rank == 0 and not _mlflow_run_exists(uri, run_id):
        print(f"sove: warning: MLflow run {run_id} of '{Path(run_dir) / IDS_FILE}' is not in {uri} (another "
              "MLFLOW_TRACKING_URI?); logging into a new MLflow run", file=sys.stderr)
        run_id = None
    return MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "sove"), run_name=cfg.trainer.name,
                        tracking_uri=uri, run_id=run_id,
                        artifact_location=(Path(run_dir).resolve() / "mlflow-artifacts").as_uri())


def _mlflow_run_exists(uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


_BUILDERS = {"csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def start_loggers(loggers: list[Logger], cfg: DictConfig, run_dir: Path) -> None:
    """On rank 0: create the TensorBoard writer now; give W&B and MLflow the config as hyperparameters
    (an MLflow run that is continued: only the keys it does not have, and its status back to RUNNING);
    write their run ids to ``RUN/loggers.json`` (read again quietly: :func:`build_loggers` warned of an
    unreadable one)."""
    saved = saved_ids(run_dir, quiet=True)
    ids = dict(saved)  # a logger left out on this resume keeps its id for a later one
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment  # noqa: B018 - creates the event file
        elif isinstance(logger, MLFlowLogger) and logger._run_id is not None:  # a continued run
            client, run_id = logger.experiment, logger.run_id
            known = client.get_run(run_id).data.params
            logger.log_hyperparams({k: v for k, v in flat_config(cfg).items() if k not in known})
            client.update_run(run_id, status="RUNNING")
            ids["mlflow"] = run_id
        elif not isinstance(logger, MetricsCSV):
            logger.log_hyperparams(flat_config(cfg))
            ids["wandb" if isinstance(logger, WandbLogger) else "mlflow"] = logger.version if isinstance(
                logger, WandbLogger) else logger.run_id
    if ids and ids != saved:
        from sove.train.checkpoint import atomic_write

        atomic_write(Path(run_dir) / IDS_FILE, lambda f: f.write(json.dumps(ids, indent=1).encode()))


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """``{"loss.cls.num_judges": 9, ...}``: the resolved config with dotted keys (lists kept as values)."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def finalize_loggers(loggers: list[Logger], status: str = "success") -> None:
    """``finalize`` every logger; a W&B run is finished too (its files complete; the process may start another)."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
