"""Diagnostics of the training loop: NaN guard, DDP sync check, concept purity, periodic k-NN.

A mixin of :class:`sove.train.trainer.Trainer`; the methods read the trainer's state
(``cfg``, ``fabric``, ``schedules``, ``step``, feature sets, ``loss_fn``) and never change training.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from sove.distributed import all_gather_cat
from sove.errors import DataError, SoveError


class NonFiniteLossError(SoveError):
    """A loss term or gradient was NaN/inf; the message names the term, step, lr and temperatures."""


class Diagnostics:
    """Mixin with the trainer's checks and diagnostics."""

    @torch.no_grad()
    def check_sync(self) -> None:
        """Assert every rank holds bit-identical E_C/E_P, pointers and anchors (``trainer.check_sync``).

        Raises:
            SoveError: naming the step and the first quantity that differs between ranks.
        """
        state = {"anchors": self.loss_fn.last_anchors()}
        for name, fs in (("E_C", self.cls_fs), ("E_P", self.patch_fs)):
            if fs is not None:
                state[name], state[name + " pointer"] = fs.features, fs.ptr.view(1).double()
        for name, value in state.items():
            flat = value.detach().double().flatten()
            gathered = all_gather_cat(flat[None])  # (world, n)
            if not bool((gathered == gathered[0]).all()):
                raise SoveError(f"ranks disagree on {name} after step {self.step}: distributed state is out of sync")

    def non_finite(self, bad: list[str], terms: dict[str, torch.Tensor], batch: dict[str, Any],
                   stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """NaN guard: write ``debug/nonfinite_step_<k>.json``, then stop (default) or skip the step.

        The report names the culprits and the temperatures each loss term really used (its own
        ``loss.<term>.*_temp`` override or the shared value). Nothing is written to the
        checkpoints, so ``last.pt``, if one was saved, stays the last good state.

        Raises:
            NonFiniteLossError: with ``trainer.on_nonfinite=stop``.
        """
        sch, it = self.schedules, self.step
        temps = self.term_temperatures(bad)
        used = "; ".join(f"{k}: student_temp {v['student_temp']:g}, teacher_temp {v['teacher_temp']:g}"
                         for k, v in temps.items())
        where = f"non-finite {', '.join(bad)} at step {it} (epoch {self.epoch}; lr {sch.lr[it]:.3e}; {used})"
        report = {
            "step": it, "epoch": self.epoch, "terms": {k: float(v.detach()) for k, v in terms.items()}, "culprits": bad,
            "lr": float(sch.lr[it]), "temperatures": temps, "batch_index": batch["index"].tolist(),
            "stats": {k: {"finite_fraction": float(v.isfinite().float().mean()),
                          "abs_max": float(v.nan_to_num(0, 0, 0).abs().max())} for k, v in stats.items()},
        }
        path = self.run_dir / "debug" / f"nonfinite_step_{it:07d}.json"
        if self.fabric.is_global_zero:
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        if self.cfg.trainer.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{where}; debug file {path}; {self.checkpoint_advice()}")
        self.fabric.print(f"warning: skipped step: {where}; see {path}")
        return {k: v.detach() for k, v in terms.items()}

    def term_temperatures(self, bad: list[str]) -> dict[str, dict[str, float]]:
        """``{term: {"student_temp", "teacher_temp"}}`` used at this step by the culprit loss terms
        (every active term when the culprit is the total loss or a gradient)."""
        lo, scheduled = self.cfg.loss, float(self.schedules.teacher_temp[self.step])
        active = [n for n in ("cls", "patch") if lo[f"{n}_weight"] > 0]
        out = {}
        for name in [n for n in active if n in bad] or active:
            tau_s, tau_t = self.loss_fn.temperatures(name, scheduled)
            out[name] = {"student_temp": float(tau_s), "teacher_temp": float(tau_t)}
        return out

    def checkpoint_advice(self) -> str:
        """Where the run can go on from: the last checkpoint, if one was saved or resumed from."""
        last = self.run_dir / "checkpoints" / "last.pt"
        fresh = "start a new run with a lower optim.base_lr or higher temperatures"
        if self.checkpoint_step is None or not last.is_file():
            return (f"no checkpoint was saved before it (trainer.checkpoint_every={self.cfg.trainer.checkpoint_every}): "
                    f"{fresh}")
        return (f"last good checkpoint {last} (step {self.checkpoint_step}) is intact: {fresh} from it "
                f"(trainer.init_from={last}), or --resume {self.run_dir} trainer.on_nonfinite=skip to skip such steps")

    @torch.no_grad()
    def periodic_knn(self) -> None:
        """k-NN top-1 of the current teacher on class-balanced labelled subsets, logged as ``knn_top1`` (rank 0).

        The subsets (:func:`sove.eval.knn.periodic_subsets`) are drawn once per process from the run
        seed and described in the log on first use; test labels are numbered by the train split's class
        names and unreadable images follow ``data.on_error`` (skipped ones are left out with their
        labels); features and votes follow ``sove eval knn``, so the value equals the offline protocol
        on the same images. The global RNG states are restored afterwards (the feature loader draws a
        seed), so enabling it never changes training. Skipped with a warning when the data has no
        labels or no test split. Features are freed right after.
        """
        from sove.eval.features import extract_features, readable_rows
        from sove.eval.knn import knn_classify, periodic_subsets, subset_labels

        if getattr(self, "_knn_subsets", None) is None:
            try:
                self._knn_subsets = periodic_subsets(self.cfg)
            except DataError as e:
                self.fabric.print(f"warning: periodic k-NN skipped ({e})")
                return
            self.fabric.print(f"periodic k-NN on a {self._knn_subsets[2]}")
        train, test, _ = self._knn_subsets
        e = self.cfg.eval
        feats, labels = [], []
        cuda = [self.fabric.device] if torch.device(self.fabric.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the feature loader draws a seed: leave training's RNG alone
            for subset, split in ((train, "train"), (test, "test")):
                f = extract_features(self.teacher.backbone, subset, e.batch_size, self.fabric.device, "k-NN")
                keep = readable_rows(f, subset.dataset, split, self.run_dir / "eval", subset.indices)
                feats.append(f[keep])  # unreadable images: dropped with their labels
                labels.append(subset_labels(subset)[keep])
        result = knn_classify(feats[0], labels[0], feats[1], labels[1], list(e.knn_k), e.knn_temperature,
                              num_classes=len(train.dataset.source.classes))
        del feats
        self.fabric.log_dict({"knn_top1": result["best_top1"]}, step=self.step)
        self.fabric.print(f"epoch {self.epoch}: k-NN top-1 {result['best_top1']:.2f}% ({result['num_train']} train / "
                          f"{result['num_test']} test images, best k={result['best_k']})")

    def concept_purity(self) -> float | None:
        """Purity of the next step's task-0 CLS concepts (a diagnostic; labels are never used by the loss).

        The concepts are cached by the loss, so the next training step reuses them: no extra search.
        """
        if self.labels is None or self.cls_fs is None or self.cfg.loss.cls.num_judges < 2:
            return None
        from sove.viz.concepts import concept_purity

        concepts = self.loss_fn.concepts(self.loss_fn.cls, self.cls_fs.features, self.step, 0, stream=0)
        idx = self.cls_fs.indices
        row_labels = torch.where(idx >= 0, self.labels.to(idx.device)[idx.clamp_min(0)], torch.full_like(idx, -1))
        return concept_purity(concepts, row_labels)
