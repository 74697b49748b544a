"""Shards (`sove shard`, data.source=shards): same items as the folder, exact resume, disjoint ranks, eval/embed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import make_image_folder
from sove.cli import main
from sove.config import load_config
from sove.data import ImageFolder
from sove.data.shards import ShardSource, write_shards
from sove.eval.embed import embed
from sove.eval.knn import evaluate_knn
from sove.train import trainer as trainer_mod
from sove.train.checkpoint import load_checkpoint
from sove.api import pretrain, resume

pytest.importorskip("litdata")


def test_shard_skips_unreadable_files_with_a_count(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", num_per_class=2, size=8)
    (images / "dark" / "img_bad.png").write_bytes(b"not an image")
    assert main(["shard", "--images", str(images), "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 4 images (2 classes) in 1 chunk(s) to {tmp_path / 's'}; train with data.source=shards "
        f"data.root={tmp_path / 's'}; skipped 1 unreadable file of 5 (list in {tmp_path / 's' / 'unreadable.txt'}); "
        "4 images used"]
    assert (tmp_path / "s" / "unreadable.txt").read_text() == (
        f"cannot decode image '{images / 'dark' / 'img_bad.png'}': not an image in a format Pillow can read\n")
    meta = json.loads((tmp_path / "s" / "sove_shards.json").read_text())
    assert meta["classes"] == ["dark", "light"] and meta["labels"] == [0, 0, 1, 1]
    assert meta["names"] == ["dark/img_000.png", "dark/img_001.png", "light/img_000.png", "light/img_001.png"]


def test_shard_raises_on_unreadable_files_and_leaves_nothing(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", num_per_class=2, size=8)
    (images / "dark" / "img_bad.png").write_bytes(b"")
    assert main(["shard", "--images", str(images), "--out", str(tmp_path / "s"), "--on-error", "raise"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the progress bar
        f"sove: error: cannot decode image '{images / 'dark' / 'img_bad.png'}': empty file (0 bytes); --on-error "
        "raise stops at the first unreadable image; --on-error skip leaves such files out")
    assert sorted(os.listdir(tmp_path)) == ["images"]  # no shards, no staging folder left behind
    assert main(["shard", "--images", str(images), "--out", str(images)]) == 2  # never written over
    assert capsys.readouterr().err == (f"sove: error: sove shard: --out '{images}' already exists and is not an "
                                       "empty folder; give a new folder (existing shards are never written over)\n")
    assert main(["shard", "--images", str(images), "--out", str(tmp_path / "s"), "--chunk-bytes", "64 parsecs"]) == 2
    assert capsys.readouterr().err == ("sove: error: sove shard: --chunk-bytes '64 parsecs' is not a size; give bytes "
                                       "or e.g. 64MB, 1GB\n")
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_missing_litdata_is_one_error_line_with_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)
    assert main(["shard", "--images", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("sove: error: shards (data.source=shards, sove shard) need LitData, which is "
                                       "not installed; run: pip install 'sove[shards]' (or: pip install litdata)\n")


def test_a_folder_that_holds_no_shards_is_one_error_line(tmp_path, capsys, tiny_overrides):
    images = make_image_folder(tmp_path / "images", num_per_class=4, size=8)
    assert main(["pretrain", *tiny_overrides, "data.source=shards", f"data.root={images}",
                 f"trainer.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sove: error: data.root '{images}' holds no shards (no sove_shards.json); make them with `sove shard "
        f"--images '{images}' --out SHARDS`, or read the images with data.source=folder")


@pytest.mark.parametrize("channels", [1, 3])
def test_shard_source_returns_the_folder_items(tmp_path, channels):
    images = make_image_folder(tmp_path / "images", num_per_class=3, size=8, classes=("a", "b", "c"))
    shutil.copy(images / "a" / "img_000.png", images / "a" / "img_003.png")  # same bytes, another name
    write_shards(images, tmp_path / "s", chunk_bytes=2000, progress=False)  # several chunks
    assert len(list((tmp_path / "s").glob("chunk-*.bin"))) > 1
    folder, shards = ImageFolder(images, channels), ShardSource(tmp_path / "s", channels)
    assert (len(shards), shards.classes, shards.labels.tolist()) == (10, ["a", "b", "c"], [0] * 4 + [1] * 3 + [2] * 3)
    for i in range(len(folder)):
        (x, y), (u, v) = folder[i], shards[i]
        assert torch.equal(x, u) and y == v and shards.path(i) == folder.path(i).relative_to(images).as_posix()


def test_test_shards_are_labelled_by_the_train_classes(tmp_path, config_only_run):
    train = make_image_folder(tmp_path / "train", num_per_class=4, size=8, classes=("a", "b", "c"))
    test = make_image_folder(tmp_path / "test", num_per_class=3, size=8, classes=("a", "b", "c"), seed=1)
    shutil.rmtree(test / "b")
    write_shards(train, tmp_path / "train_s", progress=False)
    write_shards(test, tmp_path / "test_s", progress=False)
    run = config_only_run(tmp_path / "run", ["data.source=shards", f"data.root={tmp_path / 'train_s'}",
                                             f"data.test_root={tmp_path / 'test_s'}"])
    result = evaluate_knn(run, "pixels")
    assert result["top1"] == {"1": 100.0, "3": 100.0}  # c keeps label 2 (would be 1 by the test shards alone)
    assert (result["num_train"], result["num_test"]) == (12, 6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides):
    """A straight 2-epoch run from the folder and the same run from shards, interrupted after step 3
    (mid-epoch 1) and resumed; the dataset indices of every training batch of each."""
    tmp = tmp_path_factory.mktemp("runs")
    images = make_image_folder(tmp / "images", num_per_class=8)  # 16 images, batch 8: 2 steps per epoch
    test = make_image_folder(tmp / "test", num_per_class=4, seed=1)
    for folder, out in ((images, "shards"), (test, "test_shards")):
        write_shards(folder, tmp / out, progress=False)
    seen: dict[str, list] = {"folder": [], "shards": []}
    original = trainer_mod.Trainer.training_step
    base = tiny_overrides + [f"trainer.out_dir={tmp}", "loss.cls_feature_set_size=24"]

    def step(self, batch):
        seen[self.cfg.data.source].append(batch["index"].tolist())
        return original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod.Trainer, "training_step", step)
        pretrain(load_config(None, base + [f"data.root={images}", f"data.test_root={test}", "trainer.name=run_folder"]))
        pretrain(load_config(None, base + ["data.source=shards", f"data.root={tmp / 'shards'}",
                                           f"data.test_root={tmp / 'test_shards'}", "trainer.name=run_shards",
                                           "trainer.max_steps=3"]))
        mid = load_checkpoint(tmp / "run_shards" / "checkpoints" / "last.pt")
        resume(tmp / "run_shards", trainer={"max_steps": None})
    return tmp, seen, (mid["step"], mid["epoch"], mid["batch_in_epoch"])


def test_resumed_run_from_shards_equals_the_folder_run_bit_for_bit(runs):
    tmp, seen, position = runs
    assert position == (3, 1, 1)  # the streaming position in the checkpoint: epoch 1, batch 1
    assert len(seen["folder"]) == 4 and seen["shards"] == seen["folder"]
    a = load_checkpoint(tmp / "run_folder" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp / "run_shards" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    assert a["method"]["name"] == b["method"]["name"] == "sove"
    for part, sa, sb in (("student", a["student"], b["student"]), ("teacher", a["teacher"], b["teacher"]),
                         ("method", a["method"]["state"], b["method"]["state"])):  # method: E_C, E_P
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}.{key} differs"


def test_knn_and_embed_on_shards_equal_the_folder(runs):
    tmp, _, _ = runs
    assert evaluate_knn(tmp / "run_shards")["top1"] == evaluate_knn(tmp / "run_folder")["top1"]
    a = embed(tmp / "emb_folder", tmp / "run_folder", images=tmp / "test")
    b = embed(tmp / "emb_shards", tmp / "run_shards", images=tmp / "test_shards")
    assert np.array_equal(np.load(a["npy"]), np.load(b["npy"]))
    rows = (tmp / "emb_shards.csv").read_text().splitlines()
    assert rows[:2] == ["row,item,label", "0,dark/img_000.png,dark"]


RECORDER = """
import json, sys
from sove.train import trainer
original = trainer.Trainer.training_step
def step(self, batch):
    with open(f"{sys.argv[1]}/rank{self.fabric.global_rank}.jsonl", "a") as f:
        f.write(json.dumps([self.epoch, batch["index"].tolist()]) + "\\n")
    return original(self, batch)
trainer.Trainer.training_step = step
from sove.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_read_disjoint_halves_of_every_epoch(runs, tmp_path, tiny_overrides):
    shards, _, _ = runs
    (tmp_path / "record.py").write_text(RECORDER)
    cmd = [sys.executable, str(tmp_path / "record.py"), str(tmp_path), "pretrain", "trainer.name=ddp",
           *tiny_overrides, "loss.cls_feature_set_size=24", "data.source=shards", f"data.root={shards / 'shards'}",
           f"trainer.out_dir={tmp_path}",
           "optim.batch_size=4", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.num_threads=1"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in open(tmp_path / f"rank{r}.jsonl")] for r in (0, 1)]
    for epoch in (0, 1):  # 16 images, 2 ranks x 4 per step: 2 steps per epoch
        read = [sum((b for e, b in rank if e == epoch), []) for rank in ranks]
        assert len(read[0]) == len(read[1]) == 8 and not set(read[0]) & set(read[1])
        assert sorted(read[0] + read[1]) == list(range(16))
