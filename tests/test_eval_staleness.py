"""Derived evaluation state follows its inputs: feature caches are recomputed when the weights, data
or preprocessing change, results record the checkpoint they describe, and `sove summary` flags old ones."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder
from sove.cli import main
from sove.eval import features
from sove.eval.encoder import load_frozen
from sove.eval.features import eval_split, extract_features
from sove.eval.frozen import cached_extract
from sove.eval.provenance import digest, run_checkpoint, staleness, write_result
from sove.train.checkpoint import atomic_save, load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_labelled_run) -> Path:
    return tiny_labelled_run(tmp_path_factory.mktemp("stale"))


def count_extractions(monkeypatch) -> list[int]:
    calls, real = [], features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def train_one_more_step(run: Path) -> None:
    """Rewrite last.pt as a resume that trains one more step would (step + 1, new teacher weights),
    keeping its size and restoring its mtime, as `cp -p`, `rsync -a` or a coarse-timestamp filesystem
    can: the cache key must not rely on either."""
    last = run / "checkpoints" / "last.pt"
    before = last.stat()
    state = load_checkpoint(last)
    state["step"] += 1
    state["teacher"]["backbone.vit.blocks.0.norm1.weight"] += 0.5
    atomic_save(state, last)
    os.utime(last, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (last.stat().st_size, last.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_training_on_invalidates_the_cache_and_summary_marks_stale_results(run, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(run, tmp_path / "run"))  # this test changes the checkpoint
    assert main(["eval", "knn", "--run", str(run)]) == 0
    assert main(["eval", "knn", "--run", str(run), "--pixels"]) == 0
    (run / "eval" / "old.json").write_text(json.dumps({"command": "sove eval linear --run X", "top1": 50.0}))
    knn = json.loads((run / "eval" / "knn.json").read_text())
    encoder = load_frozen(run)
    assert knn["checkpoint_step"] == 1 and knn["fingerprint"] == digest(knn["inputs"])
    weights = encoder.identity()["weights_sha256"]
    assert knn["weights_sha256"] == run_checkpoint(run)["weights_sha256"] == weights
    assert json.loads((run / "eval" / "knn_pixels.json").read_text())["checkpoint_step"] is None
    train = eval_split(encoder.cfg, "train")
    old = cached_extract(encoder, train, "train", "global", "t")

    train_one_more_step(run)
    calls = count_extractions(monkeypatch)
    encoder = load_frozen(run)
    new = cached_extract(encoder, train, "train", "global", "t")
    assert calls == [1] and not torch.allclose(new, old, rtol=0, atol=1e-7)
    assert torch.equal(new, extract_features(encoder.module, train))

    capsys.readouterr()
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| SOVE (trained teacher) | " in out and out.count("| 1 (stale) |") == 1
    assert "| raw pixels |" in out and out.rstrip().count("| — |") == 1
    stale = [line for line in out.splitlines() if line.startswith("stale:")]
    assert stale == [
        f"stale: eval/knn.json computed at step 1, last checkpoint step 2; re-run `sove eval knn --run {run}`",
        "stale: eval/old.json computed at an unknown step (no checkpoint_step recorded), last checkpoint step 2; "
        "re-run `sove eval linear --run X`",
    ]
    assert main(["eval", "knn", "--run", str(run)]) == 0
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "stale: eval/knn.json" not in out


def test_cache_key_covers_data_root_and_image_list(run, tmp_path, monkeypatch, capsys):
    a = make_image_folder(tmp_path / "a" / "images", seed=1)
    b = make_image_folder(tmp_path / "b" / "images", seed=2)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        """(cached features, freshly extracted ones) of the train split with a relative data.root."""
        encoder = load_frozen(run, overrides=["data.root=images", "data.test_root=images"])
        train = eval_split(encoder.cfg, "train")
        return cached_extract(encoder, train, "train", "global", "k"), extract_features(encoder.module, train)

    monkeypatch.chdir(tmp_path / "a")
    in_a, _ = both()
    monkeypatch.chdir(tmp_path / "b")  # same relative root and image count, other pictures
    in_b, truth = both()
    assert torch.equal(in_b, truth) and not torch.allclose(in_b, in_a)
    (b / "dark" / "img_000.png").unlink()  # same count, one picture swapped for another
    shutil.copy(a / "light" / "img_000.png", b / "dark" / "img_new.png")
    swapped, truth = both()
    assert torch.equal(swapped, truth) and not torch.equal(swapped, in_b)
    (b / "dark" / "img_001.png").rename(b / "tmp.png")  # two pictures exchanged under the same names
    (b / "light" / "img_001.png").rename(b / "dark" / "img_001.png")  # (sizes may match, mtimes are kept)
    (b / "tmp.png").rename(b / "light" / "img_001.png")
    exchanged, truth = both()
    assert torch.equal(exchanged, truth) and not torch.equal(exchanged, swapped)  # was the stale cache
    cache = run / "eval" / "k_features_global_train.pt"
    cache.write_bytes(b"truncated")
    again, _ = both()
    assert torch.equal(again, truth)
    assert f"warning: feature cache '{cache}' is unreadable" in capsys.readouterr().err


def test_exported_and_dense_results_record_the_step_and_weights(run):
    assert main(["export", str(run)]) == 0
    assert json.loads((run / "backbone.json").read_text())["step"] == 1
    exported = load_frozen(backbone=run / "backbone.json")
    current = run_checkpoint(run)
    assert exported.step == 1 and exported.weights_sha256 == current["weights_sha256"]
    result = json.loads(write_result({"mAP": 1.0}, run / "eval" / "dense.json", load_frozen(run).identity(),
                                     {"data": "x"}).read_text())
    assert (result["checkpoint_step"], result["weights_sha256"]) == (1, current["weights_sha256"])
    assert result["inputs"]["settings"] == {"data": "x"} and result["fingerprint"] == digest(result["inputs"])


def test_staleness_compares_weights_then_step():
    current = {"path": "r/checkpoints/last.pt", "step": 200, "weights_sha256": "b"}
    assert staleness({"checkpoint_step": 200, "weights_sha256": "b"}, current) is None
    assert staleness({"checkpoint_step": None, "weights_sha256": None}, current) is None  # raw pixels
    assert staleness({"checkpoint_step": None, "weights_sha256": "b"}, current) is None  # export without a step
    assert staleness({"checkpoint_step": 100, "weights_sha256": "a"}, current) == \
        "computed at step 100, last checkpoint step 200"
    assert staleness({"checkpoint_step": 200, "weights_sha256": "a"}, current) == \
        "computed from other weights than r/checkpoints/last.pt (step 200)"
    assert staleness({"checkpoint_step": None, "weights_sha256": "a"}, current) == \
        "computed from other weights than r/checkpoints/last.pt (step 200)"
    assert staleness({"top1": 50.0}, current) == \
        "computed at an unknown step (no checkpoint_step recorded), last checkpoint step 200"
