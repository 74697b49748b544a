"""trainer.loggers: W&B (offline) and MLflow (local store) next to metrics.csv and TensorBoard."""

from __future__ import annotations

import csv

import pytest

from conftest import TINY
from sove.config import load_config
from sove.errors import ConfigError
from sove.train import loggers


def test_offline_wandb_and_mlflow_runs_write_their_files(tmp_path, image_folder, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from sove.train.trainer import pretrain

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wb"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wb"), "WANDB_DATA_DIR": str(tmp_path / "wb"),
                       "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=lg",
                                    "trainer.max_steps=2", "trainer.loggers=[csv,tensorboard,wandb,mlflow]"])
    run = pretrain(cfg)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and any((run / "tensorboard").iterdir())
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("sove").experiment_id])
    assert found.info.run_name == "lg" and found.info.status == "FINISHED"
    assert found.data.params["loss.cls.num_judges"] == "3" and found.data.params["trainer.name"] == "lg"
    history = client.get_metric_history(found.info.run_id, "loss/loss")
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), float(r["loss/loss"])) for r in rows]


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


def test_default_loggers_are_csv_and_tensorboard(tmp_path):
    cfg = load_config(None, TINY + ["data.root=unused"])
    built = loggers.build_loggers(cfg, tmp_path)
    assert [type(x).__name__ for x in built] == ["MetricsCSV", "TensorBoardLogger"]
