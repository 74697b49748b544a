"""Weighted k-NN (DINO protocol): hand-computed votes, top-5 without zero-vote classes."""

from __future__ import annotations

import math

import torch

from sove.eval.knn import knn_classify


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_hand_computed_weighted_vote():
    # Train points at angles 0, 10 and 90 degrees; labels 0, 1, 1. Test point at 3 degrees, label 0.
    ang = [0.0, 10.0, 90.0]
    train = unit(*[[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ang])
    labels = torch.tensor([0, 1, 1])
    test = unit([math.cos(math.radians(3)), math.sin(math.radians(3))])
    # k=1: nearest is 0 deg -> class 0. k=3: votes exp(cos/T): class 0 gets exp(cos3/T),
    # class 1 gets exp(cos7/T) + exp(cos87/T); with T = 0.07, cos3 = .99863 and cos7 = .99255,
    # exp((.99863-.99255)/.07) = 1.0907 > 1 + tiny, so class 0 still wins... check the k=3 margin:
    c0 = math.exp(math.cos(math.radians(3)) / 0.07)
    c1 = math.exp(math.cos(math.radians(7)) / 0.07) + math.exp(math.cos(math.radians(87)) / 0.07)
    expected_k3 = 100.0 if c0 > c1 else 0.0
    r = knn_classify(train, labels, test, torch.tensor([0]), ks=[1, 3], temperature=0.07)
    assert r["top1"] == {"1": 100.0, "3": expected_k3}
    # With a hotter temperature (T=1) the two class-1 votes outweigh the single class-0 vote.
    r = knn_classify(train, labels, test, torch.tensor([0]), ks=[3], temperature=1.0)
    assert r["top1"]["3"] == 0.0


def test_top5_ignores_classes_without_votes():
    # 10 classes; with k=1 only one class receives a vote. The true class (7) has no vote, so it
    # must not count as a top-5 hit even though zero-vote classes tie inside topk.
    train = unit([1.0, 0.0], [0.0, 1.0])
    labels = torch.tensor([3, 7])
    test = unit([1.0, 0.01])
    r = knn_classify(train, labels, test, torch.tensor([7]), ks=[1], num_classes=10)
    assert r["top1"]["1"] == 0.0 and r["top5"]["1"] == 0.0
    r = knn_classify(train, labels, test, torch.tensor([7]), ks=[2], num_classes=10)
    assert r["top5"]["2"] == 100.0  # with k=2 class 7 gets a vote and is in the top 5


def test_chunking_and_best_k():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    test = torch.nn.functional.normalize(torch.randn(17, 8, generator=g), dim=1)
    tl = torch.randint(0, 4, (17,), generator=g)
    a = knn_classify(train, labels, test, tl, ks=[1, 5, 200], chunk_size=3)
    b = knn_classify(train, labels, test, tl, ks=[1, 5, 200], chunk_size=1000)
    assert a == b
    assert a["best_top1"] == max(a["top1"].values())
    assert a["top1"][str(a["best_k"])] == a["best_top1"]
    # k larger than the train set is capped: k=200 uses all 50 neighbours.
    c = knn_classify(train, labels, test, tl, ks=[50])
    assert c["top1"]["50"] == a["top1"]["200"]


def test_all_modes_in_one_pass_equal_separate_evaluations(tmp_path, tiny_labelled_run):
    """``sove eval knn --all`` reads the images once and gives each mode the result of its own run."""
    import json

    from sove.eval.knn import evaluate_knn, evaluate_knn_modes

    run = tiny_labelled_run(tmp_path)
    both = evaluate_knn_modes(run)
    assert list(both) == ["trained", "random_init", "pixels"]
    for mode, name in (("trained", "knn.json"), ("random_init", "knn_random_init.json"), ("pixels", "knn_pixels.json")):
        assert json.loads((run / "eval" / name).read_text())["top1"] == both[mode]["top1"]
        alone = evaluate_knn(run, mode)
        assert (alone["top1"], alone["top5"], alone["fingerprint"]) == (
            both[mode]["top1"], both[mode]["top5"], both[mode]["fingerprint"]), mode


def test_k_larger_than_the_train_split_is_noted(tmp_path, config_only_run, capsys):
    """k is capped at N_train (all train images vote); the CLI said nothing and printed k=100 as if it were
    a 100-neighbour result. On 2 classes of 16 images each, k=32 and k=100 are the same vote."""
    from helpers import make_image_folder
    from sove.cli import main

    images = make_image_folder(tmp_path / "images")
    run = config_only_run(tmp_path / "run", [f"data.root={images}", f"data.test_root={images}"])
    assert main(["eval", "knn", "--run", str(run), "--pixels", "eval.knn_k=[1,32,100,200]"]) == 0
    out = capsys.readouterr().out
    assert "note: k=100, 200 > 32 train images: these use all 32 train images as neighbours" in out
    result = __import__("json").loads((run / "eval" / "knn_pixels.json").read_text())
    assert result["top1"]["100"] == result["top1"]["200"] == result["top1"]["32"]
