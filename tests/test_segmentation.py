"""Linear segmentation on frozen patch features: hand-computed confusion scores, separable shapes, input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sove.errors import DataError
from sove.eval.segmentation import (confusion_matrix, evaluate_segmentation, predict, segmentation_scores,
                                    train_linear_head)
from test_retrieval import colour_encoder


def test_scores_from_a_hand_computed_confusion_matrix():
    target = torch.tensor([0, 1, 1, 2, 0, 255, 2, 0])
    pred = torch.tensor([0, 0, 1, 2, 2, 1, 0, 3])
    conf = confusion_matrix(pred, target, num_classes=5)
    # rows = true, columns = predicted; the ignored pixel (255) is skipped
    expected = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5])
    assert torch.equal(conf, expected)
    s = segmentation_scores(conf)
    # TP = [1,1,1,0,0], true = [3,2,2,0,0], predicted = [3,1,2,1,0], union = [5,2,3,1,0]
    # IoU = [1/5, 1/2, 1/3, 0, absent] -> mIoU = (1/5 + 1/2 + 1/3 + 0) / 4 = 31/120
    # Acc = [1/3, 1/2, 1/2, absent, absent] -> mAcc = 4/9; pixel accuracy 3/7
    assert s["mIoU"] == pytest.approx(100 * 31 / 120)
    assert s["mAcc"] == pytest.approx(100 * 4 / 9)
    assert s["aAcc"] == pytest.approx(100 * 3 / 7)
    assert s["iou"][3] == 0.0 and s["iou"][4] is None and s["acc"][3] is None


def test_out_of_range_values_are_refused():
    # mmsegmentation drops values outside [0, C) silently; here they raise (a misplaced cell
    # before: prediction 3 with C = 3 was counted as (true 1, predicted 0)).
    target = torch.tensor([0, 1, 255])
    with pytest.raises(ValueError, match=r"^predictions at labelled pixels must be class indices in \[0, 3\); "
                                         r"got 3 \(1 pixel\(s\)\)$"):
        confusion_matrix(torch.tensor([3, 1, 0]), target, 3)
    with pytest.raises(ValueError, match=r"predictions at labelled pixels .* got 255 \(2 pixel"):
        confusion_matrix(torch.tensor([255, 255, 0]), target, 3)  # the ignore index is no prediction
    with pytest.raises(ValueError, match=r"^ground-truth labels other than the ignore index 255 must be class "
                                         r"indices in \[0, 3\); got 7 \(1 pixel\(s\)\)$"):
        confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([7, 1, 255]), 3)
    with pytest.raises(ValueError, match="got -1"):
        confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([-1, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"prediction shape \(2,\) != target shape \(3,\)"):
        confusion_matrix(torch.tensor([0, 1]), target, 3)
    # The prediction at an ignored pixel is never looked at (mmsegmentation masks it out first).
    assert torch.equal(confusion_matrix(torch.tensor([0, 1, 255]), target, 3), torch.diag(torch.tensor([1, 1, 0])))


def test_all_ignored_pixels():
    # An image whose pixels are all ignored adds nothing; alone, every score is NaN
    # (mmsegmentation: aAcc = 0 / 0, mIoU and mAcc = nanmean of all-NaN classes).
    nothing = confusion_matrix(torch.tensor([[0, 2], [1, 1]]), torch.full((2, 2), 255), 3)
    assert torch.equal(nothing, torch.zeros(3, 3, dtype=torch.long))
    s = segmentation_scores(nothing)
    assert math.isnan(s["aAcc"]) and math.isnan(s["mIoU"]) and math.isnan(s["mAcc"])
    assert s["iou"] == [None] * 3 and s["acc"] == [None] * 3
    some = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    assert segmentation_scores(some + nothing) == segmentation_scores(some)
    assert segmentation_scores(some)["aAcc"] == pytest.approx(100 * 2 / 3)


def test_sign_of_a_feature_is_learned_exactly():
    # Precomputed features on a grid as fine as the labels (no upsampling blur): class = sign of
    # feature 0, other features noise. A linear layer separates this exactly -> mIoU = mAcc = 100.
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 8, 8, 4, generator=g)
    feats[..., 0] = feats[..., 0].sign() * (0.5 + feats[..., 0].abs())  # keep a margin around 0
    labels = (feats[..., 0] > 0).long()
    labels[0, :2, :2] = 255  # ignored pixels do not matter
    head = train_linear_head(feats[:8], labels[:8], num_classes=2, epochs=40, lr=0.05, batch_size=4)
    conf = sum(confusion_matrix(predict(head, feats[i], (8, 8)), labels[i], 2) for i in range(8, 12))
    s = segmentation_scores(conf)
    assert s["mIoU"] == pytest.approx(100.0) and s["mAcc"] == pytest.approx(100.0)


RED, GREEN = (255, 0, 0), (0, 255, 0)


def _write_pair(root, split, name, size, width, vertical, ignore_corner=False):
    """A red band (class 1) of ``width`` px on green (class 0); optional 255 pixels in a corner.

    Bands rather than squares: bilinear upsampling of patch logits rounds a square's corners, so
    only straight patch-aligned boundaries can be recovered exactly.
    """
    img = np.zeros((size, size, 3), np.uint8) + np.array(GREEN, np.uint8)
    ann = np.zeros((size, size), np.uint8)
    band = (slice(None), slice(0, width)) if vertical else (slice(0, width), slice(None))
    img[band] = RED
    ann[band] = 1
    if ignore_corner:
        ann[-2:, -2:] = 255
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "images" / split / f"{name}.png")
    Image.fromarray(ann).save(root / "annotations" / split / f"{name}.png")


def make_ade(root):
    for i, width in enumerate([4, 8, 12, 4, 8, 12]):
        _write_pair(root, "training", f"t{i}", 16, width, vertical=i < 3, ignore_corner=i % 2 == 0)
    # Validation at 32 px (bands on the 8-px grid, so the 16-px resize keeps pure-colour patches);
    # the 4x4 logit grid is upsampled to the 32x32 annotation.
    _write_pair(root, "validation", "v0", 32, 16, vertical=True)
    _write_pair(root, "validation", "v1", 32, 8, vertical=False)
    return root



def test_separable_shapes_reach_miou_100(tmp_path):
    root = make_ade(tmp_path / "ade")
    r = evaluate_segmentation(root, out=tmp_path / "seg.json", epochs=30, lr=0.05, batch_size=3,
                              encoder=colour_encoder())
    assert r["num_classes"] == 2 and r["num_train"] == 6 and r["num_val"] == 2
    assert r["mIoU"] == pytest.approx(100.0) and r["mAcc"] == pytest.approx(100.0)
    assert (tmp_path / "seg.json").is_file()
    # reduce_zero_label (ADE20k): background 0 is ignored, the band becomes class 0 -> 1 class.
    r = evaluate_segmentation(root, out=tmp_path / "seg.json", epochs=1, reduce_zero_label=True,
                              encoder=colour_encoder())
    assert r["num_classes"] == 1 and r["mIoU"] == pytest.approx(100.0)


def test_folder_errors(tmp_path):
    root = make_ade(tmp_path / "ade")
    (root / "annotations" / "training" / "t3.png").unlink()
    with pytest.raises(DataError, match=r"image '.*t3.png' has no annotation"):
        evaluate_segmentation(root, out=tmp_path / "s.json", encoder=colour_encoder())
    root = make_ade(tmp_path / "ade2")
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(root / "annotations" / "validation" / "v1.png")
    with pytest.raises(DataError, match=r"v1.png' is 16x10 but its image is 32x32"):
        evaluate_segmentation(root, out=tmp_path / "s.json", epochs=1, encoder=colour_encoder())
    root = tmp_path / "unlabelled"
    (root / "images" / "training").mkdir(parents=True)
    (root / "images" / "validation").mkdir(parents=True)
    with pytest.raises(DataError, match="no annotations folder"):
        evaluate_segmentation(root, out=tmp_path / "s.json", encoder=colour_encoder())
    root = make_ade(tmp_path / "ade3")
    for name in ("v0", "v1"):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "annotations" / "validation" / f"{name}.png")
    with pytest.raises(DataError, match=r"every validation pixel in '.*validation' is ignored \(255\)"):
        evaluate_segmentation(root, out=tmp_path / "s.json", epochs=1, encoder=colour_encoder())
