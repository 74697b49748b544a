"""Periodic k-NN during pretraining (``eval.knn_every_epochs``): a Fabric callback the top-level
``pretrain`` / ``resume`` (:mod:`sove.api`) attach, so the trainer never imports evaluation code."""

from __future__ import annotations

from typing import Any

import torch

from sove.errors import DataError


class PeriodicKNN:
    """Fabric callback: every ``eval.knn_every_epochs`` epochs, the k-NN top-1 of the current teacher on
    class-balanced labelled subsets, logged as ``knn_top1`` (rank 0).

    The subsets (:func:`sove.eval.knn.periodic_subsets`) are drawn once per process from the run seed
    and described in the log on first use; test labels are numbered by the train split's class names
    and unreadable images follow ``data.on_error`` (skipped ones are left out with their labels);
    features and votes follow ``sove eval knn``, so the value equals the offline protocol on the
    same images. The global RNG states are restored afterwards (the feature loader draws a seed),
    so enabling it never changes training. Skipped with one warning when the data has no labels or
    no test split (a Python dataset without ``test_dataset=``). Features are freed right after. Its
    progress bars follow ``trainer.progress`` (none when false).

    Args:
        sources: labelled (train, test) sources instead of the config's data: the Python datasets of
            ``sove.pretrain(dataset=..., test_dataset=...)`` (:mod:`sove.api`).
    """

    def __init__(self, sources: tuple[Any, Any] | None = None) -> None:
        self.sources = sources
        self.subsets: tuple[Any, Any, str] | None = None
        self.skipped = False

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Hook the trainer calls after each epoch (``trainer.epoch`` already counts it)."""
        every = trainer.cfg.eval.knn_every_epochs
        if every > 0 and trainer.epoch % every == 0 and trainer.fabric.is_global_zero:
            stop = getattr(trainer, "stop", None)
            if stop is not None and stop.signum:  # the time left before SIGKILL is for the checkpoint
                trainer.fabric.print(f"epoch {trainer.epoch}: periodic k-NN skipped (stopping)")
                return
            self.run(trainer)

    @torch.no_grad()
    def run(self, trainer: Any) -> None:
        """Evaluate ``trainer.teacher.backbone`` now; reads ``cfg``, ``fabric``, ``run_dir``, ``step``, ``epoch``."""
        from sove.eval.features import extract_features, readable_rows
        from sove.eval.knn import knn_classify, periodic_subsets, subset_labels

        if self.skipped:
            return
        if self.subsets is None:
            try:
                if trainer.cfg.data.source == "python" and self.sources is None:
                    raise DataError("a Python dataset has no test split: pass test_dataset= to sove.pretrain / "
                                    "sove.resume, or set eval.knn_every_epochs=0")
                self.subsets = periodic_subsets(trainer.cfg, self.sources)
            except DataError as e:
                trainer.fabric.print(f"warning: periodic k-NN skipped ({e})")
                self.skipped = True
                return
            trainer.fabric.print(f"periodic k-NN on a {self.subsets[2]}")
        train, test, _ = self.subsets
        e, device = trainer.cfg.eval, trainer.fabric.device
        feats, labels = [], []
        cuda = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the feature loader draws a seed: leave training's RNG alone
            for subset, split in ((train, "train"), (test, "test")):
                f = extract_features(trainer.teacher.backbone, subset, e.batch_size, device, f"k-NN {split} features",
                                     progress=trainer.cfg.trainer.progress)
                keep = readable_rows(f, subset.dataset, split, trainer.run_dir / "eval", subset.indices)
                feats.append(f[keep])  # unreadable images: dropped with their labels
                labels.append(subset_labels(subset)[keep])
        result = knn_classify(feats[0], labels[0], feats[1], labels[1], list(e.knn_k), e.knn_temperature,
                              num_classes=len(train.dataset.source.classes))
        del feats
        trainer.fabric.log_dict({"knn_top1": result["best_top1"]}, step=trainer.step)
        trainer.fabric.print(f"epoch {trainer.epoch}: k-NN top-1 {result['best_top1']:.2f}% ({result['num_train']} "
                             f"train / {result['num_test']} test images, best k={result['best_k']})")
