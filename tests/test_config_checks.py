"""Configs that cannot run as written are refused naming the key; likely mistakes are warned about.

Key-only checks run in ``load_config``; checks that need the number of images and processes run
in :func:`sove.train.preflight.check_run_plan`, before the run directory is created.
"""

from __future__ import annotations

import pytest

from sove.cli import main
from sove.errors import ConfigError, DataError
from sove.train.preflight import check_run_plan

BASE = ["data.root=unused"]  # on TINY; 32 images below: batch 8 -> 4 steps/epoch, 2 epochs = 8 steps


@pytest.mark.parametrize("overrides, line", [
    (["optim.warmup_epochs=2"], "optim.warmup_epochs: (2.0) must be >= 0 and shorter than optim.epochs (2.0): "
                                "the lr would never reach its peak"),
    (["loss.teacher_temp_final=0.07", "loss.teacher_temp_warmup_epochs=3"],
     "loss.teacher_temp_warmup_epochs: (3.0) is longer than optim.epochs (2.0): loss.teacher_temp_final would "
     "never be reached"),
    (["loss.teacher_temp_warmup_epochs=1"], "loss.teacher_temp_warmup_epochs: (1.0) warms up to nothing: set "
                                            "loss.teacher_temp_final (null keeps loss.teacher_temp constant)"),
    (["mask.ratio=0.01"], "mask.ratio: 0.01 masks round(0.01 x 16) = 0 of the 16 tokens of a global crop: the patch "
                          "loss (loss.patch_weight > 0) would see no masked token; raise mask.ratio or set "
                          "loss.patch_weight=0"),
    (["mask.views=[]"], "mask.views: is empty: the patch loss (loss.patch_weight > 0) would see no masked token; "
                        "mask a view or set loss.patch_weight=0"),
    (["trainer.log_every=0"], "trainer.log_every: must be >= 1 (steps), got 0"),  # was ZeroDivisionError
    (["trainer.max_steps=0"], "trainer.max_steps: must be >= 1 or null, got 0"),
    (["data.global_crop_scale=[0.8,0.3]"], "data.global_crop_scale: must be [min, max] area fractions with "
                                           "0 < min <= max <= 1, got [0.8, 0.3]"),
    (["optim.min_lr=-1e-6"], "optim.min_lr: must be >= 0, got -1e-06"),
    (["eval.knn_k=[]"], "eval.knn_k: needs at least one k and every k must be >= 1, got []"),  # was ValueError
    (["eval.knn_temperature=-1"], "eval.knn_temperature: must be > 0 (votes are exp(sim / T)), got -1.0"),
    (["eval.batch_size=0"], "eval.batch_size: must be >= 1, got 0"),  # was torch's ValueError
    (["trainer.seed=-1"], "trainer.seed: must be >= 0 (it seeds numpy's SeedSequence), got -1"),  # was numpy's error
    (["eval.knn_train_subset=0"], "eval.knn_train_subset: must be >= 1 (images), got 0"),
])
def test_key_checks_refuse_with_the_exact_line(overrides, line, tiny_cfg):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(*BASE, *overrides)
    assert str(err.value) == line


def test_patch_loss_off_allows_no_masking(tiny_cfg):
    assert tiny_cfg(*BASE, "mask.ratio=0", "loss.patch_weight=0").mask.ratio == 0


@pytest.mark.parametrize("overrides, images, world, error", [
    (["optim.warmup_epochs=1.9"], 32, 1,  # round(1.9 x 4) = 8 steps = the whole schedule
     "optim.warmup_epochs: 1.9 epochs = 8 steps is not shorter than the schedule, 8 steps (optim.epochs 2.0 x 4 "
     "steps/epoch of 8 images): the lr would never reach its peak"),
    (["trainer.max_steps=9"], 32, 1,
     "trainer.max_steps: 9 is beyond the schedule, 8 steps (optim.epochs 2.0 x 4 steps/epoch of 8 images); the run "
     "would stop at its end. Raise optim.epochs or lower trainer.max_steps"),
    (["loss.cls_feature_set_size=80"], 32, 1,
     "loss.cls_feature_set_size: 80 rows are never filled: the whole schedule enqueues 8 steps x 8 = 64 teacher "
     "embeddings, so random initial rows would stay concept candidates; lower loss.cls_feature_set_size or train "
     "longer; settings that fit 32 images: loss.cls_feature_set_size=32 loss.cls.num_anchors=4"),
    ([], 12, 2, "data.root: 12 images is fewer than one global batch (optim.batch_size 8 x 2 processes = 16): every "
                "batch would be dropped; lower optim.batch_size; settings that fit 12 images on 2 processes: "
                "optim.batch_size=1 loss.cls_feature_set_size=8 loss.cls.num_anchors=2"),
])
def test_run_plan_refusals(overrides, images, world, error, tiny_cfg):
    with pytest.raises((ConfigError, DataError)) as err:
        check_run_plan(tiny_cfg(*BASE, *overrides), images, world)
    assert str(err.value) == error


def test_run_plan_warnings(capsys, tiny_cfg):
    cfg = tiny_cfg(*BASE, "optim.batch_size=12", "trainer.max_steps=1", "loss.teacher_temp_final=0.07",
                   "optim.base_lr=0", "eval.knn_every_epochs=1")
    # 32 images, global batch 12: 2 steps/epoch, 8 images dropped; schedule 4 steps, lr warm-up 1 step.
    warnings = check_run_plan(cfg, 32, 1)
    assert warnings == [
        "32 images make 2 step(s) per epoch of 12 images (fewer than 4): epoch-based settings (optim.epochs, "
        "warm-ups) round to few steps",
        "each epoch drops 8 of 32 images (25%): only whole global batches of 12 are used; lower optim.batch_size "
        "to use more of the data",
        "loss.cls_feature_set_size (40) is larger than the dataset (32 images): E_C holds several views of each "
        "image, embedded by older teachers, as concept candidates",
        "trainer.max_steps=1 enqueues 12 of the 40 rows of loss.cls_feature_set_size: the rest stay random initial rows",
        "trainer.max_steps=1 enqueues 12 of the 24 rows of loss.patch_feature_set_size: the rest stay random "
        "initial rows",
        "optim.min_lr 1e-06 is above the peak lr 0 (optim.base_lr 0 x 12/256): the cosine schedule rises instead "
        "of decaying",
        "loss.teacher_temp (0.04) is unused: without loss.teacher_temp_warmup_epochs the teacher temperature is "
        "loss.teacher_temp_final (0.07) from step 0",
        "eval.knn_every_epochs=1: the run ends after 1 steps, before the first periodic k-NN at step 2",
        "settings that fit 32 images: optim.batch_size=8 loss.cls_feature_set_size=32 loss.cls.num_anchors=4",
    ]
    assert capsys.readouterr().err.splitlines() == [f"sove: warning: {w}" for w in warnings]


def test_max_steps_inside_a_warm_up_is_warned_about(tiny_cfg):
    cfg = tiny_cfg(*BASE, "trainer.max_steps=1", "optim.warmup_epochs=0.1")
    assert "optim.warmup_epochs=0.1 is 0 steps at 4 steps/epoch: no lr warm-up" in check_run_plan(cfg, 32, 1)
    cfg = tiny_cfg(*BASE, "trainer.max_steps=1")  # lr warm-up: 0.5 epochs = 2 steps
    assert "trainer.max_steps=1 stops the run inside the lr warm-up (2 steps)" in check_run_plan(cfg, 32, 1)


def test_global_batch_larger_than_the_data_is_refused_before_launch(tmp_path, image_folder, capsys, tiny_overrides):
    """Regression: the check used the per-process batch, so 2 x 24 > 32 images created the run
    directory and launched two processes before failing."""
    out = tmp_path / "runs"
    status = main(["pretrain", *tiny_overrides, f"data.root={image_folder}", "optim.batch_size=24",
                   "trainer.accelerator=cpu",
                   "trainer.devices=2", "trainer.strategy=ddp", f"trainer.out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == (
        "sove: error: data.root: 32 images is fewer than one global batch (optim.batch_size 24 x 2 processes = 48): "
        "every batch would be dropped; lower optim.batch_size; settings that fit 32 images on 2 processes: "
        "optim.batch_size=4 loss.cls_feature_set_size=32 loss.cls.num_anchors=4")
    assert not out.exists()


@pytest.mark.parametrize("overrides, images, expected", [
    # The own-folder case: 300 photos, batch 64 drops 44 per epoch; E_C 4096 > 300 images.
    (["optim.batch_size=64", "loss.cls_feature_set_size=4096", "loss.cls.num_anchors=512", "optim.epochs=100",
      "optim.warmup_epochs=10"], 300,
     ["optim.batch_size=32", "loss.cls_feature_set_size=256", "loss.cls.num_anchors=32"]),
    # 2000 images, batch 64 (31 steps, 16 dropped = 0.8%) fits; E_C 65536 > 2000 -> 1024 rows, 128 anchors.
    (["optim.batch_size=64", "loss.cls_feature_set_size=65536", "loss.cls.num_anchors=8192", "optim.epochs=100",
      "optim.warmup_epochs=10"], 2000,
     ["loss.cls_feature_set_size=1024", "loss.cls.num_anchors=128"]),
    # A patch feature set the 2-epoch schedule cannot fill: 8 steps x 8 = 64 rows -> 64, 64 / 16 = 4 anchors.
    (["loss.patch_feature_set_size=100", "loss.patch.num_anchors=6"], 32,
     ["loss.cls_feature_set_size=32", "loss.cls.num_anchors=4", "loss.patch_feature_set_size=64",
      "loss.patch.num_anchors=4"]),
    ([], 10000, []),  # TINY on 10,000 images fits as it is
    # DINO / iBOT have no feature sets: only the batch is suggested (it used to add SOVE's loss.* keys).
    (["method=dino", "optim.batch_size=64", "loss.cls_feature_set_size=4096", "optim.epochs=100",
      "optim.warmup_epochs=10"], 300, ["optim.batch_size=32"]),
])
def test_small_data_suggestions(overrides, images, expected, tiny_cfg):
    from sove.train.small_data import fitting_overrides

    cfg = tiny_cfg(*BASE, *overrides)
    assert fitting_overrides(cfg, images, 1) == expected
    if expected:  # the suggested settings pass the run plan without a small-data warning
        fixed = tiny_cfg(*BASE, *overrides, *expected)
        assert not [w for w in check_run_plan(fixed, images, 1) if "images" in w or "drops" in w]
