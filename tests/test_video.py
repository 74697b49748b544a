"""DAVIS label propagation: a moving square tracked from synthetic features and through files; J and F by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sove.errors import DataError
from sove.eval.dense import DenseEncoder
from sove.eval.video import boundary_f_measure, evaluate_video, propagate_labels, region_similarity


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


def test_j_and_f_by_hand():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True  # 16 pixels
    pred = np.zeros((10, 10), bool)
    pred[2:6, 3:7] = True  # shifted one column: intersection 12, union 20
    assert region_similarity(pred, gt) == pytest.approx(12 / 20)
    void = np.zeros((10, 10), bool)
    void[:, 6] = True  # the non-overlapping predicted column is void: 12 / 16
    assert region_similarity(pred, gt, void) == pytest.approx(12 / 16)
    assert region_similarity(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # Tolerance ceil(0.008 * diag(14.1)) = 1 px: a 1-px shift matches every boundary pixel.
    assert boundary_f_measure(pred, gt) == pytest.approx(1.0)
    # Tolerance 1 px on a 2-px shift: only part of each boundary ring (4x4 square minus its 2x2
    # inside) lies within 1 px of the other; the matched fractions come from a brute-force
    # pairwise-distance count, an independent reference.
    pred2 = np.zeros((10, 10), bool)
    pred2[2:6, 4:8] = True
    ring = lambda m: np.argwhere(m & ~np.pad(m, 1)[2:, 1:-1] | m & ~np.pad(m, 1)[:-2, 1:-1]  # noqa: E731
                                 | m & ~np.pad(m, 1)[1:-1, 2:] | m & ~np.pad(m, 1)[1:-1, :-2])
    bp, bg = ring(pred2), ring(gt)
    dist = np.sqrt(((bp[:, None] - bg[None]) ** 2).sum(-1))
    precision, recall = (dist.min(1) <= 1).mean(), (dist.min(0) <= 1).mean()
    assert boundary_f_measure(pred2, gt, tolerance=1) == pytest.approx(2 * precision * recall / (precision + recall))
    assert 0 < precision < 1
    assert boundary_f_measure(pred, np.zeros_like(gt)) == 0.0


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


def _colour_encoder() -> DenseEncoder:
    def forward(x):
        return x.mean(dim=(2, 3)), F.avg_pool2d(x, 4).permute(0, 2, 3, 1)
    return DenseEncoder(forward, patch_size=4, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)


def test_davis_folder_end_to_end(tmp_path):
    root = make_davis(tmp_path / "davis")
    r = evaluate_video(root, out=tmp_path / "video.json", image_size=32, encoder=_colour_encoder())
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
        evaluate_video(tmp_path, out=tmp_path / "v.json", encoder=_colour_encoder())
    root = make_davis(tmp_path / "d")
    for p in (root / "Annotations" / "480p" / "square").iterdir():
        p.unlink()
    (root / "Annotations" / "480p" / "square").rmdir()
    with pytest.raises(DataError, match="no annotations folder .*square"):
        evaluate_video(root, out=tmp_path / "v.json", encoder=_colour_encoder())
    root = make_davis(tmp_path / "e")
    Image.new("RGB", (32, 32)).save(root / "Annotations" / "480p" / "square" / "00000.png")
    with pytest.raises(DataError, match="00000.png' is a RGB colour image"):
        evaluate_video(root, out=tmp_path / "v.json", encoder=_colour_encoder())
