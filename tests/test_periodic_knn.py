"""Periodic k-NN: a seeded class-balanced subset, the offline protocol's value, training untouched."""

from __future__ import annotations

import torch

from sove.eval.features import extract_features
from sove.run import teacher_backbone
from sove.eval.frozen import balanced_subset
from sove.eval.knn import knn_classify, periodic_subsets, subset_labels
from sove.eval.periodic import PeriodicKNN
from sove.train.trainer import Trainer


def test_balanced_subset_gives_every_class_an_equal_share():
    y = torch.tensor([0] * 16 + [1] * 16)  # class-sorted, as an image folder lists its files
    idx = balanced_subset(y, 8, [0, 1])
    assert y[idx].bincount().tolist() == [4, 4]
    assert torch.equal(idx, balanced_subset(y, 8, [0, 1]))  # same seed, same images
    assert not torch.equal(idx, balanced_subset(y, 8, [0, 2]))
    # a class with too few items gives all it has; the others share the rest: 11 = 2 + 5 + 4 (or 2 + 4 + 5)
    y = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    counts = y[balanced_subset(y, 11, 3)].bincount().tolist()
    assert counts[0] == 2 and sorted(counts[1:]) == [4, 5]
    assert balanced_subset(y, 100, 3).tolist() == list(range(22))


def test_periodic_subsets_of_a_class_sorted_folder_hold_both_classes(tmp_path, image_folder, tiny_cfg):
    # image_folder lists 16 'dark' then 16 'light' images: the first 8 are all 'dark'.
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   "eval.knn_train_subset=8", "eval.knn_test_subset=6")
    train, test, description = periodic_subsets(cfg)
    assert subset_labels(train).bincount().tolist() == [4, 4]
    assert subset_labels(test).bincount().tolist() == [3, 3]
    assert description == "class-balanced subset: 8 train / 6 test images of 2 classes, seed 0"
    again = periodic_subsets(cfg)
    assert (again[0].indices, again[1].indices) == (train.indices, test.indices)


def test_periodic_knn_equals_the_offline_protocol_and_leaves_the_rng_alone(tmp_path, image_folder, capsys, tiny_cfg):
    """Also: under trainer.progress=false (TINY) it shows no progress bar (before: a tqdm bar per split on stderr),
    while the offline extractor keeps its bar."""
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   f"trainer.out_dir={tmp_path}", "trainer.name=p", "eval.knn_train_subset=8",
                   "eval.knn_test_subset=6", "eval.knn_every_epochs=1")
    (tmp_path / "p").mkdir()
    trainer = Trainer(cfg, tmp_path / "p")
    logged = {}
    trainer.fabric.log_dict = lambda metrics, step: logged.update(metrics)
    rng = torch.get_rng_state()
    PeriodicKNN().run(trainer)
    assert torch.equal(torch.get_rng_state(), rng)  # the feature loader's seed draw is undone
    out, err = capsys.readouterr()
    assert "periodic k-NN on a class-balanced subset: 8 train / 6 test images of 2 classes, seed 0" in out
    assert "k-NN" not in err and "batch" not in err
    # offline: the teacher saved in checkpoints/last.pt, `sove eval knn` features, the same images
    trainer.save()
    backbone = teacher_backbone(tmp_path / "p", cfg)
    train, test, _ = periodic_subsets(cfg)
    offline = knn_classify(extract_features(backbone, train), subset_labels(train), extract_features(backbone, test),
                           subset_labels(test), list(cfg.eval.knn_k), cfg.eval.knn_temperature)
    assert logged["knn_top1"] == offline["best_top1"]
    assert capsys.readouterr().err.count("features:   0%|") == 2  # the offline extractor's bars (one batch each)
