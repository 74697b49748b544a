"""A real 2-process DDP pretrain (gloo, CPU) equals a 1-process run with the same global batch, for every method."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from helpers import PEERS
from sove.config import load_config
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain


def losses(run_dir):
    return [float(r["loss/loss"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("loss/loss")]


@pytest.mark.parametrize("method", ["sove", *PEERS])
def test_two_process_ddp_equals_single_process(tmp_path, image_folder, method, tiny_overrides):
    # Drop path is the only per-process randomness left (augmentation, masks, anchors and the
    # enqueued patch positions are all seeded by sample/step), so switch it off to compare.
    # DINO / iBOT: the centers are updated from the teacher logits of all ranks (sums all-reduced).
    common = tiny_overrides + [f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "model.drop_path_rate=0",
                     "trainer.max_steps=3", f"method={method}", "peers.num_prototypes=32"]
    single = pretrain(load_config(None, common + ["trainer.name=single", "optim.batch_size=8"])).path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sove", "pretrain", "--config", str(single / "config.yaml"),
           "trainer.name=ddp", "optim.batch_size=4",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.num_threads=1",
           "trainer.check_sync=true"]  # every step: all ranks hold identical E_C, E_P, pointers, anchors / centers
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8" in proc.stdout

    a = load_checkpoint(single / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 3
    ma, mb = a["method"]["state"], b["method"]["state"]
    assert a["method"]["name"] == b["method"]["name"] == method and ma.keys() == mb.keys() and len(ma) > 0
    for key in ma:  # E_C / E_P rows, pointers and indices (SOVE); centers (DINO, iBOT)
        if ma[key].is_floating_point():
            torch.testing.assert_close(ma[key], mb[key], atol=1e-5, rtol=0, msg=key)
        else:
            assert torch.equal(ma[key], mb[key]), key
    for part in ("student", "teacher"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=1e-5, rtol=0, msg=f"{part}.{key}")
    la, lb = losses(single), losses(tmp_path / "ddp")
    assert len(la) == len(lb) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-5, rtol=0)
