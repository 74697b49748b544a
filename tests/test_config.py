"""Config: defaults follow docs/method.md, presets load, overrides merge, validation names keys."""

from __future__ import annotations

import pytest

from sove.config import load_config
from sove.errors import ConfigError


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert cfg.loss.cls_feature_set_size == 65536 and cfg.loss.patch_feature_set_size == 8192
    assert (cfg.loss.cls.num_anchors, cfg.loss.cls.num_judges, cfg.loss.cls.num_tasks) == (8192, 9, 4)
    assert (cfg.loss.patch.num_anchors, cfg.loss.patch.num_judges, cfg.loss.patch.num_tasks) == (512, 1, 1)
    assert (cfg.loss.student_temp, cfg.loss.teacher_temp, cfg.loss.cls.smoothing) == (0.1, 0.04, 0.1)
    assert cfg.optim.momentum_teacher == 0.996 and cfg.optim.base_lr == 5e-4
    assert cfg.mask.mode == "blockwise" and cfg.mask.ratio == 0.3


def test_imagenet_vit_small_preset():
    cfg = load_config("imagenet_vit_small")
    assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 16
    assert cfg.optim.epochs == 800 and cfg.data.num_local_crops == 10
    assert (cfg.data.global_crop_size, cfg.data.local_crop_size) == (224, 96)


def test_overrides_merge_over_the_preset():
    cfg = load_config("fashion_mnist_tiny", ["loss.cls.num_judges=5", "loss.cls.label_mode=onehot"])
    assert cfg.loss.cls.num_judges == 5 and cfg.loss.cls.label_mode == "onehot"
    assert cfg.trainer.name == "fashion_mnist_tiny"


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.optim.epochs = 3


@pytest.mark.parametrize("override, key", [
    ("model.nonsense=1", "model.nonsense"),
    ("optim.batch_size=abc", "optim.batch_size"),
    ("loss.cls.anchor_keep_fraction=0", "loss.cls.anchor_keep_fraction"),
    ("loss.cls_weight=0", "loss.cls_weight"),
])
def test_validation_names_the_key(override, key):
    extra = ["loss.patch_weight=0"] if override == "loss.cls_weight=0" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override] + extra)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.epochs"])


def test_a_yaml_boolean_word_given_to_a_string_key_stays_that_word():
    # Regression: trainer.name=off named the run 'False' (YAML 1.1 reads off/on/yes/no as booleans).
    from sove.config import load_config

    cfg = load_config("fashion_mnist_tiny", ["trainer.name=off", "data.root=Yes", "trainer.progress=off"])
    assert (cfg.trainer.name, cfg.data.root, cfg.trainer.progress) == ("off", "Yes", False)  # a bool key stays bool
