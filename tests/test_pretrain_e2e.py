"""End to end: a tiny SOVE pretrain on generated images, checkpoint reload, k-NN evaluation."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sove.cli import main
from sove.config import load_config
from sove.method.sove import feature_set_state
from sove.models import build_networks
from sove.train.checkpoint import load_checkpoint, load_state_strict
from sove.api import pretrain


@pytest.fixture
def tiny_run(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   f"trainer.out_dir={tmp_path / 'runs'}", "trainer.name=tiny")
    return cfg, pretrain(cfg).path


def test_tiny_pretrain_writes_a_run_that_reloads(tiny_run):
    cfg, run_dir = tiny_run
    # 32 images, batch 8 -> 4 steps/epoch, 2 epochs -> 8 steps.
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    losses = [float(r["loss/loss"]) for r in rows if r.get("loss/loss")]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "config.yaml").is_file()
    assert load_config(str(run_dir / "config.yaml")) == cfg  # the resolved config round-trips

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 8
    student, teacher = build_networks(cfg)
    load_state_strict(student, ckpt["student"], "student")
    load_state_strict(teacher, ckpt["teacher"], "teacher")
    # 8 steps x 8 images = 64 CLS rows into a 40-row E_C: the pointer wrapped to 64 % 40 = 24,
    # and every row now holds a real dataset index.
    fs = feature_set_state(ckpt, "cls")
    assert int(fs["ptr"]) == 24
    assert fs["indices"].min() >= 0 and fs["indices"].max() < 32
    assert torch.allclose(fs["features"].norm(dim=1), torch.ones(40), atol=1e-5)
    # E_P: one patch per image per step: 64 % 24 = 16.
    assert int(feature_set_state(ckpt, "patch")["ptr"]) == 16
    # Training moved the teacher away from its initialisation, and teacher != student.
    _, teacher0 = build_networks(cfg, seed=cfg.trainer.seed)
    t_now = teacher.state_dict()["head.mlp.0.weight"]
    assert not torch.equal(t_now, teacher0.state_dict()["head.mlp.0.weight"])
    assert not torch.equal(t_now, student.state_dict()["head.mlp.0.weight"])


def test_knn_eval_on_the_run_writes_json(tiny_run, capsys):
    _, run_dir = tiny_run
    assert main(["eval", "knn", "--run", str(run_dir), "--pixels"]) == 0
    result = json.loads((run_dir / "eval" / "knn_pixels.json").read_text())
    # Two brightness classes: raw pixels separate them perfectly (each image's neighbours share its class).
    assert result["top1"] == {"1": 100.0, "3": 100.0}
    assert result["num_train"] == 32 and result["num_test"] == 32
    assert main(["eval", "knn", "--run", str(run_dir)]) == 0
    trained = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert set(trained) >= {"top1", "top5", "best_k", "best_top1", "num_train", "num_test"}
    assert main(["summary", str(run_dir)]) == 0
    assert "raw pixels" in capsys.readouterr().out


def test_existing_run_dir_is_not_overwritten(tiny_run, capsys):
    cfg, run_dir = tiny_run
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    args = ["pretrain", "--config", str(run_dir / "config.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
