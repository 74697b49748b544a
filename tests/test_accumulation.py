"""Gradient accumulation: 2 micro-batches of 4 give the gradient of one batch of 8; feature sets written once."""

from __future__ import annotations

import pytest
import torch

from helpers import PEERS
from sove.config import load_config
from sove.run import prepare_run_dir
from sove.train.trainer import Trainer


def one_step(tiny_cfg, tmp_path, image_folder, name, extra):
    cfg = tiny_cfg(*[f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", f"trainer.name={name}",
                   "model.drop_path_rate=0"] + extra)
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    trainer.dataset.set_epoch(0)
    batch = next(iter(trainer.loader))
    terms = trainer.training_step(batch)
    grads = {n: p.grad.clone() for n, p in trainer.student_module.named_parameters() if p.grad is not None}
    return trainer, terms, grads


def test_two_half_batches_equal_one_full_batch(tmp_path, image_folder, tiny_cfg):
    full, terms_full, g_full = one_step(tiny_cfg, tmp_path, image_folder, "full", [])
    acc, terms_acc, g_acc = one_step(tiny_cfg, tmp_path, image_folder, "acc", ["optim.accumulate_grad_batches=2"])
    assert g_full.keys() == g_acc.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(terms_acc["loss"], terms_full["loss"], atol=1e-5, rtol=0)
    # E_C / E_P were written once, with the 8 images of the step in batch order.
    for fs_full, fs_acc in ((full.method.cls_fs, acc.method.cls_fs), (full.method.patch_fs, acc.method.patch_fs)):
        assert int(fs_acc.ptr) == int(fs_full.ptr) == 8
        assert torch.equal(fs_acc.indices, fs_full.indices)
        torch.testing.assert_close(fs_acc.features, fs_full.features, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", PEERS)
def test_peers_two_half_batches_equal_one_full_batch_and_center_once(tmp_path, image_folder, method, tiny_cfg):
    # lightly updates a center inside each loss forward: held over the micro-batches and updated once
    # after the step from all of them, the second half sees the step's center and the update equals
    # one full batch's (updated per micro-batch, the gradient and the center would differ).
    extra = [f"method={method}", "peers.num_prototypes=32"]
    full, terms_full, g_full = one_step(tiny_cfg, tmp_path, image_folder, "full", extra)
    acc, terms_acc, g_acc = one_step(tiny_cfg, tmp_path, image_folder, "acc",
                                     extra + ["optim.accumulate_grad_batches=2"])
    assert g_full.keys() == g_acc.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], atol=1e-5, rtol=0, msg=name)
    for name in terms_full:
        torch.testing.assert_close(terms_acc[name], terms_full[name], atol=1e-5, rtol=0, msg=name)
    state_full, state_acc = full.method.state_dict(), acc.method.state_dict()
    for name in state_full:
        assert state_full[name].abs().sum() > 0, name  # moved off zero: one update happened
        torch.testing.assert_close(state_acc[name], state_full[name], atol=1e-6, rtol=0, msg=name)


def test_accumulation_must_divide_the_batch():
    import pytest

    from sove.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.accumulate_grad_batches"):
        load_config(None, ["optim.batch_size=8", "optim.accumulate_grad_batches=3"])


def test_patch_rows_come_from_the_step_teacher(tmp_path, image_folder, tiny_cfg):
    # E_P rows are the view-2 tokens at the step's positions projected by the teacher head of the
    # step's own forward (head_t(backbone_t(x))), as E_C rows are; not by the head after the EMA.
    # Momentum 0 and a large lr without warm-up make head_t and head_{t+1} clearly different.
    import copy

    from sove.seeding import generator

    cfg = tiny_cfg(f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", "trainer.name=ep",
                   "optim.accumulate_grad_batches=2", "optim.warmup_epochs=0",
                   "optim.base_lr=0.5", "optim.momentum_teacher=0.0")
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    trainer.dataset.set_epoch(0)
    batch = next(iter(trainer.loader))
    before = copy.deepcopy(trainer.teacher)
    trainer.training_step(batch)
    b = batch["index"].shape[0]
    g = generator(cfg.trainer.seed, "patch_positions", 0)
    positions = torch.randint(batch["masks"].shape[-1], (b,), generator=g)
    with torch.no_grad():
        out = before(torch.cat(batch["crops"][:2]))
        tokens = out["patch_tokens"][b:][torch.arange(b), positions]  # (B, D), the step's teacher
        expected = before.head(tokens)
        post_ema = trainer.teacher.head(tokens)  # the head after the update (the old rows)
    rows = trainer.method.patch_fs.features[:b]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(b), atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer.method.cls_fs.features[:b], out["cls"][b:], atol=1e-5, rtol=0)
    assert (post_ema - expected).abs().max() > 1e-2  # head_{t+1} differs: the test can tell them apart
