"""Exact resume: 2 epochs straight == interrupted mid-epoch 1 + resumed, bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from sove.config import load_config
from sove.train import trainer as trainer_mod
from sove.train.checkpoint import load_checkpoint
from sove.train.trainer import pretrain, resume


@pytest.fixture
def record_indices(monkeypatch):
    """Record the dataset indices of every training batch, in order."""
    seen: list[list[int]] = []
    original = trainer_mod.Trainer.training_step

    def step(self, batch):
        seen.append(batch["index"].tolist())
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "training_step", step)
    return seen


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path, image_folder, record_indices):
    # 32 images, batch 8: 4 steps/epoch, 2 epochs = 8 steps. Interrupt after step 6 (epoch 1, batch 2).
    base = TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}"]
    pretrain(load_config(None, base + ["trainer.name=straight"]))
    straight_seen = list(record_indices)
    record_indices.clear()

    pretrain(load_config(None, base + ["trainer.name=resumed", "trainer.max_steps=6"]))
    part1 = list(record_indices)
    mid = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (6, 1, 2)
    record_indices.clear()
    resume(tmp_path / "resumed", ["trainer.max_steps=null"])
    part2 = list(record_indices)

    assert len(straight_seen) == 8 and part1 + part2 == straight_seen  # same sample order
    assert sorted(sum(straight_seen[:4], [])) == list(range(32))  # an epoch sees every image once

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher", "cls_feature_set", "patch_feature_set"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), f"optimizer state {i}.{key} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_keeps_metrics_history(tmp_path, image_folder):
    base = TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=r"]
    pretrain(load_config(None, base + ["trainer.max_steps=3"]))
    resume(tmp_path / "r", ["trainer.max_steps=null"])
    lines = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[lines[0].split(",").index("step")]) for line in lines[1:]]
    assert steps == list(range(1, 9))


def test_resume_of_a_non_run_is_a_clear_error(tmp_path):
    from sove.errors import SoveError

    with pytest.raises(SoveError, match="not a sove run directory"):
        resume(tmp_path)


def test_init_from_loads_weights_but_starts_fresh(tmp_path, image_folder):
    base = TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}"]
    first = pretrain(load_config(None, base + ["trainer.name=a", "trainer.max_steps=2"]))
    src = first / "checkpoints" / "last.pt"
    second = pretrain(load_config(None, base + ["trainer.name=b", "trainer.max_steps=1", f"trainer.init_from={src}",
                                              "optim.base_lr=0", "optim.momentum_teacher=1.0"]))
    a, b = load_checkpoint(src), load_checkpoint(second / "checkpoints" / "last.pt")
    assert b["step"] == 1  # a new run, not a resume
    # lr 0 and momentum 1: the initialised weights pass through one step unchanged.
    assert torch.equal(a["teacher"]["head.mlp.0.weight"], b["teacher"]["head.mlp.0.weight"])


def test_fit_with_deadlines_equals_one_straight_fit(tmp_path, image_folder, record_indices):
    """``Trainer.fit(deadline)`` stops after the step that passes the deadline; calling it again
    continues exactly (the method-comparison benchmark alternates methods this way)."""
    from sove.train.builders import prepare_run_dir

    # The loader path here; the test above runs the default (data.augment_on=auto: device on CPU).
    base = TINY + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "data.augment_on=loader"]
    pretrain(load_config(None, base + ["trainer.name=straight"]))
    straight_seen = list(record_indices)
    record_indices.clear()

    cfg = load_config(None, base + ["trainer.name=sliced"])
    trainer = trainer_mod.Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    calls = 0
    while trainer.fit(deadline=0.0) is None:  # a deadline in the past: one step per call
        calls += 1
        assert trainer.step == calls
    assert calls == 7 and trainer.step == 8  # the eighth call finishes the schedule and saves
    assert record_indices == straight_seen
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "sliced" / "checkpoints" / "last.pt")
    for part in ("student", "teacher", "cls_feature_set", "patch_feature_set"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs with deadlines"
