"""Diagnostics of the training loop: NaN guard and DDP sync check.

A mixin of :class:`sove.train.trainer.Trainer`; the methods read the trainer's state
(``cfg``, ``fabric``, ``schedules``, ``step``, ``method``) and never change training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from sove.distributed import all_gather_cat
from sove.errors import SoveError


class NonFiniteLossError(SoveError):
    """A loss term or gradient was NaN/inf; the message names the term, step, lr and temperatures."""


@dataclass
class SkippedStep:
    """What a micro-step returns when the NaN guard skipped the step (``trainer.on_nonfinite=skip``).

    Attributes:
        terms: the (detached) loss terms of the skipped micro-batch.
    """

    terms: dict[str, torch.Tensor]


class Diagnostics:
    """Mixin with the trainer's checks and diagnostics."""

    @torch.no_grad()
    def check_sync(self) -> None:
        """Assert every rank holds the method's synchronised state bit-identically (``trainer.check_sync``;
        SOVE: E_C/E_P, pointers and anchors; DINO/iBOT: centers).

        Raises:
            SoveError: naming the step and the first quantity that differs between ranks.
        """
        for name, value in self.method.sync_state().items():
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
        temps = self.method.term_temperatures(bad, float(sch.teacher_temp[it]))
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

    def checkpoint_advice(self) -> str:
        """Where the run can go on from: the last checkpoint, if one was saved or resumed from."""
        last = self.run_dir / "checkpoints" / "last.pt"
        fresh = "start a new run with a lower optim.base_lr or higher temperatures"
        if self.checkpoint_step is None or not last.is_file():
            return (f"no checkpoint was saved before it (trainer.checkpoint_every={self.cfg.trainer.checkpoint_every}): "
                    f"{fresh}")
        return (f"last good checkpoint {last} (step {self.checkpoint_step}) is intact: {fresh} from it "
                f"(trainer.init_from={last}), or --resume {self.run_dir} trainer.on_nonfinite=skip to skip such steps")
