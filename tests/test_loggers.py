"""trainer.loggers: which loggers are built, where MLflow stores, a missing package named before any work
(offline W&B and MLflow runs: tests/test_ecosystem.py)."""

from __future__ import annotations

import pytest

from sove.errors import ConfigError
from sove.train import loggers


def test_a_missing_logger_package_is_named_before_any_work(monkeypatch):
    monkeypatch.setitem(loggers.PACKAGES, "wandb", "sove_no_such_package")
    with pytest.raises(ConfigError) as err:
        loggers.check_installed(["csv", "tensorboard", "wandb"])
    assert str(err.value) == ("trainer.loggers: wandb needs the sove_no_such_package package, which is not installed; "
                              "pip install 'sove[wandb]', or leave wandb out of trainer.loggers")


def test_mlflow_store_is_the_run_directory_unless_a_tracking_uri_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert loggers.mlflow_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert loggers.mlflow_tracking_uri(tmp_path) == "http://tracking.example:5000"


def test_default_loggers_are_csv_and_tensorboard(tmp_path, tiny_cfg):
    cfg = tiny_cfg("data.root=unused")
    built = loggers.build_loggers(cfg, tmp_path)
    assert [type(x).__name__ for x in built] == ["MetricsCSV", "TensorBoardLogger"]


def test_a_failed_start_with_wandb_and_mlflow_files_is_started_again(tmp_path):
    """A start that failed before its first checkpoint leaves the loggers' files too; it is still a
    failed start (emptied and started again without --overwrite)."""
    from sove.run import check_run_dir

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {}\nmodel: {}\ntrainer: {}\n")
    for name in ("metrics.csv", "mlflow.db"):
        (run / name).write_text("")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    assert check_run_dir(run, overwrite=False) is True
