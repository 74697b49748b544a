"""sove.run.Run, the one home of a run directory, and the one evaluation loader on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sove.cli import main
from sove.config import load_config
from sove.errors import SoveError
from sove.models import build_teacher_backbone
from sove.run import Run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_labelled_run) -> Path:
    return tiny_labelled_run(tmp_path_factory.mktemp("run"))


def test_run_exposes_config_checkpoint_step_metrics_and_backbone(run):
    r = Run(run)
    assert r.config.model.depth == 2 and r.checkpoint == run / "checkpoints" / "last.pt" and r.step == 1
    assert r.eval_dir == run / "eval" and r.export_dir == run / "export" and r.checkpoint in r.checkpoints
    assert [row["step"] for row in r.metrics() if "step" in row][-1] <= 1
    backbone = r.backbone()
    assert not backbone.training and backbone.mask_token is None
    with pytest.raises(SoveError, match="is not a sove run directory"):
        Run(run / "eval")


def test_backbone_loading_ignores_head_keys_of_another_shape(tmp_path, config_only_run):
    """A method's head (here 7 wide) is never loaded: only the teacher's backbone.* keys, strictly."""
    run = config_only_run(tmp_path / "r", [f"data.root={tmp_path}"])
    cfg = load_config(str(run / "config.yaml"))
    torch.manual_seed(3)
    backbone = build_teacher_backbone(cfg)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher.update({"head.mlp.0.weight": torch.randn(7, 32), "head.last_layer.weight": torch.randn(7, 7)})
    (run / "checkpoints").mkdir()
    torch.save({"step": 3, "teacher": teacher}, run / "checkpoints" / "last.pt")
    loaded = Run(run).backbone()
    assert Run(run).step == 3
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())
    teacher["backbone.vit.cls_token"] = torch.zeros(1, 1, 7)  # a backbone key of another shape still fails
    torch.save({"step": 3, "teacher": teacher}, run / "checkpoints" / "last.pt")
    with pytest.raises(SoveError, match="parameter shapes differ"):
        Run(run).backbone()


def test_knn_on_an_export_or_a_checkpoint_equals_knn_on_the_run(run, tmp_path, capsys):
    assert main(["eval", "knn", "--run", str(run)]) == 0
    by_run = json.loads((run / "eval" / "knn.json").read_text())
    assert main(["export", str(run)]) == 0
    export = tmp_path / "exported"
    export.mkdir()
    (run / "export").rename(export / "export")
    (run / "backbone.json").rename(export / "backbone.json")
    data = [f"data.root={Run(run).config.data.root}", f"data.test_root={Run(run).config.data.test_root}"]
    assert main(["eval", "knn", "--backbone", str(export / "backbone.json"), "data.source=folder", "eval.knn_k=[1,3]",
                 *data]) == 0
    by_export = json.loads((export / "eval" / "knn.json").read_text())
    assert main(["eval", "knn", "--backbone", str(run / "checkpoints" / "last.pt")]) == 0
    by_checkpoint = json.loads((run / "eval" / "knn.json").read_text())
    for other in (by_export, by_checkpoint):
        assert other["top1"] == by_run["top1"] and other["num_test"] == by_run["num_test"]
        assert (other["checkpoint_step"], other["weights_sha256"]) == (1, by_run["weights_sha256"])
    out = capsys.readouterr().out
    assert out.count(f"k-NN top-1 (trained) k=1: {by_run['top1']['1']:.2f}") == 3
    assert main(["eval", "knn", "--backbone", str(export / "backbone.json"), "--pixels"]) == 2
    assert capsys.readouterr().err == ("sove: error: --random-init, --pixels and --all need --run RUN_DIR "
                                       "(the run's architecture, seed and data)\n")
