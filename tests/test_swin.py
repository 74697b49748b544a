"""Swin backbone (issue #8, paper Swin-T/14): mask token on the patch embedding, final-stage mask grid,
mean-token representation, the swin_tiny preset steps, export, and config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sove.api import pretrain
from sove.cli import main
from sove.config import load_config, token_stride
from sove.errors import ConfigError
from sove.eval.embed import embed
from sove.eval.features import EvalImages, extract_features
from sove.run import prepare_run_dir, teacher_backbone
from sove.export import global_features, load_backbone
from sove.models import MaskedSwin, MaskedViT, build_networks, create_swin, create_vit
from sove.train.trainer import Trainer

#: Tiny Swin: 2 stages (token stride 4 x 2 = 8 px), widths 24/48, window 4, 32 px globals / 16 px locals.
SWIN = ["data.root=unused", "model.arch=swin_tiny", "model.global_pool=mean_patch", "model.depth=null",
        "model.depths=[2,2]", "model.embed_dim=24", "model.num_heads=2", "model.window_size=4", "data.global_crop_size=32",
        "data.local_crop_size=16"]


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return create_swin("swin_tiny", 32, 4, 3, embed_dim=24, depths=[2, 2], num_heads=2, window_size=4).eval()


def test_strides_grids_and_widths(swin, tiny_cfg):
    model = MaskedSwin(swin)
    assert (model.patch_size, model.upsample, model.token_stride) == (4, 2, 8)
    assert model.grid(32) == (4, 4) and model.grid(16) == (2, 2)
    assert model.embed_dim == 48 and model.mask_token.shape == (24,)  # output width, stage-1 width
    assert [s.blocks[0].attn.num_heads for s in swin.layers] == [2, 4]  # num_heads doubles per stage
    cfg = tiny_cfg(*SWIN)
    assert token_stride(cfg.model) == 8 and token_stride(load_config("imagenet_swin_tiny").model) == 32
    assert token_stride(load_config().model) == 16  # ViT: the patch size


def test_mask_token_replaces_exactly_the_upsampled_cells(swin):
    model = MaskedSwin(swin)
    with torch.no_grad():
        model.mask_token.copy_(torch.linspace(-1.0, 1.0, 24))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.bool)  # final-stage grid 4 x 4
    mask[0, 1] = True  # cell (0, 1) -> patch-embed rows 0-1, cols 2-3
    mask[1, [10, 15]] = True  # cells (2, 2), (3, 3) -> rows 4-5 cols 4-5, rows 6-7 cols 6-7
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[0, 0:2, 2:4] = True
    expected[1, 4:6, 4:6] = True
    expected[1, 6:8, 6:8] = True
    with torch.no_grad():
        clean = model.embed(x)
        masked = model.embed(x, mask)
    assert clean.shape == masked.shape == (2, 8, 8, 24)
    assert torch.equal(masked[expected], model.mask_token.detach().expand(int(expected.sum()), 24))
    assert torch.equal(masked[~expected], clean[~expected])
    assert (clean[expected] - masked[expected]).abs().amax(dim=1).min() > 0


def test_output_changes_only_with_a_non_empty_mask_and_mask_token_gets_gradient(swin):
    model = MaskedSwin(swin)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    clean = model(x)
    empty = model(x, torch.zeros(2, 16, dtype=torch.bool))
    for key in ("global", "patches"):
        assert torch.equal(clean[key], empty[key])
    empty["patches"].sum().backward()
    assert torch.count_nonzero(model.mask_token.grad) == 0
    model.mask_token.grad = None
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    masked = model(x, mask)
    assert not torch.allclose(masked["patches"][0], clean["patches"][0])
    torch.testing.assert_close(masked["patches"][1], clean["patches"][1])  # image 1 unmasked
    masked["patches"].sum().backward()
    assert torch.count_nonzero(model.mask_token.grad) > 0


def test_global_is_the_mean_final_token_after_the_norm(swin):
    model = MaskedSwin(swin)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # a local-crop size
    with torch.no_grad():
        out = model(x)
        reference = swin.forward_features(x)  # (batch, 2, 2, 48): timm's own path, final norm included
    assert out["patches"].shape == (3, 4, 48)
    torch.testing.assert_close(out["patches"], reference.flatten(1, 2))
    torch.testing.assert_close(out["global"], reference.mean(dim=(1, 2)))
    assert torch.equal(out["cls"], out["global"])


def test_mask_shape_and_teacher_errors(swin):
    with pytest.raises(ValueError, match=r"final-stage grid \(1, 16\)"):
        MaskedSwin(swin).embed(torch.randn(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.bool))
    teacher = MaskedSwin(swin, with_mask_token=False)
    assert teacher.mask_token is None
    with pytest.raises(ValueError, match="mask token"):
        teacher(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        MaskedSwin(swin, global_pool="cls")


def test_student_and_teacher_networks(image_folder, tiny_cfg):
    cfg = tiny_cfg(*SWIN, f"data.root={image_folder}")
    student, teacher = build_networks(cfg, seed=0)
    assert isinstance(student.backbone, MaskedSwin) and student.backbone.mask_token is not None
    assert teacher.backbone.mask_token is None
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert set(s_state) - set(t_state) == {"backbone.mask_token"}
    assert all(torch.equal(t_state[k], s_state[k]) and t_state[k].data_ptr() != s_state[k].data_ptr() for k in t_state)
    assert student.head.mlp[0].in_features == 48  # the head reads final-stage tokens
    drop = [m.drop_prob for m in student.modules() if hasattr(m, "drop_prob")]
    assert drop and max(drop) > 0  # stochastic depth in the student only
    assert not any(hasattr(m, "drop_prob") for m in teacher.modules())


def test_swin_preset_builds_and_steps_at_reduced_size(tmp_path, image_folder):
    paper = load_config("imagenet_swin_tiny")
    m, lo = paper.model, paper.loss
    assert (m.arch, m.patch_size, m.window_size, m.global_pool) == ("swin_tiny", 4, 14, "mean_patch")
    assert paper.optim.epochs == 300
    assert (paper.data.global_crop_size, paper.data.local_crop_size, paper.data.num_local_crops) == (224, 96, 10)
    assert (lo.cls_feature_set_size, lo.patch_feature_set_size, lo.cls.num_anchors, lo.cls.num_judges,
            lo.patch.num_anchors) == (65536, 8192, 8192, 9, 512)
    cfg = load_config("imagenet_swin_tiny", [
        f"data.root={image_folder}", "data.global_crop_size=32", "data.local_crop_size=16", "data.num_local_crops=2",
        "model.depths=[2,2]", "model.embed_dim=24", "model.num_heads=2", "model.window_size=4",
        "model.head_hidden_dim=32", "model.head_out_dim=16", "loss.cls_feature_set_size=64",
        "loss.patch_feature_set_size=32", "loss.cls.num_anchors=8", "loss.patch.num_anchors=8", "optim.batch_size=8",
        "data.num_workers=0", "trainer.precision=32-true", "trainer.progress=false", f"trainer.out_dir={tmp_path}"])
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    trainer.dataset.set_epoch(0)
    batch = next(iter(trainer.loader))
    assert batch["masks"].shape == (2, 8, 16)  # masks on the 4 x 4 final-stage grid of a 32 px crop
    assert batch["masks"].any()
    terms = trainer.training_step(batch)
    assert torch.isfinite(terms["loss"]) and torch.isfinite(terms["cls"]) and torch.isfinite(terms["patch"])
    assert int(trainer.method.cls_fs.ptr) == 8 and int(trainer.method.patch_fs.ptr) == 8
    assert torch.count_nonzero(trainer.student_module.backbone.mask_token.grad) > 0  # the patch loss reaches it


def test_export_and_features_of_a_swin_run(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(*SWIN, f"data.root={image_folder}", f"trainer.out_dir={tmp_path}",
                                           "trainer.name=s", "trainer.max_steps=1")
    run = pretrain(cfg).path
    assert main(["export", str(run)]) == 0
    meta_path = run / "backbone.json"
    meta = json.loads(meta_path.read_text())
    assert meta["architecture"] == "swin_tiny_patch4_window7_224" and meta["global_pool"] == "mean_patch"
    assert meta["model_kwargs"]["depths"] == [2, 2] and meta["model_kwargs"]["window_size"] == 4
    model = load_backbone(meta_path)
    ours = teacher_backbone(run, cfg).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(global_features(model, meta, x), ours(x)["global"], atol=1e-5, rtol=0)
    assert torch.equal(model.state_dict()["norm.weight"], ours.swin.state_dict()["norm.weight"])
    # `sove embed` gives the same features from the exported file as from the run directory.
    exported = np.load(embed(tmp_path / "a", backbone=meta_path, images=image_folder)["npy"])
    direct = np.load(embed(tmp_path / "b", run_dir=run, images=image_folder)["npy"])
    assert exported.shape == (32, 48)
    np.testing.assert_allclose(exported, direct, atol=1e-5)
    feats = extract_features(ours, EvalImages(_Images(4), 32, [0.5] * 3, [0.25] * 3), batch_size=2)
    assert feats.shape == (4, 48)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8), 0


def test_vit_mean_patch_export_features():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny", 16, 4, 3, depth=1, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for pool in ("cls", "mean_patch"):
            ours = MaskedViT(vit, with_mask_token=False, global_pool=pool)
            torch.testing.assert_close(global_features(vit, {"global_pool": pool}, x), ours(x)["global"])


@pytest.mark.parametrize("override, key", [
    (["model.global_pool=cls"], "model.global_pool"),
    (["data.global_crop_size=36"], "data.global_crop_size"),  # multiple of the patch (4), not of the stride (8)
    (["model.depth=2"], "model.depth"),
    (["model.depths=[2,0]"], "model.depths"),
    (["model.window_size=0"], "model.window_size"),
])
def test_invalid_swin_configs_name_the_key(override, key, tiny_cfg):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg(*SWIN + override)


def test_swin_only_keys_rejected_for_a_vit_and_stride_named(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model\.depths"):
        tiny_cfg("data.root=unused", "model.depths=[2,2]")
    with pytest.raises(ConfigError, match=r"model\.window_size"):
        tiny_cfg("data.root=unused", "model.window_size=7")
    with pytest.raises(ConfigError, match="token stride 8 px"):
        tiny_cfg(*SWIN, "data.local_crop_size=12")


def test_non_swin_v1_arch_is_a_config_error(image_folder, tiny_cfg):
    cfg = tiny_cfg(*SWIN, "model.arch=swinv2_cr_tiny_224", f"data.root={image_folder}")
    with pytest.raises(ConfigError, match=r"model\.arch: 'swinv2_cr_tiny_224' is a SwinTransformerV2Cr"):
        build_networks(cfg)
