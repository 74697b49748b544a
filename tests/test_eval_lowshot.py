"""Low-shot protocol: class-balanced seeded subsets, subset files, k-NN + logistic regression (Tab. A.1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder
from sove.cli import main
from sove.data import ImageFolder
from sove.errors import DataError, SoveError
from sove.eval.frozen import stratified_subset
from sove.eval.lowshot import LOGREG_CS, evaluate_lowshot, lowshot_classify, read_subset_file


class IndexSource:
    """A source without files (like Fashion-MNIST): identifiers ``train/<index>``."""

    def __len__(self) -> int:
        return 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_labelled_run) -> Path:
    return tiny_labelled_run(tmp_path_factory.mktemp("low"))


def test_subset_is_class_balanced_exact_and_seeded():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 20)
    sub = stratified_subset(labels, 0.10, seed=0)
    assert torch.bincount(labels[sub]).tolist() == [10, 5, 2]
    assert torch.equal(sub, stratified_subset(labels, 0.10, seed=0))
    assert not torch.equal(sub, stratified_subset(labels, 0.10, seed=1))
    assert len(set(sub.tolist())) == len(sub) and torch.equal(sub, sub.sort().values)
    # 1%: round(1.0)=1, round(0.5)=0 -> at least one, round(0.2)=0 -> at least one
    assert torch.bincount(labels[stratified_subset(labels, 0.01, seed=0)]).tolist() == [1, 1, 1]
    assert len(stratified_subset(labels, 1.0, seed=3)) == 170
    # the validation split of the linear probe leaves every class one item to fit
    assert torch.bincount(labels[stratified_subset(labels, 0.99, 0, leave_one=True)]).tolist() == [99, 49, 19]


def test_trivially_separable_subset_gives_100():
    # Classes sit on orthogonal axes (with small noise); only the subset rows are labelled.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(30)
    x = torch.nn.functional.normalize(torch.eye(4)[y] + 0.05 * torch.randn(90, 4, generator=g), dim=1)
    yt = torch.arange(3).repeat_interleave(10)
    xt = torch.nn.functional.normalize(torch.eye(4)[yt] + 0.05 * torch.randn(30, 4, generator=g), dim=1)
    subset = stratified_subset(y, 0.2, seed=0)  # 6 per class
    r = lowshot_classify(x, y, xt, yt, subset, ks=[1, 5], temperature=0.07)
    assert r["num_labelled"] == 18
    assert r["knn_top1"] == {"1": 100.0, "5": 100.0} and r["logreg_top1"] == 100.0
    assert set(r["logreg_val_top1"]) == {str(c) for c in LOGREG_CS} and r["logreg_C"] in LOGREG_CS


def test_logreg_uses_only_the_subset_labels():
    # Rows outside the subset carry wrong labels; they must not matter.
    g = torch.Generator().manual_seed(1)
    y = torch.arange(2).repeat_interleave(20)
    x = torch.nn.functional.normalize(torch.eye(2)[y] + 0.05 * torch.randn(40, 2, generator=g), dim=1)
    subset = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23])
    noisy = 1 - y
    noisy[subset] = y[subset]
    r = lowshot_classify(x, noisy, x, y, subset, ks=[1])
    assert r["knn_top1"]["1"] == 100.0 and r["logreg_top1"] == 100.0


def test_subset_file_identifiers_and_errors(tmp_path):
    f = tmp_path / "1percent.txt"
    f.write_text("# labelled\ntrain/3\n\ntrain/0\n")
    assert read_subset_file(f, IndexSource()).tolist() == [0, 3]
    f.write_text("train/3\ntrain/1\ntrain/10\n")
    with pytest.raises(SoveError, match=rf"{f}:3: 'train/10' is not an item of the train split"):
        read_subset_file(f, IndexSource())
    f.write_text("train/3\ntrain/3\n")
    with pytest.raises(SoveError, match=rf"{f}:2: 'train/3' is listed twice \(first on line 1\)"):
        read_subset_file(f, IndexSource())
    with pytest.raises(SoveError, match="not found"):
        read_subset_file(tmp_path / "missing.txt", IndexSource())
    f.write_text("\n# nothing\n")
    with pytest.raises(SoveError, match="lists no image"):
        read_subset_file(f, IndexSource())
    # Image folders: a path relative to data.root, or a bare file name when it is unique.
    images = make_image_folder(tmp_path / "images", num_per_class=3, size=8)
    (images / "light" / "only_here.png").write_bytes((images / "light" / "img_000.png").read_bytes())
    source = ImageFolder(images)
    f.write_text("dark/img_001.png\nonly_here.png\n")
    assert [source.path(i).relative_to(images).as_posix() for i in read_subset_file(f, source)] == [
        "dark/img_001.png", "light/only_here.png"]
    f.write_text("dark/img_001.png\nimg_002.png\n")  # img_002.png exists in both classes: ambiguous
    with pytest.raises(SoveError, match=rf"{f}:2: 'img_002.png'"):
        read_subset_file(f, source)


def test_run_end_to_end_full_subset_equals_knn(tiny_run, tmp_path, capsys):
    assert main(["eval", "knn", "--run", str(tiny_run)]) == 0
    knn = json.loads((tiny_run / "eval" / "knn.json").read_text())
    assert main(["eval", "lowshot", "--run", str(tiny_run), "--percent", "25", "100"]) == 0
    out = capsys.readouterr().out
    assert "low-shot test top-1 (32 test): 25% (8 labelled): k-NN" in out and "100% (32 labelled)" in out
    r = json.loads((tiny_run / "eval" / "lowshot.json").read_text())
    assert r["subsets"]["25"]["num_labelled"] == 8 and r["subsets"]["25"]["percent"] == 25.0
    assert r["subsets"]["100"]["knn_top1"] == knn["top1"]  # all of train labelled = the k-NN protocol
    assert r["subsets"]["25"]["seed"] == 0 and r["subsets"]["25"]["subset_file"] is None
    # a subset file instead of percents
    f = tmp_path / "list.txt"
    f.write_text("dark/img_000.png\ndark/img_005.png\nlight/img_000.png\nlight/img_009.png\n")
    r = evaluate_lowshot(tiny_run, subset_files=[str(f)])
    assert r["subsets"][str(f)]["num_labelled"] == 4 and r["subsets"][str(f)]["percent"] == 12.5
    # provenance: the checkpoint step, the same weights as knn.json, the subset file's content
    assert r["checkpoint_step"] == 1 and r["weights_sha256"] == knn["weights_sha256"]
    assert r["inputs"]["settings"]["subset_files_sha256"] == {str(f): hashlib.sha256(f.read_bytes()).hexdigest()}


def test_errors_name_the_problem(tiny_run, tmp_path, capsys):
    for bad in ("0", "150"):
        assert main(["eval", "lowshot", "--run", str(tiny_run), "--percent", bad]) == 2
        assert f"--percent must be in (0, 100], got {bad}" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(make_image_folder(tmp_path / "x", num_per_class=2).rglob("*.png"))):
        f.rename(flat / f"{i}.png")
    with pytest.raises(DataError, match="has no labels"):
        evaluate_lowshot(tiny_run, overrides=[f"data.root={flat}"])
    assert main(["eval", "lowshot", "--run", str(tiny_run), "--subset-file", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' not found" in capsys.readouterr().err


def test_test_split_without_a_class_keeps_its_labels(tiny_run, tmp_path):
    """Test split = the train split's 'light' images only: 1-NN finds each image itself (100%); before
    the labels were taken from the train split's class names, 'light' was numbered 0 there (0%)."""
    shutil.copytree(tiny_run.parent / "images" / "light", tmp_path / "test" / "light")
    r = evaluate_lowshot(tiny_run, percents=[100], cache=False,
                         overrides=[f"data.test_root={tmp_path / 'test'}", "eval.knn_k=[1]"])
    assert r["num_test"] == 16 and r["subsets"]["100"]["knn_top1"] == {"1": 100.0}


def test_unreadable_image_is_left_out_with_its_label_also_from_cache(tiny_run, tmp_path, capsys, monkeypatch):
    data = shutil.copytree(tiny_run.parent / "images", tmp_path / "images")
    (data / "dark" / "000_broken.png").write_bytes(b"")  # sorted first: a left-behind label shifts all others
    listing = tmp_path / "list.txt"
    listing.write_text("dark/000_broken.png\ndark/img_000.png\nlight/img_000.png\n")
    overrides = [f"data.root={data}", f"data.test_root={data}", "eval.knn_k=[1]"]
    r = evaluate_lowshot(tiny_run, percents=[100], overrides=overrides)  # extracts, caches NaN marker rows
    assert (r["num_train"], r["num_test"]) == (32, 32) and r["subsets"]["100"]["knn_top1"] == {"1": 100.0}
    monkeypatch.setattr("sove.eval.features.extract_features", None)  # the second run reads the cached features
    r = evaluate_lowshot(tiny_run, subset_files=[str(listing)], overrides=overrides)
    assert r["subsets"][str(listing)]["num_labelled"] == 2 and r["subsets"][str(listing)]["percent"] == 6.25
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert err == [f"warning: {split} split: skipped 1 unreadable file of 33 (list in "
                   f"{tiny_run / 'eval' / f'unreadable_{split}.txt'}); 32 images used"
                   for _ in range(2) for split in ("train", "test")]
    assert (tiny_run / "eval" / "unreadable_test.txt").read_text() == (  # read again for the reason
        f"cannot decode image '{data / 'dark' / '000_broken.png'}': empty file (0 bytes)\n")
