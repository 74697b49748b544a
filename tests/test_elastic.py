"""Elastic restarts: a torchrun worker that dies is restarted and the run continues from its last
checkpoint by itself, ending bit for bit where an uninterrupted run ends; ``trainer.auto_resume=true``
continues a stopped run under the same checks as ``--resume``."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import make_image_folder
from sove.cli import main
from sove.config import load_config
from sove.run import auto_resume_checkpoint
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain

#: Runs ``sove pretrain ARGS trainer.name=killed``, then the same with ``trainer.name=whole``, in one torchrun
#: launch (one process start fewer than two launches: this test stays under a minute on 2 cores). When ``killed``
#: starts step index SOVE_TEST_KILL_AT in the first worker group only (torchrun's restart count 0), rank 1 dies
#: (SOVE_TEST_FAIL=exit: exit status 1, no cleanup) or receives SIGTERM (=sigterm: both ranks finish the step,
#: save it and exit 143, sove.train.stop); the restarted group continues ``killed``, then trains ``whole`` from 0.
ENTRY = """
import os, signal, sys
from sove.cli import main
from sove.train.trainer import Trainer

KILL_AT, step = int(os.environ["SOVE_TEST_KILL_AT"]), Trainer.training_step

def dying_step(self, batch):
    if (self.step == KILL_AT and self.run_dir.name == "killed" and self.fabric.global_rank == 1
            and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
        if os.environ["SOVE_TEST_FAIL"] == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGTERM)  # this rank only
    return step(self, batch)

Trainer.training_step = dying_step
for name in ("killed", "whole"):
    status = main(sys.argv[1:] + [f"trainer.name={name}"])
    if status:
        sys.exit(status)
"""


def torchrun(entry: Path, kill_at: int, args: list[str], log: Path, timeout: float = 90, fail: str = "exit"
             ) -> tuple[int, str, str]:
    """``torchrun --standalone --nproc-per-node 2 --max-restarts 1 ENTRY pretrain ARGS``: (exit status, stdout,
    stderr). Past ``timeout`` seconds torchrun gets SIGTERM (it stops its workers, which run in sessions of their
    own), then SIGKILL, and the test fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "1", str(entry), "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOVE_TEST_KILL_AT": str(kill_at), "SOVE_TEST_FAIL": fail,
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # a fresh store per restart (docs/distributed.md)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"torchrun did not finish within {timeout} s: {log.with_suffix('.err').read_text()[-3000:]}")
    return proc.returncode, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def losses(run_dir: Path) -> list[str]:
    return [r["loss/loss"] for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("loss/loss")]


def assert_same_tree(a, b, where: str = "") -> None:
    """Equal nested dicts / lists, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("fail", ["exit", "sigterm"])
def test_torchrun_restart_after_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path, tiny_overrides, fail):
    images = make_image_folder(tmp_path / "images")
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    args = tiny_overrides + [f"data.root={images}", f"trainer.out_dir={tmp_path}", "optim.batch_size=4", "model.drop_path_rate=0",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.num_threads=1",
                   "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.loggers=[csv]"]
    # At the start of step index 3 (3 steps done, checkpoint at step 2) rank 1 dies: the restart resumes at
    # step 2. Or at the start of step index 2 rank 1 alone gets SIGTERM: both ranks finish step 3 and save it
    # (no periodic checkpoint there), the restart resumes at 3.
    kill_at = 3 if fail == "exit" else 2
    status, out, err = torchrun(entry, kill_at, args, tmp_path / "torchrun", fail=fail)
    assert status == 0, err[-3000:]
    ck = tmp_path / "killed" / "checkpoints" / "last.pt"
    at = kill_at - 1 if fail == "exit" else kill_at + 1
    where = f"epoch 0, batch {at}"
    assert f"restart 1 (torchrun): resuming {ck} at step {at}\n" in out
    assert f"resumed {ck} at step {at} ({where})" in out
    assert out.count("resuming") == 1  # ``whole`` started from step 0
    if fail == "exit":
        assert "exitcode: 1" in err  # the dead worker, reported by torchrun
    else:  # rank 0 got no signal and stopped with rank 1 after the same step
        assert err.count(f"SIGTERM received: stopped after step 3 with a checkpoint ({ck})") == 2

    a, b = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt"), load_checkpoint(ck)
    assert a["step"] == b["step"] == 6 and a["world_size"] == b["world_size"] == 2
    config_a, config_b = OmegaConf.create(a.pop("config")), OmegaConf.create(b.pop("config"))
    assert config_a.trainer.pop("name") == "whole" and config_b.trainer.pop("name") == "killed"
    assert config_a == config_b
    assert_same_tree(a, b)  # student, teacher, optimizer, method state (E_C, E_P, pointers), RNG, data position
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6


def test_auto_resume_continues_a_stopped_run_under_the_resume_checks(tmp_path, capsys, monkeypatch, tiny_overrides):
    images = make_image_folder(tmp_path / "images")
    base = tiny_overrides + [f"data.root={images}", f"trainer.out_dir={tmp_path}", "trainer.name=r"]
    run = pretrain(load_config(None, base + ["trainer.max_steps=2"])).path
    ck = run / "checkpoints" / "last.pt"
    capsys.readouterr()

    own = ["pretrain", "--config", str(run / "config.yaml")]
    assert main(own + ["trainer.auto_resume=true", "optim.base_lr=0.01"]) == 2
    assert capsys.readouterr().err == (
        f"sove: error: trainer.auto_resume would change training from {ck}: optim.base_lr (0.0005 -> 0.01). A resume "
        "may change only trajectory-neutral keys (trainer.max_steps, logging, checkpoint cadence, threads, eval.*; "
        f"see docs/cli.md); for other settings start a new run (trainer.init_from={ck} keeps the weights)\n")
    assert main(own + ["--overwrite", "trainer.auto_resume=true"]) == 2
    assert capsys.readouterr().err == ("sove: error: trainer.auto_resume=true continues the run directory and "
                                       "--overwrite replaces it; pass one of them\n")
    assert load_checkpoint(ck)["step"] == 2  # both refusals left the run as it was

    pretrain(load_config(None, base + ["trainer.max_steps=3", "trainer.auto_resume=true"]))
    assert f"trainer.auto_resume: resuming {ck} at step 2\n" in capsys.readouterr().out
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # a torchrun restart resumes without the key
    pretrain(load_config(None, base + ["trainer.max_steps=4"]), overwrite=True)
    assert f"restart 2 (torchrun): resuming {ck} at step 3\n" in capsys.readouterr().out
    assert load_checkpoint(ck)["step"] == 4 and len(losses(run)) == 4


def test_auto_resume_starts_a_run_that_holds_no_checkpoint(tmp_path, monkeypatch, capsys, tiny_overrides):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    cfg = load_config(None, tiny_overrides + [f"data.root={tmp_path}", f"trainer.out_dir={tmp_path}", "trainer.name=r",
                                    "trainer.auto_resume=true"])
    assert auto_resume_checkpoint(cfg) is None  # no run directory yet
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, tmp_path / "r" / "config.yaml")
    assert auto_resume_checkpoint(cfg) is None  # a failed start (no checkpoint): started again
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")  # torchrun's shared store: warned (pytorch/pytorch#135712)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    auto_resume_checkpoint(cfg)
    assert capsys.readouterr().err.startswith("sove: warning: torchrun shares its rendezvous store with the workers")
