"""Concept browser, purity, curves, `sove embed` (issue: see what SOVE learned)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sove.cli import main
from sove.config import load_config
from sove.eval.knn import knn_classify
from sove.method import select_judges
from sove.method.sove import feature_set_state
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain
from sove.viz.concepts import concept_purity


@pytest.fixture
def run(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   f"trainer.out_dir={tmp_path}", "trainer.name=v")
    return pretrain(cfg).path


def test_purity_by_hand():
    # Feature set of 6 rows on a circle; anchors 0 and 3; 2 neighbours each.
    angles = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.05, 2.9])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    concepts = select_judges(features, torch.tensor([0, 3]), num_judges=3)
    assert concepts.judge_index.tolist() == [[0, 1, 2], [3, 4, 5]]
    labels = torch.tensor([7, 7, 8, 5, 5, 5])
    # concept 0: judges 1 (7 = 7) and 2 (8 != 7) -> 1/2; concept 1: both match -> 2/2; mean 3/4.
    assert concept_purity(concepts, labels) == 0.75
    # a concept touching an unknown row (-1: random initial row) is left out: only concept 1 counts.
    assert concept_purity(concepts, torch.tensor([7, -1, 8, 5, 5, 5])) == 1.0
    assert concept_purity(concepts, torch.full((6,), -1)) is None


def test_concepts_json_equals_the_loss_concepts(run, capsys):
    assert main(["concepts", str(run), "--num", "4"]) == 0
    out = json.loads((run / "eval" / "concepts.json").read_text())
    assert (run / "plots" / "concepts.png").stat().st_size > 1000
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    fs = feature_set_state(state, "cls")
    cfg = load_config(str(run / "config.yaml"))
    # The same anchors as the loss at that step (explicit generator), then select_judges directly.
    from sove.method import draw_anchors
    from sove.seeding import generator

    g = generator(cfg.trainer.seed, "anchors", state["step"], 0, 0)
    anchors = draw_anchors(fs["features"].shape[0], cfg.loss.cls.num_anchors, g)
    ref = select_judges(fs["features"], anchors, num_judges=cfg.loss.cls.num_judges,
                        smoothing=cfg.loss.cls.smoothing, label_mode=cfg.loss.cls.label_mode)
    for c, concept in enumerate(out["concepts"]):
        judges = concept["judges"]
        assert judges[0]["anchor"] and judges[0]["row"] == int(anchors[c])
        expected = {int(r): float(w) for r, w in zip(ref.judge_index[c], ref.weights[c])}
        assert {j["row"]: j["weight"] for j in judges} == pytest.approx(expected, abs=1e-7)
        assert [j["dataset_index"] for j in judges] == [int(fs["indices"][j["row"]]) for j in judges]
        weights = [j["weight"] for j in judges[1:]]
        assert weights == sorted(weights, reverse=True)  # judges shown by weight
    assert all(0.0 <= out[k] <= 1.0 for k in ("purity", "purity_clean", "purity_random_init"))
    assert "concept purity" in capsys.readouterr().out


def test_purity_and_curves_are_logged(run):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    purities = [float(r["concept_purity"]) for r in rows if r.get("concept_purity")]
    assert purities and all(0.0 <= p <= 1.0 for p in purities)
    assert (run / "plots" / "curves.png").stat().st_size > 1000  # drawn at the end of pretraining


def test_embed_split_matches_eval_knn(run):
    assert main(["eval", "knn", "--run", str(run)]) == 0
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert main(["embed", "--run", str(run), "--split", "train", "--out", str(run / "emb" / "train")]) == 0
    assert main(["embed", "--run", str(run), "--split", "test", "--out", str(run / "emb" / "test")]) == 0
    train, test = np.load(run / "emb" / "train.npy"), np.load(run / "emb" / "test.npy")
    assert train.shape == (32, 32) and test.shape == (32, 32)
    names = [r["label"] for r in csv.DictReader(open(run / "emb" / "test.csv"))]
    assert names == ["dark"] * 16 + ["light"] * 16  # class names, not numbers
    labels = lambda p: torch.tensor([["dark", "light"].index(r["label"]) for r in csv.DictReader(open(p))])  # noqa
    r = knn_classify(torch.from_numpy(train), labels(run / "emb" / "train.csv"), torch.from_numpy(test),
                     labels(run / "emb" / "test.csv"), ks=[1, 3])
    assert r["top1"] == knn["top1"]


def test_embed_folder_with_an_unreadable_file(run, tmp_path, image_folder, capsys):
    bad = image_folder / "dark" / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["embed", "--run", str(run), "--images", str(image_folder), "--out", str(tmp_path / "e")]) == 0
    listing = tmp_path / "e.unreadable.txt"
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'e.npy'} (32, 32) and {tmp_path / 'e.csv'}; skipped 1 unreadable file of 33 "
        f"(list in {listing}); 32 images used"]
    assert listing.read_text() == f"cannot decode image '{bad}': not an image in a format Pillow can read\n"
    assert np.load(tmp_path / "e.npy").shape == (32, 32)
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert len(rows) == 32 and not any("broken" in r["item"] for r in rows)
    assert [r["label"] for r in rows] == ["dark"] * 16 + ["light"] * 16  # labels dropped with the image
    # data.on_error=raise (here --on-error raise) stops at the file, naming it
    assert main(["embed", "--run", str(run), "--images", str(image_folder), "--out", str(tmp_path / "r"),
                 "--on-error", "raise"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sove: error: cannot decode image '{bad}': not an image in a format Pillow can read; data.on_error=raise "
        "stops at the first unreadable image; data.on_error=skip leaves such files out")
    assert not (tmp_path / "r.npy").exists()


def test_periodic_knn_is_logged_each_epoch(tmp_path, image_folder, tiny_cfg):
    cfg = tiny_cfg(f"data.root={image_folder}", f"data.test_root={image_folder}",
                   f"trainer.out_dir={tmp_path}", "trainer.name=p", "eval.knn_every_epochs=1")
    run = pretrain(cfg).path
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("knn_top1")]
    assert [int(r["step"]) for r in rows] == [4, 8]  # after each of the 2 epochs
    assert all(0.0 <= float(r["knn_top1"]) <= 100.0 for r in rows)


def test_periodic_knn_without_labels_warns(tmp_path, capsys, tiny_cfg):
    from helpers import make_image_folder

    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "nested")
    flat.mkdir()
    for i, p in enumerate(sorted((tmp_path / "nested").rglob("*.png"))):
        p.rename(flat / f"{i}.png")
    cfg = tiny_cfg(f"data.root={flat}", f"trainer.out_dir={tmp_path}", "trainer.name=w",
                   "eval.knn_every_epochs=1", "trainer.max_steps=4")
    pretrain(cfg)
    assert "periodic k-NN skipped" in capsys.readouterr().out
