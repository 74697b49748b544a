"""A resume may not change training; init_from weights must fit the model (or be resampled to it).

Refusals are one ``sove: error:`` line naming each key, exit status 2, and leave the run
directory byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from helpers import make_image_folder, with_method_state
from sove.cli import main
from sove.train.checkpoint import atomic_save, load_checkpoint
from sove.train.init_from import init_networks
from sove.api import pretrain

TAIL = ("A resume may change only trajectory-neutral keys (trainer.max_steps, logging, checkpoint cadence, threads, "
        "eval.*; see docs/cli.md); for other settings start a new run (trainer.init_from={ck} keeps the weights)")


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tiny_cfg) -> Path:
    """A 3-step TINY run (checkpoint at step 3 of an 8-step schedule)."""
    root = tmp_path_factory.mktemp("guard")
    images = make_image_folder(root / "images")
    cfg = tiny_cfg(f"data.root={images}", f"trainer.out_dir={root}", "trainer.name=r",
                   "trainer.max_steps=3")
    return pretrain(cfg).path


@pytest.fixture
def run(run3, tmp_path) -> Path:
    """A private copy of :func:`run3` (a test may write to it)."""
    return Path(shutil.copytree(run3, tmp_path / "r"))


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def refused(capsys, run_dir: Path, *overrides: str) -> str:
    """Resume ``run_dir`` with ``overrides`` through the CLI; assert rc 2, one line, run dir untouched."""
    before = snapshot(run_dir)
    status = main(["pretrain", "--resume", str(run_dir), *overrides])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(run_dir) == before
    return err


def test_batch_size_change_is_refused_with_the_exact_line(run, capsys):
    ck = run / "checkpoints" / "last.pt"
    err = refused(capsys, run, "optim.batch_size=4", "trainer.max_steps=5")
    assert err == (f"sove: error: --resume would change training from {ck}: optim.batch_size (8 -> 4). "
                   + TAIL.format(ck=ck))


@pytest.mark.parametrize("overrides, named", [
    (["trainer.seed=1"], "trainer.seed (0 -> 1)"),
    (["model.embed_dim=64"], "model.embed_dim (32 -> 64)"),  # was a RuntimeError traceback
    (["loss.cls_feature_set_size=48"], "loss.cls_feature_set_size (40 -> 48)"),  # was a RuntimeError traceback
    (["data.global_crop_size=8", "data.local_crop_size=4"],
     "data.global_crop_size (16 -> 8), data.local_crop_size (8 -> 4)"),
    (["optim.accumulate_grad_batches=2"], "optim.accumulate_grad_batches (1 -> 2)"),
    (["trainer.precision=bf16-mixed"], "trainer.precision (32-true -> bf16-mixed)"),
    (["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
     "world size (trainer.devices x trainer.num_nodes: 1 -> 2 processes)"),  # refused before any launch
])
def test_trajectory_changes_are_refused_naming_each_key(run, capsys, overrides, named):
    err = refused(capsys, run, *overrides)
    assert err.startswith(f"sove: error: --resume would change training from {run / 'checkpoints' / 'last.pt'}: "
                          f"{named}. A resume")


def test_an_edited_config_yaml_is_caught_against_the_checkpoint(run, capsys):
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("base_lr: 0.0005", "base_lr: 0.001"))
    assert "optim.base_lr (0.0005 -> 0.001)." in refused(capsys, run)


def test_a_checkpoint_without_world_size_compares_the_device_keys(run, capsys):
    """Checkpoints written before ``world_size`` was stored: device keys are compared as keys."""
    ck = run / "checkpoints" / "last.pt"
    state = load_checkpoint(ck)
    del state["world_size"], state["precision"]
    atomic_save(state, ck)
    err = refused(capsys, run, "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp")
    assert ("trainer.accelerator (auto -> cpu), trainer.devices (1 -> 2), trainer.strategy (auto -> ddp). "
            in err)


def test_config_flag_with_resume_is_refused(run, capsys):
    err = refused(capsys, run, "--config", "imagenet_vit_small")
    assert err.startswith(f"sove: error: --config is not used with --resume: {run} continues with its own config.yaml")


def test_checkpoint_stores_world_size_and_precision(run3):
    state = load_checkpoint(run3 / "checkpoints" / "last.pt")
    assert (state["world_size"], state["precision"]) == (1, "32-true")


def test_neutral_overrides_resume_exactly(run3, tmp_path):
    """Logging, progress, checkpoint cadence and evaluation keys may change: the steps are bit for bit those
    of a plain resume. Step 5 follows the periodic k-NN after epoch 0 (step 4), which used to draw from the
    training RNG. (``trainer.num_threads`` is allowed too, but may change floating-point rounding.)"""
    plain = Path(shutil.copytree(run3, tmp_path / "plain"))
    other = Path(shutil.copytree(run3, tmp_path / "other"))
    assert main(["pretrain", "--resume", str(plain), "trainer.max_steps=5"]) == 0
    assert main(["pretrain", "--resume", str(other), "trainer.max_steps=5", "trainer.log_every=3",
                 "trainer.progress=true", "trainer.checkpoint_every=7",
                 "eval.knn_every_epochs=1", "eval.knn_k=[1]", f"data.test_root={run3.parent / 'images'}"]) == 0
    assert "knn_top1" in (other / "metrics.csv").read_text().splitlines()[0]  # the k-NN did run
    a = load_checkpoint(plain / "checkpoints" / "last.pt")
    b = load_checkpoint(other / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5
    a, b = with_method_state(a), with_method_state(b)
    for part in ("student", "teacher", "method"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


# ------------------------------------------------------------------------------------- init_from
def test_init_from_resamples_pos_embed_to_another_grid(run3, capsys, tiny_cfg):
    """16 px crops (4x4 patches) -> 24 px crops (6x6): timm's resampling, [CLS] row kept, rest loaded as is."""
    src = run3 / "checkpoints" / "last.pt"
    cfg = tiny_cfg("data.root=unused", "data.global_crop_size=24", f"trainer.init_from={src}")
    student, teacher = init_networks(cfg, src)
    state = load_checkpoint(src)
    old = state["teacher"]["backbone.vit.pos_embed"]
    new = teacher.state_dict()["backbone.vit.pos_embed"]
    assert old.shape == (1, 17, 32) and new.shape == (1, 37, 32)
    assert torch.equal(new, resample_abs_pos_embed(old, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1))
    assert torch.equal(new[:, :1], old[:, :1])  # the [CLS] position is a prefix token: not interpolated
    for key, value in student.state_dict().items():
        if not key.endswith("pos_embed"):
            assert torch.equal(value, state["student"][key]), key
    out = capsys.readouterr().out
    assert f"trainer.init_from: teacher in {src}: resampled backbone.vit.pos_embed from a 4x4 to a 6x6 patch grid" in out


def test_init_from_shape_mismatch_names_file_and_parameter(run3, tmp_path, capsys, tiny_overrides):
    src = run3 / "checkpoints" / "last.pt"
    out_dir = tmp_path / "runs"
    status = main(["pretrain", *tiny_overrides, f"data.root={run3.parent / 'images'}", f"trainer.out_dir={out_dir}",
                   "model.head_out_dim=8", f"trainer.init_from={src}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run plan's warnings
    assert status == 2 and err == (
        f"sove: error: trainer.init_from: student in {src}: parameter shapes differ (2): head.mlp.4.weight (16, 32) "
        "in the file, (8, 32) in this model; head.mlp.4.bias (16,) in the file, (8,) in this model; the model "
        "config must match the checkpoint's")
    assert not out_dir.exists()  # checked before the run directory is created


def test_a_checkpoint_from_before_the_seed_streams_resumes_with_a_warning(run3, capsys):
    """Regression: a checkpoint written before sove.seeding resumed silently, though its draws from then on
    differ from the writing code's (found by resuming a run of commit 5e327e9)."""
    from sove.config import load_config
    from sove.seeding import SCHEME
    from sove.train.preflight import check_resume

    ck = run3 / "checkpoints" / "last.pt"
    state = load_checkpoint(ck)
    cfg = load_config(str(run3 / "config.yaml"))
    assert state["seed_scheme"] == SCHEME
    check_resume(state, cfg, 1, "32-true", str(ck))
    assert capsys.readouterr().err == ""  # this scheme: silent
    del state["seed_scheme"]
    check_resume(state, cfg, 1, "32-true", str(ck))
    assert capsys.readouterr().err == (
        f"sove: warning: {ck} was written by an older sove, before its named seed streams (sove.seeding, scheme "
        f"{SCHEME}): --resume continues the run, but its random draws from here on (data order, augmentation, "
        "anchors, drop path) differ from those of the code that wrote it, so it will not equal that code's "
        "uninterrupted run\n")


@pytest.mark.parametrize("content", [b"{}", b"notjson", b"\x89PNG\r\n\x1a\n\x00\xff"])
def test_a_backbone_file_that_is_no_export_is_one_error_line(tmp_path, capsys, content):
    """Regression: `sove eval knn --backbone` on `{}` / not JSON / a PNG gave KeyError, JSONDecodeError and
    UnicodeDecodeError tracebacks (exit 1)."""
    junk = tmp_path / "junk.json"
    junk.write_bytes(content)
    assert main(["eval", "knn", "--backbone", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sove: error: '{junk}' is not a backbone.json written by `sove export` (")
    assert err.endswith("pass the backbone.json of RUN/export or a RUN/checkpoints/FILE.pt\n")
    assert len(err.splitlines()) == 1
