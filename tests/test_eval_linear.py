"""Linear probe: lr grid trained together, lr selection, cls4/cls_mean features, cache, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import make_image_folder
from sove.cli import main
from sove.config import load_config
from sove.errors import DataError, SoveError
from sove.eval import features as features_mod
from sove.eval.features import extract_features
from sove.eval.encoder import load_frozen
from sove.eval.features import image_features
from sove.eval.linear import evaluate_linear, head_accuracy, select_lr, train_linear_heads
from sove.models import MaskedViT, create_vit


def blobs(n_per_class: int = 40, dim: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c sits at 4 * e_c plus N(0, 0.3²) noise: linearly separable with a wide margin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 4.0 * torch.eye(dim)[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_labelled_run) -> Path:
    return tiny_labelled_run(tmp_path_factory.mktemp("lin"))


def test_separable_features_reach_100_and_diverged_lr_is_never_chosen():
    x, y = blobs()
    lrs = [0.01, 0.1, 1e38]  # the last one overflows to non-finite weights
    heads = train_linear_heads(x, y, lrs, 3, epochs=20, batch_size=32, progress=False)
    acc = head_accuracy(heads, x, y)
    assert acc[2] is None
    assert acc[0] == (100.0, 100.0) and acc[1] == (100.0, 100.0)
    assert select_lr(acc, lrs) == 0  # a tie goes to the smaller lr
    assert select_lr([(90.0, 99.0), None, (95.0, 99.0), (95.0, 100.0)], [4.0, 3.0, 2.0, 1.0]) == 3
    with pytest.raises(SoveError, match="every learning rate diverged"):
        select_lr([None, None], [1.0, 2.0])


def test_grid_trained_together_equals_each_lr_alone():
    x, y = blobs(n_per_class=30, dim=5, classes=4, seed=1)
    lrs = [0.003, 0.03, 0.3]
    together = train_linear_heads(x, y, lrs, 4, epochs=3, batch_size=16, seed=7, progress=False)
    for lr, head in zip(lrs, together):
        alone = train_linear_heads(x, y, [lr], 4, epochs=3, batch_size=16, seed=7, progress=False)[0]
        assert torch.allclose(head.weight, alone.weight, atol=1e-6)
        assert torch.allclose(head.bias, alone.bias, atol=1e-6)
    # and the heads really differ (each used its own lr)
    assert not torch.allclose(together[0].weight, together[2].weight, atol=1e-3)


def test_cls4_and_cls_mean_match_the_standard_features():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny", img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2)
    cls_model = MaskedViT(vit, with_mask_token=False).eval()
    mean_model = MaskedViT(vit, with_mask_token=False, global_pool="mean_patch").eval()
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(images, torch.zeros(5, dtype=torch.long))
    cls4 = image_features(cls_model, images, "cls4")
    assert cls4.shape == (5, 4 * 32)
    assert torch.allclose(torch.nn.functional.normalize(cls4[:, -32:], dim=1), extract_features(cls_model, data),
                          atol=1e-5)
    # block 1 of 4 by hand: embed -> first block -> final norm -> CLS
    with torch.no_grad():
        first = vit.norm(vit.blocks[0](cls_model.embed(images)))[:, 0]
    assert torch.allclose(cls4[:, :32], first, atol=1e-5)
    cls_mean = image_features(cls_model, images, "cls_mean")
    assert cls_mean.shape == (5, 2 * 32)
    assert torch.allclose(cls_mean[:, :32], cls4[:, -32:], atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(cls_mean[:, 32:], dim=1), extract_features(mean_model, data),
                          atol=1e-5)
    # a 2-block ViT keeps the CLS of its 2 blocks
    shallow = MaskedViT(create_vit("vit_tiny", 16, 4, 3, embed_dim=32, depth=2, num_heads=2), with_mask_token=False)
    assert image_features(shallow.eval(), images, "cls4").shape == (5, 64)


def test_cls4_from_forward_intermediates_equals_the_block_loop():
    """timm's forward_intermediates gives the [CLS] of the last 4 blocks that a hand-written loop over the
    blocks gives (each block's tokens through the final norm, oldest first)."""
    torch.manual_seed(0)
    model = MaskedViT(create_vit("vit_tiny", 16, 4, 3, embed_dim=32, depth=6, num_heads=2), with_mask_token=False)
    model.eval()
    images = torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(2))  # non-square: dynamic size
    with torch.no_grad():
        x, kept = model.embed(images), []
        for i, block in enumerate(model.vit.blocks):
            x = block(x)
            if i >= 2:
                kept.append(model.vit.norm(x)[:, 0])
        reference = torch.cat(kept, dim=1)
        got = image_features(model, images, "cls4")
    assert got.shape == (3, 4 * 32)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


def test_run_end_to_end_cache_and_exported_backbone(tiny_run, monkeypatch, capsys):
    assert main(["eval", "linear", "--run", str(tiny_run), "--epochs", "15", "--batch-size", "8",
                 "--val-fraction", "0.25", "--lrs", "0.01", "0.1", "1"]) == 0
    assert "linear probe (cls4, 64-d) test top-1" in capsys.readouterr().out
    r = json.loads((tiny_run / "eval" / "linear.json").read_text())
    assert (r["num_train"], r["num_val"], r["num_test"], r["feature_dim"]) == (24, 8, 32, 64)
    assert r["val_top1"] == max(v for v in r["val_top1_per_lr"].values()) == r["val_top1_per_lr"][str(r["best_lr"])]
    assert r["top1"] >= 90.0  # dark vs light images
    assert (tiny_run / "eval" / "linear_features_cls4_train.pt").is_file()
    assert r["checkpoint_step"] == 1 and r["inputs"]["settings"]["lrs"] == [0.01, 0.1, 1.0]

    # A re-run reads the cache: extraction is never called, the result is identical.
    def boom(*args, **kwargs):
        raise AssertionError("features were re-extracted")

    monkeypatch.setattr(features_mod, "extract_features", boom)
    again = evaluate_linear(tiny_run, epochs=15, batch_size=8, val_fraction=0.25, lrs=[0.01, 0.1, 1])
    assert again["top1"] == r["top1"] and again["val_top1_per_lr"] == r["val_top1_per_lr"]
    monkeypatch.undo()

    # The exported backbone on the same data gives the same probe.
    assert main(["export", str(tiny_run)]) == 0
    cfg = load_config(str(tiny_run / "config.yaml"))
    exported = evaluate_linear(backbone=tiny_run / "backbone.json", epochs=15, batch_size=8, val_fraction=0.25,
                               lrs=[0.01, 0.1, 1], cache=False,
                               overrides=["data.source=folder", f"data.root={cfg.data.root}",
                                          f"data.test_root={cfg.data.test_root}"])
    assert abs(exported["top1"] - r["top1"]) < 1e-6 and exported["best_lr"] == r["best_lr"]
    assert (tiny_run / "eval" / "linear.json").is_file()  # without --run the output sits next to backbone.json


def test_augment_draws_new_crops_each_epoch(tiny_run):
    from sove.eval.features import eval_split
    from sove.eval.linear import _AugmentedFeatures

    encoder = load_frozen(tiny_run)
    train = eval_split(encoder.cfg, "train")
    feats = _AugmentedFeatures(encoder, train, torch.arange(8), "cls_mean", True, 0, "cpu")
    e0, e1 = feats(0).clone(), feats(1).clone()
    assert e0.shape == (8, 64) and not torch.allclose(e0, e1)
    assert torch.allclose(e0.mean(0), torch.zeros(64), atol=1e-4)  # standardised with epoch-0 statistics
    again = _AugmentedFeatures(encoder, train, torch.arange(8), "cls_mean", True, 0, "cpu")
    assert torch.equal(again(1), e1)  # seeded per epoch
    r = evaluate_linear(tiny_run, features="cls_mean", epochs=2, batch_size=8, val_fraction=0.25, augment=True,
                        lrs=[0.1])
    assert r["augment"] and r["feature_dim"] == 64 and r["best_lr"] == 0.1


def test_errors_name_the_problem(tiny_run, tmp_path, capsys):
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "x")
    flat.mkdir()
    for f in sorted((tmp_path / "x").rglob("*.png"))[:6]:
        f.rename(flat / f"{f.parent.name}_{f.name}")
    with pytest.raises(DataError, match="has no labels"):
        evaluate_linear(tiny_run, epochs=1, overrides=[f"data.root={flat}"])
    assert main(["eval", "linear", "--run", str(tiny_run), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction must be in (0, 1)" in capsys.readouterr().err
    assert main(["eval", "linear"]) == 2
    assert "--run RUN_DIR" in capsys.readouterr().err


def test_test_split_without_a_class_keeps_its_labels(tiny_run, tmp_path):
    """Test split = the train split's 'light' images only, numbered by the train split's class names
    (before: 'light' was class 0 there, i.e. 'dark' for the probe)."""
    shutil.copytree(tiny_run.parent / "images" / "light", tmp_path / "test" / "light")
    r = evaluate_linear(tiny_run, epochs=15, batch_size=8, val_fraction=0.25, lrs=[0.01, 0.1, 1], cache=False,
                        overrides=[f"data.test_root={tmp_path / 'test'}"])
    assert r["num_test"] == 16 and r["top1"] == 100.0  # before: 0.0
