"""Odd and bad image files: one decoder for every mode; unreadable files never stop pretraining."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sove.data import ImageFolder, MultiCropAugmentation, SSLDataset, collate_views, decode_image
from sove.errors import DataError, SoveError

RGB = (30, 120, 200)
RED, BLUE = (220, 20, 20), (20, 20, 220)
# name -> (height, width) once decoded (EXIF rotation applied)
GOOD = {
    "gray.png": (5, 6), "rgba.png": (2, 2), "palette.png": (1, 2), "cmyk.jpg": (8, 8),
    "deep16.png": (2, 2), "rotated.jpg": (16, 8), "tiny.png": (3, 3), "large.jpg": (3000, 4000),
    "UPPER.JPG": (4, 5), "photo.webp": (6, 7),
}
BAD = {"truncated.jpg": "truncated or corrupt", "empty.jpg": "empty file",
       "notes.png": "not an image"}


def _write_all(folder: Path) -> None:
    """One file of each odd kind, plus bad files and hidden junk, in ``folder``."""
    Image.new("L", (6, 5), 77).save(folder / "gray.png")
    rgba = np.array([[[0, 0, 0, 0], [0, 0, 255, 128]],  # fully and half transparent
                     [[*RED, 255], [*RED, 255]]], dtype=np.uint8)
    Image.fromarray(rgba).save(folder / "rgba.png")
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.save(folder / "palette.png", transparency=0)  # index 0 (black) is transparent
    Image.new("RGB", (8, 8), RGB).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.array([[65535, 32768], [0, 256]], dtype=np.uint16)).save(
        folder / "deep16.png")
    sideways = Image.new("RGB", (16, 8), RED)  # 16 wide, 8 high: left half red, right blue
    sideways.paste(BLUE, (8, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    sideways.save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (3, 3), RGB).save(folder / "tiny.png")
    Image.new("RGB", (4000, 3000), RGB).save(folder / "large.jpg")
    Image.new("RGB", (5, 4), RED).save(folder / "UPPER.JPG")
    Image.new("RGB", (7, 6), RGB).save(folder / "photo.webp", lossless=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.jpg")
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("these are notes, not a picture\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "readme.txt").write_text("not listed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("odd")
    _write_all(path)
    return path


def _decode(folder: Path, name: str, num_channels: int = 3) -> torch.Tensor:
    return decode_image(folder / name, num_channels)


def test_listing_skips_hidden_and_keeps_upper_case_and_webp(folder):
    ds = ImageFolder(folder, num_channels=3)
    assert [f.name for f in ds.files] == sorted([*GOOD, *BAD])
    assert [ds.path(i) for i in range(len(ds))] == ds.files
    assert ds.path(0) == folder / "UPPER.JPG"


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode_to_shape(folder, name, num_channels):
    image = _decode(folder, name, num_channels)
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (num_channels, *GOOD[name])


def test_grayscale_to_rgb_and_back(folder):
    assert torch.all(_decode(folder, "gray.png", 3) == 77)
    assert torch.all(_decode(folder, "gray.png", 1) == 77)


def test_transparency_composited_over_white(folder):
    rgba = _decode(folder, "rgba.png")  # (3, 2, 2)
    assert rgba[:, 0, 0].tolist() == [255, 255, 255]  # fully transparent black -> white
    assert rgba[:, 0, 1].tolist() == [127, 127, 255]  # half-transparent blue over white
    assert rgba[:, 1, 0].tolist() == list(RED) and rgba[:, 1, 1].tolist() == list(RED)
    palette = _decode(folder, "palette.png")  # (3, 1, 2)
    assert palette[:, 0, 0].tolist() == [255, 255, 255]
    assert palette[:, 0, 1].tolist() == [0, 200, 0]
    assert _decode(folder, "rgba.png", 1)[0, 0, 0] == 255


def test_cmyk_jpeg_to_rgb(folder):
    image = _decode(folder, "cmyk.jpg")
    assert image.shape == (3, 8, 8)
    error = (image.float() - torch.tensor(RGB, dtype=torch.float32).view(3, 1, 1)).abs()
    assert error.max() <= 6


def test_16_bit_png_scaled_by_bit_depth(folder):
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    assert _decode(folder, "deep16.png", 1)[0].tolist() == [[255, 128], [0, 1]]
    assert _decode(folder, "deep16.png", 3)[:, 0, 1].tolist() == [128, 128, 128]


def test_exif_orientation_applied(folder):
    image = _decode(folder, "rotated.jpg")  # stored (3, 8, 16), displayed (3, 16, 8)
    assert image.shape == (3, 16, 8)
    top, bottom = image[:, 2, 4].tolist(), image[:, 13, 4].tolist()  # left half was red
    assert top[0] > 180 and top[2] < 60 and bottom[2] > 180 and bottom[0] < 60


def test_large_image_decodes(folder):
    image = _decode(folder, "large.jpg")
    assert image.shape == (3, 3000, 4000)
    assert (image[:, ::500, ::500].float().mean((1, 2)) - torch.tensor(RGB)).abs().max() <= 3


def test_over_decompression_bomb_limit_is_a_data_error(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100), RGB).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # hard limit 2000 < 10000 pixels
    with pytest.raises(DataError, match="huge.png.*decompression-bomb"):
        decode_image(tmp_path / "huge.png", 3)


def test_multicrop_of_3x3_image(folder):
    aug = MultiCropAugmentation(16, 8, num_local_crops=3, num_channels=3, mean=(0.5,),
                                std=(0.5,), color_jitter=0.0, grayscale_p=0.0, solarize_p=0.0)
    views = aug(_decode(folder, "tiny.png"))
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    expected = (torch.tensor(RGB, dtype=torch.float32) / 255 - 0.5) / 0.5  # constant image
    for view in views:
        torch.testing.assert_close(view.amin((1, 2)), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(view.amax((1, 2)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_raises_naming_path_and_reason(folder, name):
    pattern = f"cannot decode image '{re.escape(str(folder / name))}': {BAD[name]}"
    with pytest.raises(DataError, match=pattern) as info:
        decode_image(folder / name, 3)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=pattern):
        ImageFolder(folder, num_channels=1)[ImageFolder(folder).files.index(folder / name)]


def test_file_deleted_after_listing(tmp_path):
    Image.new("L", (2, 2), 1).save(tmp_path / "gone.png")
    ds = ImageFolder(tmp_path, num_channels=1)
    (tmp_path / "gone.png").unlink()
    with pytest.raises(DataError, match="gone.png': cannot read the file \\(No such file"):
        ds[0]


def _ssl(root: Path, on_error: str) -> SSLDataset:
    aug = MultiCropAugmentation(8, 4, num_local_crops=1, num_channels=3)
    return SSLDataset(ImageFolder(root, num_channels=3), aug, patch_size=4, on_error=on_error)


def test_skip_returns_only_good_images_and_names_the_bad(folder):
    ds = _ssl(folder, "skip")
    names = [f.name for f in ds.source.files]
    items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        if names[i] in BAD:  # no two bad files are adjacent: the next one is used
            assert item["index"] == (i + 1) % len(ds) and len(item["skipped"]) == 1
            assert f"'{folder / names[i]}': {BAD[names[i]]}" in item["skipped"][0]
        else:
            assert item["index"] == i and item["skipped"] == []
        assert names[item["index"]] in GOOD
        assert [tuple(c.shape) for c in item["crops"]] == [(3, 8, 8)] * 2 + [(3, 4, 4)]
    with pytest.raises(IndexError):  # no wrap-around past the end: iteration stops
        ds[len(ds)]
    batch = collate_views(items)
    assert len(batch["skipped"]) == 3
    mentioned = Counter(name for message in batch["skipped"] for name in BAD
                        if f"'{folder / name}'" in message)
    assert mentioned == Counter(list(BAD))  # each bad file named exactly once
    assert not {names[i] for i in batch["index"].tolist()} & set(BAD)


def test_raise_stops_at_first_bad_file(folder):
    ds = _ssl(folder, "raise")
    first_bad = next(f for f in ds.source.files if f.name in BAD)
    assert first_bad.name == "empty.jpg"
    with pytest.raises(DataError, match=f"'{re.escape(str(first_bad))}': empty file"):
        for i in range(len(ds)):
            assert ds[i]["skipped"] == []


def test_skip_gives_up_after_consecutive_failures(tmp_path, monkeypatch):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_text("not an image")
    Image.new("RGB", (4, 4), RGB).save(tmp_path / "d.png")
    monkeypatch.setattr("sove.data.multicrop.MAX_CONSECUTIVE_FAILURES", 2)
    ds = _ssl(tmp_path, "skip")
    first = re.escape(str(tmp_path / "a.png"))
    with pytest.raises(DataError, match=f"2 images in a row from index 0 .*'{first}'"):
        ds[0]
    item = ds[2]
    assert item["index"] == 3 and len(item["skipped"]) == 1 and "c.png" in item["skipped"][0]


def test_on_error_is_validated(folder):
    with pytest.raises(ValueError, match="on_error must be one of skip, raise, got 'ignore'"):
        _ssl(folder, "ignore")


def test_pretraining_on_the_odd_folder_skips_and_reports(folder, tmp_path, capsys, tiny_cfg):
    """One training epoch over every odd kind: good files train, the 3 bad ones are named."""
    from sove.api import pretrain

    # 10 good + 3 bad files, batch 8: one step per epoch over 13 listed files; feature sets the
    # single step fills (8 rows).
    cfg = tiny_cfg(f"data.root={folder}", f"trainer.out_dir={tmp_path}", "trainer.name=odd",
                   "optim.epochs=1", "data.local_crop_size=8", "loss.cls_feature_set_size=8",
                   "loss.cls.num_anchors=4", "loss.patch_feature_set_size=8",
                   "loss.patch.num_anchors=4")
    run = pretrain(cfg).path
    out = capsys.readouterr().out
    report = [line for line in out.splitlines() if "unreadable" in line]
    # The shuffled first batch of 8 holds some of the bad files; each one it met is listed once.
    listed = (run / "unreadable_train.txt").read_text().splitlines()
    n = len(listed)
    assert report == [f"epoch 0: skipped {n} unreadable file{'s' if n > 1 else ''} of 13 (list in "
                      f"{run / 'unreadable_train.txt'}); {13 - n} images used (data.on_error=skip)"]
    assert n >= 1 and all(any(f"'{folder / name}': {BAD[name]}" in m for name in BAD) for m in listed)


def test_pretraining_with_on_error_raise_stops_at_a_bad_file(folder, tmp_path, tiny_cfg):
    from sove.errors import DataError
    from sove.api import pretrain

    cfg = tiny_cfg(f"data.root={folder}", f"trainer.out_dir={tmp_path}", "trainer.name=raise",
                   "optim.epochs=2", "data.on_error=raise", "loss.cls_feature_set_size=8",
                   "loss.cls.num_anchors=4", "loss.patch_feature_set_size=8",
                   "loss.patch.num_anchors=4")
    with pytest.raises(DataError, match="|".join(BAD)):
        pretrain(cfg)


def _bad_file_run(config_only_run, tmp_path: Path) -> Path:
    """Train a, b, c (4 images each) + a/000_bad.png, sorted first (a label left behind would shift
    every later one); test a, c (3 each) + c/bad.png; a config-only run for `sove eval knn --pixels`."""
    from helpers import make_image_folder

    train = make_image_folder(tmp_path / "train", num_per_class=4, size=8, classes=("a", "b", "c"))
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=("a", "b", "c"), seed=1)
    shutil.rmtree(test / "b")
    (train / "a" / "000_bad.png").write_bytes(b"")
    (test / "c" / "bad.png").write_text("not an image")
    return config_only_run(tmp_path / "run", [f"data.root={train}", f"data.test_root={test}"])


def test_eval_skips_unreadable_files_with_their_labels(tmp_path, capsys, config_only_run):
    from sove.eval.knn import evaluate_knn

    run = _bad_file_run(config_only_run, tmp_path)
    result = evaluate_knn(run, "pixels")  # data.on_error=skip (default); before: stopped at 000_bad.png
    assert result["top1"] == {"1": 100.0, "3": 100.0} and (result["num_train"], result["num_test"]) == (12, 6)
    lists = run / "eval" / "unreadable_train.txt", run / "eval" / "unreadable_test.txt"
    assert capsys.readouterr().err.splitlines() == [
        f"warning: train split: skipped 1 unreadable file of 13 (list in {lists[0]}); 12 images used",
        f"warning: test split: skipped 1 unreadable file of 7 (list in {lists[1]}); 6 images used"]
    assert lists[0].read_text() == f"cannot decode image '{tmp_path / 'train/a/000_bad.png'}': empty file (0 bytes)\n"
    assert lists[1].read_text() == (f"cannot decode image '{tmp_path / 'test/c/bad.png'}': not an image in a "
                                    "format Pillow can read\n")


def test_eval_with_on_error_raise_stops_naming_the_file(tmp_path, config_only_run):
    from sove.eval.knn import evaluate_knn

    run = _bad_file_run(config_only_run, tmp_path)
    bad = re.escape(str(tmp_path / "train/a/000_bad.png"))
    with pytest.raises(DataError, match=f"^cannot decode image '{bad}': empty file \\(0 bytes\\); data.on_error=raise "
                                        "stops at the first unreadable image; data.on_error=skip leaves such files out$"):
        evaluate_knn(run, "pixels", ["data.on_error=raise"])


class _SecondUnreadable:
    """A source of 2 images whose second one cannot be decoded."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 1:
            raise DataError("cannot decode image 'x.png': empty file (0 bytes)")
        return torch.zeros(3, 4, 4, dtype=torch.uint8), 0


def test_cached_unreadable_rows_follow_on_error_and_nan_features_stop():
    from sove.eval.features import EvalImages, batch_features, readable_rows

    cached = torch.tensor([[1.0, 0.0], [float("nan")] * 2])  # row 1 was unreadable when it was cached
    dataset = EvalImages(_SecondUnreadable(), 4, [0.5] * 3, [0.25] * 3, on_error="raise")
    with pytest.raises(DataError, match="^cannot decode image 'x.png': empty file \\(0 bytes\\); data.on_error=raise"):
        readable_rows(cached, dataset, "test", "unused")
    images = torch.stack([dataset[0][0], torch.full((3, 4, 4), float("nan"))])  # readable, unreadable marker
    out = batch_features(lambda x: x.flatten(1)[:, :2] + 1.0, images)
    assert out[0].tolist() == [-1.0, -1.0] and out[1].isnan().all()
    with pytest.raises(SoveError, match="non-finite \\(NaN/inf\\) features for readable images"):
        batch_features(lambda x: x.flatten(1)[:, :2] / 0.0, images)


def test_skip_report_counts_each_file_once(tmp_path):
    """One bad file met in 2 epochs and again as a neighbour's replacement counts once."""
    from types import SimpleNamespace

    from sove.train.trainer import Trainer

    printed = []
    bad = ["cannot decode image '/d/x.png': empty file (0 bytes)", "cannot decode image '/d/y.png': empty file"]
    trainer = SimpleNamespace(skipped=[bad[0], bad[1], bad[1]], unreadable={}, dataset=range(33), run_dir=tmp_path,
                              epoch=0, fabric=SimpleNamespace(is_global_zero=True, print=printed.append))
    Trainer.report_skipped(trainer)
    trainer.epoch, trainer.skipped = 1, [bad[1], bad[0]]
    Trainer.report_skipped(trainer)  # nothing new: nothing printed
    assert printed == [f"epoch 0: skipped 2 unreadable files of 33 (list in {tmp_path / 'unreadable_train.txt'}); "
                       "31 images used (data.on_error=skip)"]  # before: 3, then 2 again
    assert (tmp_path / "unreadable_train.txt").read_text() == bad[0] + "\n" + bad[1] + "\n"
