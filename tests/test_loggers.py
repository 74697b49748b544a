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


def test_a_resume_logs_into_the_same_mlflow_run(tmp_path, image_folder, monkeypatch, tiny_cfg):
    """Before: each segment of a resumed run was a new MLflow run (and a new W&B run) of the same name."""
    pytest.importorskip("mlflow")
    import json

    from mlflow import MlflowClient

    from sove.api import pretrain, resume

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    pretrain(tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=r",
                      "trainer.max_steps=2", "trainer.loggers=[csv,mlflow]"))
    resume(tmp_path / "r", trainer={"max_steps": 4})
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("sove").experiment_id])
    assert json.loads((tmp_path / "r" / loggers.IDS_FILE).read_text()) == {"mlflow": found.info.run_id}
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss/loss")] == [1, 2, 3, 4]
    assert found.info.status == "FINISHED" and found.data.params["trainer.max_steps"] == "2"  # first value kept


def test_saved_logger_ids_are_reused_and_a_missing_mlflow_run_starts_a_new_one(tmp_path, monkeypatch, capsys,
                                                                              tiny_cfg):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / loggers.IDS_FILE).write_text('{"wandb": "abc123", "mlflow": "0123456789abcdef"}')
    wandb_logger, mlflow_logger = loggers.build_loggers(tiny_cfg("data.root=unused",
                                                                 "trainer.loggers=[csv,wandb,mlflow]"), tmp_path)[1:]
    assert (wandb_logger._wandb_init["id"], wandb_logger._wandb_init["resume"]) == ("abc123", "allow")
    assert mlflow_logger._run_id is None
    assert "MLflow run 0123456789abcdef of" in capsys.readouterr().err


def test_an_unreadable_ids_file_is_warned_about_once_and_replaced(tmp_path, monkeypatch, capsys, tiny_cfg):
    """Before: the warning was printed 3 times per start (each reader of RUN/loggers.json printed it)."""
    pytest.importorskip("mlflow")
    import json

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / loggers.IDS_FILE).write_text("not json")
    cfg = tiny_cfg("data.root=unused", "trainer.loggers=[csv,mlflow]")
    built = loggers.build_loggers(cfg, tmp_path)
    loggers.start_loggers(built, cfg, tmp_path)
    loggers.finalize_loggers(built)
    line = (f"sove: warning: '{tmp_path / loggers.IDS_FILE}' is unreadable (Expecting value: line 1 column 1 "
            "(char 0)); W&B / MLflow log into new runs\n")
    err = capsys.readouterr().err
    assert line in err and err.count("is unreadable") == 1
    assert json.loads((tmp_path / loggers.IDS_FILE).read_text()) == {"mlflow": built[1].run_id}
