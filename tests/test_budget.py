"""Time-budgeted pretraining (trainer.time_budget): plan from the measured pace, re-size, exact resume."""

from __future__ import annotations

import pytest
import torch

from helpers import with_method_state
from sove.config import load_config
from sove.errors import ConfigError
from sove.train import budget as budget_mod
from sove.train import trainer as trainer_mod
from sove.train.checkpoint import load_checkpoint
from sove.train.preflight import check_budget_plan, check_run_plan
from sove.api import pretrain, resume


def test_parse_duration_units_and_error_line():
    assert [budget_mod.parse_duration(v) for v in ("30min", "2h", "90s", "90sec", "1800", "1.5h", 45)] == [
        1800.0, 7200.0, 90.0, 90.0, 1800.0, 5400.0, 45.0]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.time_budget=30 minutes"])
    assert str(e.value) == ("trainer.time_budget: '30 minutes' is not a duration > 0; write e.g. 30min, 2h, 90s or a "
                            "number of seconds")


def test_an_explicit_epochs_override_wins_over_a_preset_budget_and_an_explicit_budget_over_epochs(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("trainer:\n  time_budget: 20min\n")
    assert load_config(str(preset)).trainer.time_budget == "20min"
    assert load_config(str(preset), ["optim.epochs=30"]).trainer.time_budget is None
    assert load_config(str(preset), ["trainer.max_steps=3"]).trainer.time_budget == "20min"  # a stop, not a length
    both = load_config(str(preset), ["optim.epochs=30", "trainer.time_budget=10min"])  # epochs: warm-up fractions
    assert (both.trainer.time_budget, both.optim.epochs) == ("10min", 30)


def test_run_plan_of_a_budgeted_run_defers_the_schedule_checks_to_the_plan(capsys, tiny_overrides):
    over = tiny_overrides + ["data.root=x", "loss.cls_feature_set_size=1000"]
    with pytest.raises(ConfigError, match="loss.cls_feature_set_size: 1000 rows are never filled"):
        check_run_plan(load_config(None, over), 32, 1)  # fixed schedule: 8 steps x 8 images
    cfg = load_config(None, over + ["trainer.time_budget=60"])
    # the length is not known before the first steps: only the size warning that needs no schedule
    assert check_run_plan(cfg, 32, 1) == [
        "loss.cls_feature_set_size (1000) is larger than the dataset (32 images): E_C holds several views of each "
        "image, embedded by older teachers, as concept candidates"]
    assert check_budget_plan(cfg, 10, 8) == [
        "trainer.time_budget fits 10 steps x 8 = 80 teacher embeddings: 920 of the 1000 rows of "
        "loss.cls_feature_set_size stay random initial rows; raise the budget or lower loss.cls_feature_set_size"]


def _fake_clock(self) -> float:
    """2 s per step up to step 5, then 3 s per step (the pace drifts)."""
    return 2.0 * self.step + max(0, self.step - 5)


def test_budgeted_run_plans_resizes_and_resumes_bit_identically(tmp_path, image_folder, monkeypatch, tiny_overrides):
    # 32 images, batch 8: 4 steps/epoch. Budget 30 s, planned to 0.98 x 30 = 29.4 s. Calibration: steps 2-3.
    monkeypatch.setattr(budget_mod, "CALIBRATION_STEPS", 2)
    monkeypatch.setattr(trainer_mod.Trainer, "clock", _fake_clock)
    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.time_budget=30"]
    pretrain(load_config(None, base + ["trainer.name=straight"]))
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    # step 3: 6 s used, 2 s/step -> 3 + int(23.4 / 2) = 14; step ceil(0.3 x 14) = 5: 14 kept;
    # step ceil(0.45 x 14) = 7: 3 s/step since step 5, 16 s used -> 7 + int(13.4 / 3) = 11; then frozen (0.6 x 11 <= 7).
    assert [(d["step"], d["total"], d["kind"]) for d in a["time_budget"]["decisions"]] == [
        (0, 8, "provisional"), (1, 8, "start"), (3, 14, "plan"), (5, 14, "kept"), (7, 11, "resize")]
    assert a["step"] == 11 and a["time_budget"]["elapsed_s"] == 2.0 * 11 + 6

    pretrain(load_config(None, base + ["trainer.name=resumed", "trainer.max_steps=6"]))
    with pytest.raises(ConfigError, match=r"trainer.time_budget \(30 -> 40\)"):
        resume(tmp_path / "resumed", trainer={"max_steps": None, "time_budget": "40"})
    resume(tmp_path / "resumed", trainer={"max_steps": None})
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert b["step"] == 11 and b["time_budget"] == a["time_budget"]
    a, b = with_method_state(a), with_method_state(b)
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"


def test_the_plan_anneals_every_schedule_at_its_new_length(tiny_cfg):
    cfg = tiny_cfg("data.root=x", "trainer.time_budget=60", "optim.min_lr=1e-5")
    plan = budget_mod.TimeBudget(cfg, iters_per_epoch=4, global_batch=8)
    plan.decisions.append({"step": 3, "elapsed_s": 6.0, "s_per_step": 2.0, "total": 20, "kind": "plan"})
    s = plan.schedules()
    assert s.total_iters == 20 and s.lr[0] == 0.0 and s.lr[5] == pytest.approx(cfg.optim.base_lr * 8 / 256)
    assert s.lr[-1] == pytest.approx(1e-5) and s.momentum[-1] == 1.0 and s.weight_decay[-1] == pytest.approx(0.4)
