"""benchmarks/recipe_trials.py in its 1-step smoke mode (CI), its trial parsing and its table."""

from __future__ import annotations

import json

import pytest
import recipe_trials  # benchmarks/, on the path from conftest.py

from helpers import make_image_folder
from sove.config import load_config
from sove.errors import SoveError


def test_parse_trial_splits_name_and_overrides():
    assert recipe_trials.parse_trial("lr 3e-3=optim.base_lr=3e-3 model.depth=2") == (
        "lr 3e-3", ["optim.base_lr=3e-3", "model.depth=2"])
    for bad in ("no-overrides", "name=", "name=depth2", "=optim.base_lr=1"):
        with pytest.raises(SoveError, match="NAME=key=value"):
            recipe_trials.parse_trial(bad)


def test_unknown_builtin_trial_is_named():
    with pytest.raises(SoveError, match="unknown trial.*'patch3'"):
        recipe_trials.parse_args(["--trials", "base", "patch3"])


def test_every_builtin_trial_is_a_valid_config_on_the_demo_preset():
    for name, overrides in recipe_trials.TRIALS.items():
        load_config("fashion_mnist_tiny", overrides)  # raises ConfigError naming the key if not


def test_smoke_run_trains_each_trial_one_step_and_tables_them(tmp_path, tiny_overrides):
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "trials.md"
    rows = recipe_trials.main(["--smoke", "--trials", "base", "--trial", "wide=model.embed_dim=48",
                               "--work-dir", str(tmp_path / "work"), "--out", str(out),
                               *tiny_overrides, f"data.root={images}", f"data.test_root={images}"])
    assert [r["name"] for r in rows] == ["base", "wide"]
    assert rows[1]["overrides"] == ["model.embed_dim=48"]
    for r in rows:
        assert r["steps"] == r["scheduled_steps"] == 1
        assert r["epochs"] == pytest.approx(1 / 4)  # 32 images, batch 8 -> 4 batches per epoch
        assert set(r["knn_top1"]) == {"1", "3"} and 0.0 <= r["knn_best_top1"] <= 100.0
    table = out.read_text().splitlines()
    assert table[0].startswith("| trial | overrides |") and table[0].endswith("| k-NN k=1 | k-NN k=3 | best |")
    assert table[2].startswith("| base | (config) |") and table[3].startswith("| wide | `model.embed_dim=48` |")
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [t["name"] for t in saved["trials"]] == ["base", "wide"]


def test_profile_objective_attributes_the_loss_forward_to_operators(tmp_path, tiny_overrides):
    import profile_objective

    images = make_image_folder(tmp_path / "images")
    result = profile_objective.main(["--warmup", "1", "--steps", "2", "--work-dir", str(tmp_path / "work"),
                                     *tiny_overrides, f"data.root={images}"])
    assert result["calls"] == 2 and result["seconds_per_call"] > 0
    ops = result["ms_per_step"]
    assert "aten::topk" in ops  # judge selection
    assert any(k in ops for k in ("aten::_softmax", "aten::softmax"))  # concept probabilities
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    table = profile_objective.markdown(result, 3).splitlines()
    assert len(table) == 2 + 3 + 1 and table[-1].startswith("| rest |")
