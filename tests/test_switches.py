"""Paper switches change behaviour (issue #8): each test asserts a value that differs between settings."""

from __future__ import annotations

import pytest
import torch

from sove.config import load_config
from sove.models import MaskedViT, create_vit
from sove.run import prepare_run_dir
from sove.train.trainer import Trainer


def test_global_pool_cls_vs_mean_patch():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny", 16, 4, 3, depth=2, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    cls_out = MaskedViT(vit, global_pool="cls")(x)
    mean_out = MaskedViT(vit, global_pool="mean_patch")(x)
    assert torch.equal(cls_out["global"], cls_out["cls"])
    torch.testing.assert_close(mean_out["global"], mean_out["patches"].mean(1))
    assert not torch.allclose(cls_out["global"], mean_out["global"])


def make_trainer(tiny_cfg, tmp_path, image_folder, name, extra):
    cfg = tiny_cfg(*[f"data.root={image_folder}", f"trainer.out_dir={tmp_path}", f"trainer.name={name}"]
     + extra)
    return Trainer(cfg, prepare_run_dir(cfg, overwrite=False))


@pytest.fixture
def captured(monkeypatch):
    from sove.method import losses

    seen = {}
    original = losses.SOVELoss.forward

    def forward(self, **kw):
        seen.update(kw)
        return original(self, **kw)

    monkeypatch.setattr(losses.SOVELoss, "forward", forward)
    return seen


def step_once(trainer):
    trainer.dataset.set_epoch(0)
    return trainer.training_step(next(iter(trainer.loader)))


def test_mask_views_only_first_global_view(tmp_path, image_folder, captured, tiny_cfg):
    step_once(make_trainer(tiny_cfg, tmp_path, image_folder, "both", []))
    both = captured["patch_owner"].clone()
    step_once(make_trainer(tiny_cfg, tmp_path, image_folder, "first", ["mask.views=[0]"]))
    first = captured["patch_owner"]
    b = 8  # images 0..7 are global view 1, 8..15 global view 2
    assert (both >= b).any() and (first < b).all() and first.numel() > 0


def test_patch_weight_zero_leaves_e_p_unallocated_and_computes_no_patches(tmp_path, image_folder, captured, tiny_cfg):
    trainer = make_trainer(tiny_cfg, tmp_path, image_folder, "nopatch", ["loss.patch_weight=0"])
    terms = step_once(trainer)
    assert trainer.method.patch_fs is None and "patch" not in terms
    assert captured["student_patches"].shape[0] == 0  # no patch projections computed


def test_cls_weight_zero_leaves_e_c_unallocated(tmp_path, image_folder, tiny_cfg):
    trainer = make_trainer(tiny_cfg, tmp_path, image_folder, "nocls", ["loss.cls_weight=0"])
    terms = step_once(trainer)
    assert trainer.method.cls_fs is None and "cls" not in terms and torch.isfinite(terms["patch"])


def test_label_mode_onehot_gives_equal_weights(tmp_path, image_folder, tiny_cfg):
    soft = make_trainer(tiny_cfg, tmp_path, image_folder, "soft", [])
    onehot = make_trainer(tiny_cfg, tmp_path, image_folder, "onehot", ["loss.cls.label_mode=onehot"])
    w_soft = soft.method.loss_fn.concepts(soft.method.loss_fn.cls, soft.method.cls_fs.features, 0, 0, 0).weights
    w_one = onehot.method.loss_fn.concepts(onehot.method.loss_fn.cls, onehot.method.cls_fs.features, 0, 0, 0).weights
    assert torch.all(w_one == 0.9) and not torch.all(w_soft == 0.9)


@pytest.mark.parametrize("preset", ["imagenet_vit_small", "imagenet_vit_base", "imagenet_vit_large"])
def test_paper_presets_build_and_step_at_reduced_size(tmp_path, image_folder, preset):
    cfg = load_config(preset, [f"data.root={image_folder}", "data.global_crop_size=16", "data.local_crop_size=8",
                               "data.num_local_crops=2", "model.patch_size=4", "model.depth=1", "model.embed_dim=32",
                               "model.num_heads=2", "model.head_hidden_dim=32", "model.head_out_dim=16",
                               "loss.cls_feature_set_size=64", "loss.patch_feature_set_size=32",
                               "loss.cls.num_anchors=8", "loss.patch.num_anchors=8", "optim.batch_size=8",
                               "data.num_workers=0", "trainer.precision=32-true", "trainer.progress=false",
                               f"trainer.out_dir={tmp_path}"])
    assert cfg.optim.epochs == {"imagenet_vit_small": 800, "imagenet_vit_base": 400, "imagenet_vit_large": 250}[preset]
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    terms = step_once(trainer)
    assert torch.isfinite(terms["loss"]) and int(trainer.method.cls_fs.ptr) == 8


@pytest.mark.parametrize("override, key", [
    ("loss.teacher_temp_final=0", "loss.teacher_temp_final"),
    ("loss.teacher_temp_warmup_epochs=-1", "loss.teacher_temp_warmup_epochs"),
    ("loss.cls.student_temp=0", "loss.cls.student_temp"),
    ("loss.patch.teacher_temp=-0.1", "loss.patch.teacher_temp"),
])
def test_invalid_temperatures_name_the_key(override, key, tiny_cfg):
    from sove.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg("data.root=unused", override)
