"""SIGINT / SIGTERM during pretraining: the step in progress finishes, is saved, and a resume equals the
straight run (sove.train.stop). Before: the signal killed the loop mid-step, and the steps since the last
periodic checkpoint (``trainer.checkpoint_every``, 100 in these tests) were lost."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch

from helpers import with_method_state
from sove.api import pretrain, resume
from sove.cli import main
from sove.train import trainer as trainer_mod
from sove.train.checkpoint import load_checkpoint
from sove.train.stop import StopRequest, TrainingInterrupted


def signal_during_step(monkeypatch, step: int, signum: int, workers_too: bool = False) -> None:
    """Send ``signum`` to this process (and, with ``workers_too``, twice to the DataLoader workers, as a
    terminal's Ctrl-C pressed twice reaches the whole process group: a forked worker that inherited the
    training process's handler instead of ignoring the signal dies of the second) while step ``step`` is
    being computed."""
    original = trainer_mod.Trainer.training_step

    def step_fn(self, batch):
        if self.step == step - 1:
            if workers_too:
                workers = multiprocessing.active_children()
                assert workers, "the DataLoader has no worker processes"
                for w in workers:
                    os.kill(w.pid, signum)
                    os.kill(w.pid, signum)
            os.kill(os.getpid(), signum)
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "training_step", step_fn)


def test_a_signal_saves_the_finished_step_and_the_resume_equals_the_straight_run(
        tmp_path, image_folder, monkeypatch, tiny_cfg):
    base = [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}"]  # 8 steps, checkpoint_every=100
    pretrain(tiny_cfg(*base, "trainer.name=straight"))

    signal_during_step(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        pretrain(tiny_cfg(*base, "trainer.name=stopped"))
    run = tmp_path / "stopped"
    assert (info.value.step, info.value.signum, info.value.exit_code) == (3, signal.SIGINT, 130)
    assert info.value.checkpoint == run / "checkpoints" / "last.pt"
    mid = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (3, 0, 3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back

    monkeypatch.undo()
    resume(run)
    a = with_method_state(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"))
    b = with_method_state(load_checkpoint(run / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after the stop and resume"
    for i, state in a["optimizer"]["state"].items():
        for key in state:
            assert torch.equal(state[key], b["optimizer"]["state"][i][key])


def test_sove_pretrain_stopped_by_ctrl_c_with_loader_workers_names_the_checkpoint_and_the_resume(
        tmp_path, image_folder, monkeypatch, capsys, tiny_overrides):
    # Ctrl-C reaches the workers too; they ignore it, so the step finishes and the checkpoint is written.
    signal_during_step(monkeypatch, 2, signal.SIGINT, workers_too=True)
    argv = ["pretrain", *tiny_overrides, f"data.root={image_folder}", f"trainer.out_dir={tmp_path}",
            "trainer.name=r", "data.num_workers=1", "data.augment_on=loader"]
    assert main(argv) == 130
    run = tmp_path / "r"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    err = capsys.readouterr().err
    assert ("sove: SIGINT received: stopping after the step in progress with a checkpoint (press Ctrl-C again to "
            "stop at once, losing the steps since the last checkpoint)") in err
    assert (f"sove: SIGINT received: stopped after step 2 with a checkpoint ({run / 'checkpoints' / 'last.pt'}); "
            f"continue with: sove pretrain --resume {run}") in err


def test_a_repeated_sigterm_is_ignored_and_a_second_ctrl_c_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # srun torchrun: from SLURM and from torchrun
        assert stop.signum == signal.SIGTERM  # only a request, still
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
    assert TrainingInterrupted(signal.SIGTERM, 5, "c.pt", "run").exit_code == 143


def test_a_stop_request_survives_a_terminal_that_is_gone(monkeypatch):
    # Regression: with the terminal closed (SIGHUP, passed on as SIGTERM by benchmarks/grid.py) the
    # announcement raised OSError (EIO) inside the signal handler and the run died before its checkpoint.
    class GoneTerminal:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr("sys.stderr", GoneTerminal())
    with StopRequest(announce=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the request stands: the step finishes and is saved


def test_the_periodic_knn_due_at_the_stopping_step_is_skipped(capsys):
    """The seconds before SIGKILL are for the checkpoint, not for a k-NN of several minutes."""
    from types import SimpleNamespace

    from sove.eval.periodic import PeriodicKNN

    knn, ran = PeriodicKNN(), []
    knn.run = ran.append
    fabric = SimpleNamespace(is_global_zero=True, print=print)
    trainer = SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(knn_every_epochs=1)), epoch=3, fabric=fabric,
                              stop=SimpleNamespace(signum=signal.SIGTERM))
    knn.on_train_epoch_end(trainer)
    assert ran == [] and capsys.readouterr().out == "epoch 3: periodic k-NN skipped (stopping)\n"
    trainer.stop.signum = None
    knn.on_train_epoch_end(trainer)
    assert ran == [trainer]


def test_an_ignored_sigint_stays_ignored():
    """`sove pretrain ... &` from a script starts with SIGINT ignored: it was ignored before the loop and then
    stopped the run inside it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_script_that_keeps_a_trainer_with_loader_workers_exits(tmp_path, image_folder, tiny_overrides):
    # Regression: the workers ignore SIGTERM, so multiprocessing's exit handler (SIGTERM, then join)
    # waited forever for the persistent workers of a Trainer still alive at exit (hung > 60 s before).
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    overrides = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "data.num_workers=2"]
    code = ("from sove.config import load_config\nfrom sove.run import prepare_run_dir\n"
            "from sove.train.trainer import Trainer\n"
            f"cfg = load_config(None, {overrides!r})\n"
            "trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=True))\n"
            "batch = next(iter(trainer.loader))\nprint('batch', batch['index'].shape[0], flush=True)\n")
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 8" in done.stdout
