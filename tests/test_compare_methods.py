"""benchmarks/compare_methods.py in its 1-step smoke mode (CI): SOVE, DINO and iBOT as ``method=`` of one trainer."""

from __future__ import annotations

import pytest

from helpers import make_image_folder

pytest.importorskip("lightly", reason="the method comparison needs the [peers] extra (lightly)")
import compare_methods  # noqa: E402  (benchmarks/, on the path from conftest.py)


def test_smoke_run_trains_each_method_one_step_and_reports_all_rows(tmp_path, tiny_overrides):
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "compare.md"
    result = compare_methods.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                                   "--num-prototypes", "64", *tiny_overrides, f"data.root={images}",
                                   f"data.test_root={images}"])
    methods = result["methods"]
    assert list(methods) == ["sove", "dino", "ibot"]
    for name, row in methods.items():
        assert row["steps"] == row["scheduled_steps"] == 1, name
        assert row["split_s"]["forward"] > 0 and row["split_s"]["backward"] > 0, name
        assert 0.0 <= row["knn_best_top1"] <= 100.0
    # The two classes differ in brightness: raw pixels separate them perfectly.
    assert result["pixels"]["knn_best_top1"] == 100.0
    # DINO/iBOT hold a 64-prototype head (student + teacher + AdamW moments); SOVE holds feature sets.
    assert methods["dino"]["persistent_mib"] > methods["sove"]["persistent_mib"]
    table = out.read_text().splitlines()
    assert len(table) == 2 + 3 + 2 and table[2].startswith("| SOVE (ours) | 1 (1) |")
    assert out.with_suffix(".json").is_file()


def test_peer_heads_start_equal_in_student_and_teacher(tmp_path, tiny_cfg):
    from sove.train.builders import build_train_dataset

    images = make_image_folder(tmp_path / "images")
    cfg = tiny_cfg(f"data.root={images}", f"trainer.out_dir={tmp_path}", "trainer.name=dino",
                   "method=ibot", "peers.num_prototypes=32")
    trainer = compare_methods.make_trainer(cfg, tmp_path / "dino", build_train_dataset(cfg))
    s, t = trainer.student_module.head.state_dict(), trainer.teacher.head.state_dict()
    assert s.keys() == t.keys() and all(bool((s[k] == t[k]).all()) for k in s)
    assert sorted(trainer.method.state_dict()) == ["cls_loss.center", "patch_loss.center.center"]  # no feature sets
    assert trainer.teacher.head.last_layer.weight_v.shape[0] == 32  # K prototypes


def test_resize_to_budget_fits_the_schedule_to_the_pace_and_keeps_the_warmup_fraction(tmp_path, tiny_cfg):
    from sove.train.builders import build_train_dataset
    from sove.train.schedules import build_schedules

    images = make_image_folder(tmp_path / "images")  # 32 images, batch 8: 4 steps per epoch
    cfg = tiny_cfg(f"data.root={images}", f"trainer.out_dir={tmp_path}", "trainer.name=sove",
                   "optim.epochs=2", "optim.warmup_epochs=0.5")
    trainer = compare_methods.make_trainer(cfg, tmp_path / "sove", build_train_dataset(cfg))
    assert trainer.total_steps == 8
    trainer.fit(deadline=0.0)  # one step
    trainer.fit(deadline=0.0)
    # 2 steps in 10 s (5 s/step), 40 s left of a 50 s budget -> 2 + 8 = 10 steps = 2.5 epochs.
    assert compare_methods.resize_to_budget(trainer, used_s=10.0, budget_s=50.0) == 10
    assert trainer.total_steps == 10 == len(trainer.schedules.lr)
    ref = build_schedules(tiny_cfg(f"data.root={images}", "optim.epochs=2.5",
                                   "optim.warmup_epochs=0.625").optim,
                          cfg.loss, 4, 8)
    for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
        assert (getattr(trainer.schedules, name) == getattr(ref, name)).all(), name
    assert trainer.schedules.momentum[-1] == 1.0  # the re-sized run still ends with the teacher frozen
    # Slower than the budget allows: at least one more step is scheduled.
    assert compare_methods.resize_to_budget(trainer, used_s=60.0, budget_s=50.0) == 3
    trainer.fit()
    assert trainer.step == 3
