"""A label means the same class in every split: test labels are numbered by the train split's class names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_image_folder
from sove.config import load_config
from sove.eval.features import eval_splits, labels_of
from sove.eval.knn import evaluate_knn
from sove.eval.periodic import PeriodicKNN

CLASSES = ("a", "b", "c")  # brightness 60, 180, 255 (clipped): separable raw pixels


def pixel_run(config_only_run, tmp_path: Path, test_root: Path) -> Path:
    """Train split a, b, c (4 images each) and ``test_root``, for `sove eval knn --pixels`."""
    train = make_image_folder(tmp_path / "train", num_per_class=4, size=8, classes=CLASSES)
    return config_only_run(tmp_path / "run", [f"data.root={train}", f"data.test_root={test_root}"])


def test_split_without_a_class(tmp_path, config_only_run):
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=CLASSES, seed=1)
    shutil.rmtree(test / "b")
    run = pixel_run(config_only_run, tmp_path, test)
    train_split, test_split = eval_splits(load_config(str(run / "config.yaml")))
    assert test_split.source.classes == train_split.source.classes == list(CLASSES)
    assert labels_of(test_split).tolist() == [0, 0, 0, 2, 2, 2]  # c keeps label 2 (was 1)


def split_without_b(tmp_path: Path, variant: str) -> Path:
    """Test images of classes a and c (3 each); class b absent, or an empty folder (``variant``)."""
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=CLASSES, seed=1)
    shutil.rmtree(test / "b")
    if variant == "empty folder":
        (test / "b").mkdir()
    return test


@pytest.mark.parametrize("variant", ["absent", "empty folder"])
def test_knn_is_100_when_the_test_split_lacks_a_class(tmp_path, variant, config_only_run):
    test = split_without_b(tmp_path, variant)
    result = evaluate_knn(pixel_run(config_only_run, tmp_path, test), "pixels")
    assert result["top1"] == {"1": 100.0, "3": 100.0}  # before: 50.0 (c images labelled as b)
    assert (result["num_train"], result["num_test"]) == (12, 6)


def test_unknown_test_class_is_left_out_with_a_warning(tmp_path, capsys, config_only_run):
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=CLASSES, seed=1)
    (test / "b").rename(test / "d")
    result = evaluate_knn(pixel_run(config_only_run, tmp_path, test), "pixels")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: '{test}': class(es) 'd' (3 images) not in the train split's classes; their 3 images are left out"]
    assert result["top1"] == {"1": 100.0, "3": 100.0} and result["num_test"] == 6
    saved = json.loads((tmp_path / "run" / "eval" / "knn_pixels.json").read_text())
    assert saved["num_test"] == 6


class Brightness(torch.nn.Module):
    """A stand-in backbone: global feature (mean brightness, 1), whose angle separates a, b and c."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"global": torch.stack([x.mean((1, 2, 3)), torch.ones(len(x))], dim=1)}


def periodic_knn(run: Path) -> tuple[list, list]:
    """Run the trainer's periodic k-NN (epoch 1, step 4) with :class:`Brightness`; returns (logged, printed)."""
    logged, printed = [], []
    trainer = SimpleNamespace(
        cfg=load_config(str(run / "config.yaml")), teacher=SimpleNamespace(backbone=Brightness()), run_dir=run,
        step=4, epoch=1, fabric=SimpleNamespace(device="cpu", print=printed.append,
                                                log_dict=lambda d, step: logged.append((step, d))))
    PeriodicKNN().run(trainer)
    return logged, printed


@pytest.mark.parametrize("variant", ["absent", "empty folder"])
def test_periodic_knn_is_100_when_the_test_split_lacks_a_class(tmp_path, variant, config_only_run):
    test = split_without_b(tmp_path, variant)
    logged, printed = periodic_knn(pixel_run(config_only_run, tmp_path, test))
    assert logged == [(4, {"knn_top1": 100.0})]  # before: 50.0
    assert printed == ["periodic k-NN on a class-balanced subset: 12 train / 6 test images of 3 classes, seed 0",
                       "epoch 1: k-NN top-1 100.00% (12 train / 6 test images, best k=1)"]


def test_periodic_knn_drops_unreadable_images_with_their_labels(tmp_path, capsys, config_only_run):
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=CLASSES, seed=1)
    shutil.rmtree(test / "b")
    (test / "a" / "000_bad.png").write_bytes(b"")  # sorted first: a label left behind would shift the others
    run = pixel_run(config_only_run, tmp_path, test)
    logged, printed = periodic_knn(run)
    assert logged == [(4, {"knn_top1": 100.0})]
    assert printed == ["periodic k-NN on a class-balanced subset: 12 train / 7 test images of 3 classes, seed 0",
                       "epoch 1: k-NN top-1 100.00% (12 train / 6 test images, best k=1)"]
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] == [
        f"warning: test split: skipped 1 unreadable file of 7 (list in {run / 'eval' / 'unreadable_test.txt'}); "
        "6 images used"]
