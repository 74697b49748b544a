"""Methods on one trainer: DINO and iBOT pretrain, resume exactly and are evaluated like SOVE; checkpoints
name their method (an older SOVE checkpoint converts; another method is refused)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import PEERS, with_method_state
from sove.cli import main
from sove.config import load_config
from sove.errors import ConfigError, SoveError
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain, resume
from sove.run import prepare_run_dir
from sove.train.trainer import Trainer

TINY_OUT = 16  # model.head_out_dim of TINY


@pytest.mark.parametrize("method", PEERS)
def test_peer_resumes_exactly_and_is_evaluated_by_sove_eval_knn(tmp_path, image_folder, capsys, method, tiny_overrides):
    # 32 images, batch 8: 4 steps per epoch. 6 steps straight == 5 steps, then resumed to 6 (across an epoch).
    base = tiny_overrides + [f"data.root={image_folder}", f"data.test_root={image_folder}",
                             f"trainer.out_dir={tmp_path}",
                   f"method={method}", "peers.num_prototypes=32"]
    straight = pretrain(load_config(None, base + ["trainer.name=straight", "trainer.max_steps=6"])).path
    pretrain(load_config(None, base + ["trainer.name=resumed", "trainer.max_steps=5"]))
    resume(tmp_path / "resumed", trainer={"max_steps": 6})
    a = with_method_state(load_checkpoint(straight / "checkpoints" / "last.pt"))
    b = with_method_state(load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == 6
    centers = ["cls_loss.center"] + (["patch_loss.center.center"] if method == "ibot" else [])
    assert sorted(a["method"]) == sorted(centers) and a["method"]["cls_loss.center"].shape == (1, 1, 32)
    assert a["teacher"]["head.last_layer.weight_v"].shape == (32, TINY_OUT)  # K prototypes x bottleneck
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert bool(a["method"]["cls_loss.center"].abs().sum() > 0)  # the center moved off its zero start
    capsys.readouterr()
    assert main(["eval", "knn", "--run", str(straight)]) == 0
    result = json.loads((straight / "eval" / "knn.json").read_text())
    assert 0.0 <= result["best_top1"] <= 100.0 and result["num_test"] == 32


def test_without_lightly_a_peer_is_one_error_line(tmp_path, image_folder, monkeypatch, capsys, tiny_overrides):
    for name in ("lightly", "lightly.loss", "lightly.models", "lightly.models.modules"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    out = tmp_path / "runs"
    assert main(["pretrain", *tiny_overrides, f"data.root={image_folder}", f"trainer.out_dir={out}", "trainer.name=d",
                 "method=dino"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sove: error: method=dino needs lightly (the DINO / iBOT heads and losses): pip install 'sove[peers]'")
    assert not (out / "d").exists()  # refused before the run directory


def test_method_choices_are_the_registry_keys():
    from sove.choices import METHODS as CHOICES
    from sove.method import METHODS

    assert tuple(METHODS) == CHOICES


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match=r"^method: must be one of sove, dino, ibot; got 'byol'$"):
        load_config(None, ["method=byol"])


def test_checkpoint_before_methods_loads_as_sove_and_another_method_is_refused(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=o")
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    state = trainer.state_dict()
    del state["method"]  # the format before methods: feature sets at the top level
    cls_rows = torch.nn.functional.normalize(torch.arange(40 * 16, dtype=torch.float32).view(40, 16).sin(), dim=1)
    state["cls_feature_set"] = {"features": cls_rows, "ptr": torch.tensor(7), "indices": torch.arange(40) - 3}
    state["patch_feature_set"] = {"features": cls_rows[:24].flip(0), "ptr": torch.tensor(2),
                                  "indices": torch.full((24,), 5)}
    trainer.load_state_dict(state, "old.pt")
    m = trainer.method
    assert torch.equal(m.cls_fs.features, cls_rows) and int(m.cls_fs.ptr) == 7
    assert torch.equal(m.cls_fs.indices, torch.arange(40) - 3)
    assert torch.equal(m.patch_fs.features, cls_rows[:24].flip(0)) and int(m.patch_fs.ptr) == 2
    new = trainer.state_dict()
    assert new["method"]["name"] == "sove" and int(new["method"]["state"]["cls_fs.ptr"]) == 7
    new["method"]["name"] = "dino"
    with pytest.raises(SoveError, match=r"^x.pt was trained with method=dino, this run is method=sove; resume it "
                                        r"with method=dino, or start a new run$"):
        trainer.load_state_dict(new, "x.pt")


def test_resume_with_another_method_is_refused_naming_the_key(tmp_path, image_folder, tiny_cfg):
    run = pretrain(tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}",
                            "trainer.name=s", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match=r"--resume would change training from .*last.pt: method \(sove -> dino\)\."):
        resume(run, method="dino")


def test_run_plan_of_a_peer_leaves_out_sove_feature_sets(tiny_overrides):
    from sove.train.preflight import check_run_plan

    over = tiny_overrides + ["data.root=x", "loss.cls_feature_set_size=1000"]  # E_C: more rows than the run enqueues
    with pytest.raises(ConfigError, match="loss.cls_feature_set_size: 1000 rows are never filled"):
        check_run_plan(load_config(None, over), 32, 1)
    assert check_run_plan(load_config(None, over + ["method=dino"]), 32, 1) == []  # DINO has no feature sets
