"""NaN guard: a non-finite loss at step k stops with the term and step named, a debug file,
and last.pt still the step-(k-1) state."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from sove.config import load_config
from sove.method import losses
from sove.train.checkpoint import load_checkpoint
from sove.train.trainer import NonFiniteLossError, pretrain


@pytest.fixture
def nan_patch_loss_at_step_3(monkeypatch):
    original = losses.SOVELoss.forward

    def forward(self, **kw):
        out = original(self, **kw)
        if kw["step"] == 3:  # the 4th optimizer step (steps count from 0)
            out["patch"] = out["patch"] * float("nan")
            out["loss"] = out["cls"] + out["patch"]
        return out

    monkeypatch.setattr(losses.SOVELoss, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_folder, nan_patch_loss_at_step_3):
    cfg = load_config(None, TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=nan",
                                    "trainer.checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg)
    msg = str(err.value)
    assert "patch" in msg and "step 3" in msg and "lr" in msg and "teacher_temp" in msg
    debug = tmp_path / "nan" / "debug" / "nonfinite_step_0000003.json"
    report = json.loads(debug.read_text())
    assert report["culprits"] == ["patch"] and report["step"] == 3 and len(report["batch_index"]) == 8
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["step"] == 3  # 3 good steps done


def test_nonfinite_skip_mode_skips_the_step(tmp_path, image_folder, nan_patch_loss_at_step_3):
    cfg = load_config(None, TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=skip",
                                    "trainer.on_nonfinite=skip", "trainer.max_steps=5"])
    run = pretrain(cfg)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    # The skipped step did not enqueue: 4 good steps x 8 images = 32 rows into E_C (40 rows).
    assert int(state["cls_feature_set"]["ptr"]) == 32
    assert (run / "debug" / "nonfinite_step_0000003.json").is_file()
