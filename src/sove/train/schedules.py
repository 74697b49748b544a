"""Per-iteration schedules: arrays indexed by the optimizer step (docs/method.md, "Optimisation and schedules")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(start: float, end: float, total_iters: int, warmup_iters: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start``, then half-cosine from ``start`` to ``end``.

    Args:
        start: value reached at the end of the warm-up.
        end: value at the last iteration.
        total_iters: length of the returned array (>= 1).
        warmup_iters: iterations of linear warm-up (clipped to ``total_iters``).
        warmup_start: value at iteration 0 when there is a warm-up.

    Returns:
        float64 array of shape (total_iters,).

    Why ours and not timm's ``CosineLRScheduler`` (whose curve this equals value for value:
    tests/test_schedules.py): timm's schedulers write one field of a live optimizer per step, while
    sove needs four whole curves up front (two are no optimizer field: teacher momentum and temperature)
    that the time budget re-sizes and a resume indexes by step.
    """
    warmup_iters = min(warmup_iters, total_iters)
    warm = np.linspace(warmup_start, start, warmup_iters, endpoint=False)
    n = total_iters - warmup_iters
    steps = np.arange(n)
    denom = max(n - 1, 1)
    cos = end + 0.5 * (start - end) * (1 + np.cos(math.pi * steps / denom))
    return np.concatenate([warm, cos])


@dataclass
class Schedules:
    """Arrays of shape (total_iters,): learning rate, weight decay, teacher momentum, teacher temperature."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @property
    def total_iters(self) -> int:
        return len(self.lr)


def schedule_lengths(optim, loss, iters_per_epoch: int) -> tuple[int, int, int]:
    """Steps of the whole schedule, of the lr warm-up and of the teacher-temperature warm-up.

    ``round(epochs x iters_per_epoch)`` each (the schedule at least 1 step); the warm-ups are not
    clipped here, so a caller can tell a warm-up that does not fit (:mod:`sove.train.preflight`).

    Args:
        optim, loss: config sections (``sove.config.OptimConfig`` / ``LossConfig``).
        iters_per_epoch: optimizer steps per epoch (>= 1).

    Returns:
        (total, lr_warmup, teacher_temp_warmup), in optimizer steps.
    """
    total = max(1, round(optim.epochs * iters_per_epoch))
    return total, round(optim.warmup_epochs * iters_per_epoch), round(loss.teacher_temp_warmup_epochs * iters_per_epoch)


def build_schedules(optim, loss, iters_per_epoch: int, global_batch: int) -> Schedules:
    """Schedules of docs/method.md, "Optimisation and schedules", from the ``optim`` and ``loss`` config sections.

    * lr: ``base_lr * global_batch / 256``, linear warm-up over ``warmup_epochs`` from 0, cosine to
      ``min_lr``;
    * weight decay: cosine ``weight_decay`` -> ``weight_decay_end``;
    * momentum: m(i) = 1 - (1 - m0)(1 + cos(pi i / I)) / 2, from m0 to 1;
    * teacher temperature: linear ``teacher_temp`` -> ``teacher_temp_final`` over
      ``teacher_temp_warmup_epochs``, then constant.

    Lengths are :func:`schedule_lengths`.

    Args:
        optim, loss: config sections (``sove.config.OptimConfig`` / ``LossConfig``).
        iters_per_epoch: optimizer steps per epoch (>= 1).
        global_batch: images per optimizer step over all processes.
    """
    return schedules_of_length(optim, loss, *schedule_lengths(optim, loss, iters_per_epoch), global_batch)


def scaled_lengths(optim, loss, total: int) -> tuple[int, int, int]:
    """(total, lr warm-up, teacher-temperature warm-up) for a schedule of ``total`` steps whose warm-ups keep
    the fractions of the configured one: ``round(total x warmup_epochs / epochs)`` and
    ``round(total x teacher_temp_warmup_epochs / epochs)`` (a time-budgeted run, :mod:`sove.train.budget`)."""
    return (total, round(total * optim.warmup_epochs / optim.epochs),
            round(total * loss.teacher_temp_warmup_epochs / optim.epochs))


def schedules_of_length(optim, loss, total: int, lr_warmup: int, temp_warmup: int, global_batch: int) -> Schedules:
    """The curves of :func:`build_schedules` for explicit lengths in optimizer steps (``total`` >= 1; the
    warm-ups are clipped to ``total``)."""
    lr_peak = optim.base_lr * global_batch / 256
    lr = cosine_schedule(lr_peak, optim.min_lr, total, lr_warmup)
    wd = cosine_schedule(optim.weight_decay, optim.weight_decay_end, total)
    momentum = cosine_schedule(optim.momentum_teacher, 1.0, total)
    final = loss.teacher_temp if loss.teacher_temp_final is None else loss.teacher_temp_final
    warm = min(total, temp_warmup)
    temp = np.concatenate([np.linspace(loss.teacher_temp, final, warm), np.full(total - warm, final)])
    return Schedules(lr=lr, weight_decay=wd, momentum=momentum, teacher_temp=temp)
