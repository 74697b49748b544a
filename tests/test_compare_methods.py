"""benchmarks/compare_methods.py in its 1-step smoke mode (CI): SOVE, DINO and iBOT on one trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import TINY, make_image_folder

pytest.importorskip("lightly", reason="the method comparison needs the [bench] extra (lightly)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_methods  # noqa: E402


def test_smoke_run_trains_each_method_one_step_and_reports_all_rows(tmp_path):
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "compare.md"
    result = compare_methods.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                                   "--num-prototypes", "64", *TINY, f"data.root={images}", f"data.test_root={images}"])
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


def test_peer_heads_start_equal_in_student_and_teacher(tmp_path):
    from sove.config import load_config
    from sove.train.builders import build_train_dataset

    images = make_image_folder(tmp_path / "images")
    cfg = load_config(None, TINY + [f"data.root={images}", f"trainer.out_dir={tmp_path}", "trainer.name=dino"])
    trainer = compare_methods.make_trainer("ibot", cfg, tmp_path / "dino", build_train_dataset(cfg), 32)
    s, t = trainer.student_module.head.state_dict(), trainer.teacher.head.state_dict()
    assert s.keys() == t.keys() and all(bool((s[k] == t[k]).all()) for k in s)
    assert trainer.cls_fs is None and trainer.patch_fs is None  # peers keep no feature sets
    assert trainer.teacher.head.last_layer.weight_v.shape[0] == 32  # K prototypes
