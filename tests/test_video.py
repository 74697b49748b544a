"""DAVIS label propagation: a moving square tracked from synthetic features and through files; J and F by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from sove.errors import DataError
from sove.eval.video import (VOID, _sequence_scores, boundary_f_measure, boundary_map, evaluate_video,
                             propagate_labels, region_similarity)
from test_retrieval import colour_encoder


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_moving_square_features_are_tracked_over_10_frames():
    # 24x24 patch grid, 6x6-patch square moving 1 patch right and down per frame; patches inside
    # the square share one feature vector, background patches another (plus a little noise).
    g = torch.Generator().manual_seed(0)
    rows = cols = 24
    patch = 8
    obj, bg = torch.randn(16, generator=g), torch.randn(16, generator=g)
    masks = torch.zeros(10, rows, cols, dtype=torch.bool)
    for t in range(10):
        masks[t, 3 + t:9 + t, 2 + t:8 + t] = True
    feats = torch.where(masks[..., None], obj, bg) + 0.05 * torch.randn(10, rows, cols, 16, generator=g)
    first = torch.stack([~masks[0], masks[0]]).float()  # (classes, rows, cols)
    soft = propagate_labels(feats, first)
    assert soft.shape == (10, 2, rows, cols)
    assert torch.allclose(soft.sum(1), torch.ones(10, rows, cols), atol=1e-5)  # labels stay distributions
    for t in range(10):
        up = F.interpolate(soft[t][None], scale_factor=patch, mode="bilinear", align_corners=False)[0]
        pred = up.argmax(0).numpy() == 1
        true = np.kron(masks[t].numpy(), np.ones((patch, patch), bool))
        assert _iou(pred, true) >= 0.9, t


def test_propagation_respects_the_spatial_radius():
    # A far-away patch identical to the object must not receive its label when outside the window.
    obj, bg = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = bg.repeat(2, 1, 30, 1)  # (frames, rows=1, cols=30, dim)
    feats[0, 0, 0] = obj  # object at column 0 in frame 0
    feats[1, 0, 29] = obj  # ... reappears at column 29 in frame 1, 29 patches away
    first = torch.zeros(2, 1, 30)
    first[0], first[1, 0, 0], first[0, 0, 0] = 1.0, 1.0, 0.0
    assert propagate_labels(feats, first, radius=12)[1, 1, 0, 29] == 0.0
    assert propagate_labels(feats, first, radius=30)[1, 1, 0, 29] > 0.99


def test_j_by_hand():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True  # 16 pixels
    pred = np.zeros((10, 10), bool)
    pred[2:6, 3:7] = True  # shifted one column: intersection 12, union 20
    assert region_similarity(pred, gt) == pytest.approx(12 / 20)
    void = np.zeros((10, 10), bool)
    void[:, 6] = True  # db_eval_iou: void pixels leave the union -> 12 / 16
    assert region_similarity(pred, gt, void) == pytest.approx(12 / 16)
    assert region_similarity(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def _mask(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def test_boundary_map_is_seg2bmap():
    # seg2bmap (davis2017/metrics.py): a pixel differing from its east, south or south-east
    # neighbour. For a 2x2 square at rows/cols 3-4: the background pixels above and left of it
    # ((2,2) via south-east) and its own right column and bottom row.
    square = _mask((12, 12), slice(3, 5), slice(3, 5))
    expected = {(2, 2), (2, 3), (2, 4), (3, 2), (4, 2), (3, 4), (4, 3), (4, 4)}
    assert {tuple(p) for p in np.argwhere(boundary_map(square))} == expected
    # Image border: the last row compares with its east neighbour only, the last column with its
    # south neighbour only, the bottom-right pixel never; a full mask has no boundary.
    corner = _mask((4, 4), slice(2, 4), slice(2, 4))
    assert {tuple(p) for p in np.argwhere(boundary_map(corner))} == {(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)}
    assert not boundary_map(np.ones((4, 4), bool)).any()


def test_f_measure_reference_values():
    # 12x12 image: tolerance ceil(0.008 * sqrt(12^2 + 12^2) = 0.136) = 1 px, disk(1) = a cross.
    # Ground truth: 2x2 square at (3, 3), boundary of 8 pixels (test above). Prediction: 2 rows x
    # 3 columns at (5, 5), seg2bmap boundary of 10 pixels: (4, 4..7), (5, 4), (6, 4), (5, 7), (6, 5..7).
    # Matched predicted: (4, 4), (4, 5), (5, 4) -> P = 3/10; matched true: (4, 4), (3, 4), (4, 3)
    # -> R = 3/8; F = 2PR / (P + R) = 1/3 (the value of davis2017-evaluation's f_measure).
    gt = _mask((12, 12), slice(3, 5), slice(3, 5))
    pred = _mask((12, 12), slice(5, 7), slice(5, 8))
    assert boundary_f_measure(pred, gt) == pytest.approx(1 / 3)
    assert boundary_f_measure(gt, gt) == 1.0
    # Edge cases of f_measure: both boundaries empty -> 1, exactly one empty -> 0.
    empty, full = np.zeros((12, 12), bool), np.ones((12, 12), bool)
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(pred, empty) == 0.0 and boundary_f_measure(empty, gt) == 0.0
    assert boundary_f_measure(full, empty) == 1.0  # a full mask has no boundary either
    with pytest.raises(ValueError, match="tolerance 1.5 >= 1 is a radius in pixels"):
        boundary_f_measure(pred, gt, tolerance=1.5)


def test_f_measure_void_pixels_leave_both_masks():
    # f_measure masks void out of both masks before taking boundaries. The prediction is the true
    # 2x2 square plus a 2x2 blob at (8, 8) inside the void: with the void, F = 1; without it the
    # blob's 8 boundary pixels are unmatched -> P = 8/16, R = 1, F = 2/3.
    gt = _mask((12, 12), slice(3, 5), slice(3, 5))
    pred = gt | _mask((12, 12), slice(8, 10), slice(8, 10))
    void = _mask((12, 12), slice(7, 11), slice(7, 11))
    assert boundary_f_measure(pred, gt, void) == 1.0
    assert boundary_f_measure(pred, gt) == pytest.approx(2 / 3)


def test_f_measure_matches_a_disk_dilation():
    # The reference dilates each boundary with disk(r) = {x^2 + y^2 <= r^2}
    # (skimage.morphology.disk); recompute F that way on random blobs, tolerance 3 px.
    rng = np.random.default_rng(0)
    lin = np.arange(-3, 4)
    disk = lin[:, None] ** 2 + lin[None] ** 2 <= 9
    for _ in range(5):
        pred, gt = (ndimage.gaussian_filter(rng.random((40, 50)), 2) > 0.5 for _ in range(2))
        bp, bg = boundary_map(pred), boundary_map(gt)
        p = (bp & ndimage.binary_dilation(bg, disk)).sum() / bp.sum()
        r = (bg & ndimage.binary_dilation(bp, disk)).sum() / bg.sum()
        assert 0 < p < 1 and 0 < r < 1
        assert boundary_f_measure(pred, gt, tolerance=3) == pytest.approx(2 * p * r / (p + r))


def test_void_pixels_score_as_background_in_a_sequence(tmp_path):
    # davis2017-evaluation's semi-supervised path sets void (255) to 0 before splitting objects,
    # so its void mask is empty: void pixels are background. Frame 1 (the only one scored: first
    # and last excluded): truth = object 1 on rows 2-5, cols 2-3, void on cols 4-5; prediction =
    # object 1 on rows 2-5, cols 2-5. J = 8/16 (not 8/8). F: truth boundary 12 pixels, prediction
    # 16, 11 matched each way at 1 px -> P = 11/16, R = 11/12, F = 11/14.
    ann = np.zeros((12, 12), np.uint8)
    ann[2:6, 2:4], ann[2:6, 4:6] = 1, VOID
    paths = []
    for t in range(3):
        paths.append(tmp_path / f"{t:05d}.png")
        Image.fromarray(ann).save(paths[-1])
    pred = np.zeros((12, 12), np.int64)
    pred[2:6, 2:6] = 1
    scores = _sequence_scores([pred] * 3, paths, [1])
    assert scores["frames_scored"] == 1
    assert scores["J"]["1"] == pytest.approx(0.5) and scores["F"]["1"] == pytest.approx(11 / 14)


PALETTE = [0, 0, 0, 200, 0, 0] + [0] * 762


def make_davis(root, frames=5, size=32, split="val"):
    """One sequence 'square': an 8x8 red square on grey moving 4 px right per frame, annotated object 1."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("square\n")
    jdir, adir = root / "JPEGImages" / "480p" / "square", root / "Annotations" / "480p" / "square"
    jdir.mkdir(parents=True)
    adir.mkdir(parents=True)
    for t in range(frames):
        img = np.full((size, size, 3), 128, np.uint8)
        ann = np.zeros((size, size), np.uint8)
        img[8:16, 4 + 4 * t:12 + 4 * t] = (255, 0, 0)
        ann[8:16, 4 + 4 * t:12 + 4 * t] = 1
        Image.fromarray(img).save(jdir / f"{t:05d}.jpg", quality=95)
        png = Image.frombytes("P", (size, size), ann.tobytes())
        png.putpalette(PALETTE)
        png.save(adir / f"{t:05d}.png")
    return root



def test_davis_folder_end_to_end(tmp_path):
    root = make_davis(tmp_path / "davis")
    r = evaluate_video(root, out=tmp_path / "video.json", image_size=32, encoder=colour_encoder())
    assert (tmp_path / "video.json").is_file() and r["num_objects"] == 1
    assert r["sequences"]["square"]["frames_scored"] == 3  # frames 1..3 (first and last excluded)
    assert r["J_mean"] >= 90 and r["F_mean"] >= 90
    assert r["JF_mean"] == pytest.approx((r["J_mean"] + r["F_mean"]) / 2)
    for t in range(5):
        out = Image.open(tmp_path / "video_masks" / "square" / f"{t:05d}.png")
        assert out.mode == "P" and out.getpalette()[:6] == PALETTE[:6]
        pred = np.array(out) == 1
        true = np.zeros((32, 32), bool)
        true[8:16, 4 + 4 * t:12 + 4 * t] = True
        assert _iou(pred, true) >= 0.9


def test_davis_layout_errors(tmp_path):
    with pytest.raises(DataError, match=r"ImageSets/2017/val.txt"):
        evaluate_video(tmp_path, out=tmp_path / "v.json", encoder=colour_encoder())
    root = make_davis(tmp_path / "d")
    for p in (root / "Annotations" / "480p" / "square").iterdir():
        p.unlink()
    (root / "Annotations" / "480p" / "square").rmdir()
    with pytest.raises(DataError, match="no annotations folder .*square"):
        evaluate_video(root, out=tmp_path / "v.json", encoder=colour_encoder())
    root = make_davis(tmp_path / "e")
    Image.new("RGB", (32, 32)).save(root / "Annotations" / "480p" / "square" / "00000.png")
    with pytest.raises(DataError, match="00000.png' is a RGB colour image"):
        evaluate_video(root, out=tmp_path / "v.json", encoder=colour_encoder())
