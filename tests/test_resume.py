"""Exact resume: 2 epochs straight == interrupted mid-epoch 1 + resumed, bit for bit."""

from __future__ import annotations

import pytest
import torch

from helpers import with_method_state
from sove.config import load_config
from sove.train import trainer as trainer_mod
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain, resume


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


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path, image_folder, record_indices, tiny_overrides):
    # 32 images, batch 8: 4 steps/epoch, 2 epochs = 8 steps. Interrupt after step 6 (epoch 1, batch 2).
    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}"]
    pretrain(load_config(None, base + ["trainer.name=straight"]))
    straight_seen = list(record_indices)
    record_indices.clear()

    pretrain(load_config(None, base + ["trainer.name=resumed", "trainer.max_steps=6"]))
    part1 = list(record_indices)
    mid = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (6, 1, 2)
    record_indices.clear()
    resume(tmp_path / "resumed", trainer={"max_steps": None})
    part2 = list(record_indices)

    assert len(straight_seen) == 8 and part1 + part2 == straight_seen  # same sample order
    assert sorted(sum(straight_seen[:4], [])) == list(range(32))  # an epoch sees every image once

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    a, b = with_method_state(a), with_method_state(b)
    for part in ("student", "teacher", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), f"optimizer state {i}.{key} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_keeps_metrics_history(tmp_path, image_folder, tiny_overrides):
    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=r"]
    pretrain(load_config(None, base + ["trainer.max_steps=3"]))
    resume(tmp_path / "r", trainer={"max_steps": None})
    lines = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[lines[0].split(",").index("step")]) for line in lines[1:]]
    assert steps == list(range(1, 9))


def test_resume_of_a_non_run_is_a_clear_error(tmp_path):
    from sove.errors import SoveError

    with pytest.raises(SoveError, match="not a sove run directory"):
        resume(tmp_path)


def test_init_from_loads_weights_but_starts_fresh(tmp_path, image_folder, capsys, tiny_overrides):
    from sove import __version__

    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}"]
    first = pretrain(load_config(None, base + ["trainer.name=a", "trainer.max_steps=2"])).path
    src = first / "checkpoints" / "last.pt"
    capsys.readouterr()
    second = pretrain(load_config(None, base + ["trainer.name=b", "trainer.max_steps=1", f"trainer.init_from={src}",
                                              "optim.base_lr=0", "optim.momentum_teacher=1.0"])).path
    # The start-up line gives the configured peak lr and schedule length (it used to print the
    # largest scheduled lr, here min_lr 1e-6, and "1 steps").
    assert capsys.readouterr().out.splitlines()[0] == (
        f"sove {__version__}: method sove, 32 images, global batch 8, 4 steps/epoch, 1 of the schedule's 8 steps "
        "(trainer.max_steps), peak lr 0.00e+00 (= 0.0 x 8/256), precision 32-true, device cpu")
    a, b = load_checkpoint(src), load_checkpoint(second / "checkpoints" / "last.pt")
    assert b["step"] == 1  # a new run, not a resume
    # lr 0 and momentum 1: the initialised weights pass through one step unchanged.
    assert torch.equal(a["teacher"]["head.mlp.0.weight"], b["teacher"]["head.mlp.0.weight"])


def test_fit_with_deadlines_equals_one_straight_fit(tmp_path, image_folder, record_indices, tiny_overrides):
    """``Trainer.fit(deadline)`` stops after the step that passes the deadline; calling it again
    continues exactly (the method-comparison benchmark alternates methods this way)."""
    from sove.run import prepare_run_dir

    # The loader path here; the test above runs the default (data.augment_on=auto: device on CPU).
    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "data.augment_on=loader"]
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
    a, b = with_method_state(a), with_method_state(b)
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs with deadlines"


def test_metrics_csv_survives_a_kill_and_a_resume_with_fewer_columns(tmp_path, image_folder, monkeypatch, tiny_cfg):
    """Rows are on disk when a run is killed (they used to be buffered until the end), and a resume
    whose steps log fewer columns (no periodic k-NN) keeps every earlier row (it used to raise
    ValueError and leave only the header)."""
    import csv

    original = trainer_mod.Trainer.training_step

    def killed_at_step_6(self, batch):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "training_step", killed_at_step_6)
    run = tmp_path / "r"
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   f"trainer.out_dir={tmp_path}", "trainer.name=r", "trainer.checkpoint_every=2",
                   "eval.knn_every_epochs=1")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)

    def rows():
        return [(int(r["step"]),
                 "knn" if r["knn_top1"] else "train") for r in csv.DictReader(open(run / "metrics.csv"))]

    assert rows() == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "knn"), (5, "train")]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    monkeypatch.setattr(trainer_mod.Trainer, "training_step", original)
    resume(run, trainer={"max_steps": 6}, eval={"knn_every_epochs": 0})
    # Rows up to the checkpoint's step 4 kept; step 5 re-logged once by the resumed run.
    assert rows() == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "knn"), (5, "train"), (6, "train")]


def test_metrics_csv_merges_columns(tmp_path):
    from sove.train.metrics_csv import MetricsCSV

    path = tmp_path / "metrics.csv"
    first = MetricsCSV(path)
    first.log_metrics({"a": 1.0}, step=1)
    assert path.read_text().splitlines() == ["a,step", "1.0,1"]  # on disk at once
    first.log_metrics({"a": 2.0, "b": torch.tensor(3.0)}, step=2)
    assert path.read_text().splitlines() == ["a,b,step", "1.0,,1", "2.0,3.0,2"]
    again = MetricsCSV(path)  # a resume from step 1: step 2 will be logged again
    again.resume_at(1)
    assert path.read_text().splitlines() == ["a,b,step", "1.0,,1"]
    again.log_metrics({"c": 5.0}, step=2)
    assert path.read_text().splitlines() == ["a,b,c,step", "1.0,,,1", ",,5.0,2"]


def test_a_failed_resume_restores_the_deterministic_kernel_settings(tmp_path, image_folder, tiny_overrides,
                                                                     monkeypatch):
    # Regression: a resume that failed while loading the checkpoint left deterministic algorithms on
    # for the rest of the process (Trainer.close() only ran around fit).
    from sove.errors import SoveError

    base = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.loggers=[csv]",
                             "trainer.deterministic=true", "trainer.max_steps=2"]
    pretrain(load_config(None, base + ["trainer.name=r"]))
    assert not torch.are_deterministic_algorithms_enabled()

    def broken(self, state, source):
        assert torch.are_deterministic_algorithms_enabled()  # set by the trainer being resumed
        raise SoveError(f"{source}: state dict mismatch")

    monkeypatch.setattr(trainer_mod.Trainer, "load_state_dict", broken)
    with pytest.raises(SoveError, match="state dict mismatch"):
        resume(tmp_path / "r", trainer={"max_steps": 4})
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_trainer_fitted_again_after_close_keeps_deterministic_kernels(tmp_path, image_folder, tiny_overrides,
                                                                       monkeypatch):
    # Regressions: close() restored the process-wide settings and a later fit() of the same Trainer trained
    # without deterministic kernels although trainer.deterministic=true; with two such trainers, closing
    # the first switched them off for the second, and closing the second left them on for the process;
    # a fit() after close() started loader workers that were no longer stopped at interpreter exit.
    from sove.run import prepare_run_dir

    def make(name):
        cfg = load_config(None, tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}",
                                                  "trainer.loggers=[csv]", "trainer.deterministic=true",
                                                  "trainer.max_steps=2", f"trainer.name={name}"])
        trainer = trainer_mod.Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
        kernels = trainer.kernels
        trainer.kernels = lambda: seen[name].append(torch.are_deterministic_algorithms_enabled()) or kernels()
        return trainer

    seen = {"a": [], "b": []}
    registered = []
    monkeypatch.setattr(trainer_mod.atexit, "register", lambda f: registered.append(f) or f)
    a, b = make("a"), make("b")
    try:
        assert a.fit(deadline=0.0) is None and a.step == 1  # stops after the first step
        a.close()
        assert torch.are_deterministic_algorithms_enabled()  # b still holds them
        assert b.fit() is not None and b.step == 2
        b.close()
        assert not torch.are_deterministic_algorithms_enabled()
        registered.clear()
        a.fit()
        assert a.step == 2 and registered == [a.exit_hook]  # its new workers: stopped at exit again
        assert seen["a"] == [True, True] and seen["b"] == [True, True]
    finally:
        a.close()
        b.close()
    assert not torch.are_deterministic_algorithms_enabled()
