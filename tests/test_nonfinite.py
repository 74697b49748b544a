"""NaN guard: a non-finite loss at step k stops with the term and step named, a debug file,
and last.pt still the step-(k-1) state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sove.method import losses
from sove.method.sove import feature_set_state
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain
from sove.train.diagnostics import NonFiniteLossError


def nan_patch_loss_at(monkeypatch, step: int) -> None:
    original = losses.SOVELoss.forward

    def forward(self, **kw):
        out = original(self, **kw)
        if kw["step"] == step:  # steps count from 0
            out["patch"] = out["patch"] * float("nan")
            out["loss"] = out["cls"] + out["patch"]
        return out

    monkeypatch.setattr(losses.SOVELoss, "forward", forward)


@pytest.fixture
def nan_patch_loss_at_step_3(monkeypatch):
    nan_patch_loss_at(monkeypatch, 3)  # the 4th optimizer step


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_folder, nan_patch_loss_at_step_3,
                                                             tiny_cfg):
    """The message gives the patch loss's own temperatures (they used to be the shared config values)."""
    run = tmp_path / "nan"
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=nan",
                   "trainer.checkpoint_every=1", "loss.patch.student_temp=0.2",
                   "loss.patch.teacher_temp=0.07")
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg)
    debug, last = run / "debug" / "nonfinite_step_0000003.json", run / "checkpoints" / "last.pt"
    # 8-step schedule, 2-step warm-up: step 3 is step 1 of the 6-step cosine from 5e-4 x 8/256 to 1e-6.
    lr = 1e-6 + 0.5 * (5e-4 * 8 / 256 - 1e-6) * (1 + math.cos(math.pi * 1 / 5))
    assert str(err.value) == (
        f"non-finite patch at step 3 (epoch 0; lr {lr:.3e}; patch: student_temp 0.2, teacher_temp 0.07); "
        f"debug file {debug}; last good checkpoint {last} (step 3) is intact: start a new run with a lower "
        f"optim.base_lr or higher temperatures from it (trainer.init_from={last}), or --resume {run} "
        "trainer.on_nonfinite=skip to skip such steps")
    report = json.loads(debug.read_text())
    assert report["culprits"] == ["patch"] and report["step"] == 3 and len(report["batch_index"]) == 8
    assert report["temperatures"] == {"patch": {"student_temp": 0.2, "teacher_temp": 0.07}}
    assert load_checkpoint(last)["step"] == 3  # 3 good steps done


def test_nonfinite_before_any_checkpoint_claims_none(tmp_path, image_folder, monkeypatch, tiny_cfg):
    """Regression: the message used to call a last.pt that was never written "intact"."""
    nan_patch_loss_at(monkeypatch, 1)
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=early")
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg)
    assert str(err.value).endswith("; no checkpoint was saved before it (trainer.checkpoint_every=100): start a new "
                                   "run with a lower optim.base_lr or higher temperatures")
    assert "patch: student_temp 0.1, teacher_temp 0.04)" in str(err.value)
    assert not (tmp_path / "early" / "checkpoints" / "last.pt").exists()


def test_nonfinite_skip_mode_skips_the_step(tmp_path, image_folder, nan_patch_loss_at_step_3, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=skip",
                   "trainer.on_nonfinite=skip", "trainer.max_steps=5")
    run = pretrain(cfg).path
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    # The skipped step did not enqueue: 4 good steps x 8 images = 32 rows into E_C (40 rows).
    assert int(feature_set_state(state, "cls")["ptr"]) == 32
    assert (run / "debug" / "nonfinite_step_0000003.json").is_file()
