"""Time-budgeted pretraining (``trainer.time_budget``): the schedules sized to the pace this machine measures.

A budgeted run (docs/configs.md, "Time budget"):

1. steps 1 .. :data:`CALIBRATION_STEPS` + 1 follow a provisional schedule (the configured
   ``optim.epochs``, at least twice the calibration long);
2. at the end of step ``CALIBRATION_STEPS + 1`` the seconds per step of steps 2 .. ``CALIBRATION_STEPS + 1``
   (step 1 carries one-off costs) size the whole schedule: ``total = step + (budget x (1 - RESERVE) -
   elapsed) / pace``; the lr warm-up + cosine, weight decay, teacher momentum and teacher temperature
   are rebuilt at that length, their warm-ups keeping the configured fractions of ``optim.epochs``
   (:func:`sove.train.schedules.scaled_lengths`);
3. at the steps ``ceil(f x total)``, f in :data:`CHECK_FRACTIONS`, the pace since the previous decision
   re-sizes the plan when it moves the total by more than :data:`TOLERANCE`; after
   :data:`FREEZE_FRACTION` of the schedule the plan is frozen, so the cosine ends as planned.

The elapsed time is the training loop's (steps, checkpoints, periodic k-NN), summed over resumes;
start-up (imports, data, networks) and the final plot are outside it. Every decision (step,
elapsed seconds, pace, total) is stored in the checkpoint: a resume rebuilds the schedules of the
last decision and continues the same plan. With several processes rank 0's measurement decides.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from sove.errors import ConfigError
from sove.train.schedules import Schedules, schedule_lengths, scaled_lengths, schedules_of_length

#: Timed steps that size the plan (after step 1, whose one-off costs are left out).
CALIBRATION_STEPS = 10
#: Share of the budget kept free for the final checkpoint and the pace's noise after the freeze.
RESERVE = 0.02
#: Fractions of the planned schedule where the pace is measured again.
CHECK_FRACTIONS = (0.15, 0.3, 0.45, 0.6)
#: No re-size once this fraction of the schedule is done (the lr is then well into its cosine decay).
FREEZE_FRACTION = 0.6
#: Relative change of the total below which a check keeps the plan.
TOLERANCE = 0.02

_UNITS = {"s": 1, "sec": 1, "min": 60, "h": 3600}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|min|h)?\s*$")


def parse_duration(value: Any, key: str = "trainer.time_budget") -> float:
    """Seconds of a duration: ``30min``, ``2h``, ``90s`` / ``90sec``, or a plain number of seconds.

    Raises:
        ConfigError: anything else, or a duration that is not > 0, naming ``key``.
    """
    match = _DURATION.match(str(value))
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a duration > 0; write e.g. 30min, 2h, 90s or a number of seconds")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class TimeBudget:
    """The plan of a budgeted run: its decisions and the schedules of the current one.

    Args:
        cfg: the full config (``trainer.time_budget`` set).
        iters_per_epoch: optimizer steps per epoch.
        global_batch: images per optimizer step over all processes.
    """

    def __init__(self, cfg, iters_per_epoch: int, global_batch: int) -> None:
        self.optim, self.loss = cfg.optim, cfg.loss
        self.budget_s = parse_duration(cfg.trainer.time_budget)
        self.iters_per_epoch, self.global_batch = iters_per_epoch, global_batch
        provisional = max(schedule_lengths(self.optim, self.loss, iters_per_epoch)[0], 2 * (CALIBRATION_STEPS + 1))
        self.decisions: list[dict[str, Any]] = [{"step": 0, "elapsed_s": 0.0, "s_per_step": None,
                                                 "total": provisional, "kind": "provisional"}]
        self.elapsed_base, self.clock_start = 0.0, None

    @property
    def total(self) -> int:
        """Steps of the current plan."""
        return self.decisions[-1]["total"]

    def schedules(self) -> Schedules:
        """The schedules of the current plan (warm-ups at the configured fractions)."""
        return schedules_of_length(self.optim, self.loss, *scaled_lengths(self.optim, self.loss, self.total),
                                   self.global_batch)

    def start(self, now: float) -> None:
        """Start the clock at ``now`` (seconds of the trainer's clock), once per process: a resume adds the
        seconds stored in its checkpoint, a second ``fit`` call keeps counting."""
        if self.clock_start is None:
            self.clock_start = now

    def elapsed(self, now: float) -> float:
        """Training seconds used so far, earlier launches of a resumed run included."""
        return self.elapsed_base + (now - self.clock_start if self.clock_start is not None else 0.0)

    def next_check(self) -> int | None:
        """Step at whose end the plan is next measured (None: frozen)."""
        last = self.decisions[-1]["step"]
        if last < 1:
            return 1
        if last < CALIBRATION_STEPS + 1:
            return CALIBRATION_STEPS + 1
        later = [math.ceil(f * self.total) for f in CHECK_FRACTIONS if f <= FREEZE_FRACTION]
        later = [s for s in later if s > last]
        return min(later) if later else None

    def after_step(self, step: int, now: float, agree: Callable[[int], int] = int) -> str | None:
        """Measure at the check steps and re-size; call at the end of every step.

        Args:
            step: steps done.
            now: the trainer's clock.
            agree: makes every process use rank 0's total (``fabric.broadcast``).

        Returns:
            A line for the log when the plan was made or changed, else None.
        """
        if step != self.next_check():
            return None
        elapsed, last = self.elapsed(now), self.decisions[-1]
        if step == 1:
            self.decisions.append({"step": 1, "elapsed_s": elapsed, "s_per_step": None, "total": self.total,
                                   "kind": "start"})
            return None
        pace = (elapsed - last["elapsed_s"]) / (step - last["step"])
        fitted = step + max(1, int((self.budget_s * (1 - RESERVE) - elapsed) / max(pace, 1e-9)))
        planning = step == CALIBRATION_STEPS + 1
        keep = not planning and abs(fitted - self.total) <= TOLERANCE * self.total
        total = agree(self.total if keep else fitted)
        old = self.total
        self.decisions.append({"step": step, "elapsed_s": elapsed, "s_per_step": pace, "total": total,
                               "kind": "plan" if planning else ("kept" if total == old else "resize")})
        if planning:
            return (f"time budget {self.budget_s / 60:.1f} min: {pace:.3f} s/step over steps 2-{step} -> "
                    f"planned {total} steps ({total / self.iters_per_epoch:.2f} epochs, ending at "
                    f"~{(elapsed + (total - step) * pace) / 60:.1f} min)")
        if total == old:
            return None
        return f"time budget: {pace:.3f} s/step over steps {last['step'] + 1}-{step} -> re-sized {old} -> {total} steps"

    def report(self, steps: int, now: float) -> str:
        """One line: budget, planned steps and minutes, steps and minutes used."""
        plan = next((d for d in self.decisions if d["kind"] == "plan"), None)
        first = f"first plan {plan['total']} steps, " if plan is not None else ""
        resizes = sum(d["kind"] == "resize" for d in self.decisions)
        return (f"time budget {self.budget_s / 60:.1f} min: {first}{resizes} re-size(s), final plan {self.total} "
                f"steps; trained {steps} steps in {self.elapsed(now) / 60:.1f} min")

    def state_dict(self, now: float) -> dict[str, Any]:
        """Decisions and the training seconds used so far (checkpoint key ``time_budget``)."""
        return {"budget_s": self.budget_s, "elapsed_s": self.elapsed(now),
                "decisions": [dict(d) for d in self.decisions]}

    def load_state_dict(self, state: dict[str, Any] | None, source: str) -> None:
        """Continue the plan of a checkpoint.

        Raises:
            ConfigError: the checkpoint was not trained with a time budget.
        """
        if not state:
            raise ConfigError(f"trainer.time_budget: {source} was trained without a time budget; resume it without")
        self.decisions = [dict(d) for d in state["decisions"]]
        self.elapsed_base = float(state["elapsed_s"])


def resize_to_budget(trainer, used_s: float, budget_s: float) -> int:
    """Re-size ``trainer``'s schedules so that, at its pace so far, it ends when ``budget_s`` is used.

    New length = steps taken + (budget left) / (seconds per step so far), at least one more step; the
    warm-ups keep their configured fractions (:func:`sove.train.schedules.scaled_lengths`), the cosine
    lr / weight-decay / momentum curves stretch or shrink to the new length. Steps already taken keep
    the values they had. The benchmarks (``benchmarks/compare_methods.py``, ``recipe_trials.py``) call
    it between ``Trainer.fit(deadline)`` slices.

    Args:
        trainer: a :class:`~sove.train.trainer.Trainer` that has taken at least one step.
        used_s, budget_s: training seconds used so far / allowed in all.

    Returns:
        the new total number of steps (>= steps taken + 1).
    """
    per_step = used_s / max(trainer.step, 1)
    total = trainer.step + max(1, int((budget_s - used_s) / per_step))
    o, lo = trainer.cfg.optim, trainer.cfg.loss
    trainer.schedules = schedules_of_length(o, lo, *scaled_lengths(o, lo, total), o.batch_size * trainer.fabric.world_size)
    trainer.total_steps = total
    return total
