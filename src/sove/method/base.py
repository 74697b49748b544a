"""What a self-supervised method is to the trainer: :class:`Method` (its heads, buffers, loss terms and
what happens after the optimizer step) and :class:`StepContext` (what the trainer tells it each step).

The trainer (:mod:`sove.train.trainer`) owns data, schedules, optimizer, clipping, EMA, precision,
logging, checkpoints and the loop; a method owns everything specific to its objective
(docs/architecture.md, "Who owns what in a step").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
from omegaconf import DictConfig
from torch import nn


@dataclass
class StepContext:
    """What the trainer tells a method about the current optimizer step.

    Attributes:
        step: optimizer step (0-based), seeds per-step draws.
        teacher_temp: the scheduled teacher temperature of this step.
        rank / world_size: this process and the number of processes (DDP).
        autocast: context-manager factory of the precision plugin (Fabric's ``autocast``).
        phase: ``phase(name)`` -> context manager timing a phase (``forward``, ``objective``); a no-op
            unless a benchmark set a timer.
    """

    step: int
    teacher_temp: float
    rank: int
    world_size: int
    autocast: Callable[[], ContextManager]
    phase: Callable[[str], ContextManager]


@dataclass
class MicroViews:
    """The views of one micro-batch as the networks take them (b images).

    Attributes:
        global_crops: (2b, C, H, W), view-major.
        local_crops: (locals * b, C, h, w) view-major, or None without local crops.
        masks: bool (2, b, L): student masks of the two global views, ``mask.views`` applied
            (a view not listed there is all False).
        b: images in the micro-batch.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None
    masks: torch.Tensor
    b: int


def micro_views(batch: dict[str, Any], micro: slice, mask_views: list[int]) -> MicroViews:
    """Slice one micro-batch out of a loader batch and apply ``mask.views`` (docs/method.md, "Masking").

    Args:
        batch: ``crops`` (list of (B, C, H, W), the two globals first), ``masks`` bool (2, B, L).
        micro: the rows of this micro-batch.
        mask_views: the global views (0, 1) the student sees masked; the others stay unmasked.
    """
    crops = [c[micro] for c in batch["crops"]]
    masks = batch["masks"][:, micro]  # (2, b, L)
    if len(mask_views) < 2:
        masks = masks.clone()
        masks[[v for v in (0, 1) if v not in mask_views]] = False
    local = torch.cat(crops[2:]) if len(crops) > 2 else None
    return MicroViews(torch.cat(crops[:2]), local, masks, crops[0].shape[0])


class Method(nn.Module):
    """A self-supervised objective: its heads, buffers (feature sets, centers) and loss terms.

    Its ``state_dict`` holds everything an exact resume needs besides the networks and the optimizer.
    A step, as the trainer calls it::

        begin_step(ctx, batch)                        # once, before the micro-batches
        forward_step(student, teacher, batch, micro, ctx) -> terms   # per micro-batch, then backward
        after_optimizer_step(batch["index"])          # once, after AdamW and the EMA

    Attributes:
        name: the ``method=`` value of the config.
    """

    name: ClassVar[str]

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def make_head(self, embed_dim: int) -> nn.Module:
        """A projection head for a backbone of width ``embed_dim`` (student and teacher get one each)."""
        raise NotImplementedError

    def begin_step(self, ctx: StepContext, batch: dict[str, Any]) -> None:
        """Prepare a step (e.g. per-step draws for the whole global batch); forget the last step's leftovers."""

    def forward_step(self, student: nn.Module, teacher: nn.Module, batch: dict[str, Any], micro: slice,
                     ctx: StepContext) -> dict[str, torch.Tensor]:
        """Teacher forward (no grad), student forward and loss of one micro-batch.

        Returns:
            fp32 scalars: ``loss`` (the weighted total, with gradient) and the named, unweighted terms.
            What the method needs after the optimizer step (teacher outputs) it keeps itself.
        """
        raise NotImplementedError

    def after_optimizer_step(self, index: torch.Tensor) -> None:
        """Update the method's buffers once per optimizer step (``index``: (B,) dataset indices of this rank)."""

    def report_stats(self) -> dict[str, torch.Tensor]:
        """Tensors of the last forward for the non-finite report (``finite_fraction`` / ``abs_max`` each)."""
        return {}

    def term_temperatures(self, bad: list[str], teacher_temp: float) -> dict[str, dict[str, float]]:
        """``{term: {"student_temp", "teacher_temp"}}`` the culprit terms used (every term when the culprit
        is the total loss or a gradient)."""
        raise NotImplementedError

    def sync_state(self) -> dict[str, torch.Tensor]:
        """Named tensors every DDP rank must hold identically after a step (``trainer.check_sync``)."""
        return {}

    def metrics(self, labels: torch.Tensor | None, step: int) -> dict[str, float]:
        """Diagnostics logged with the losses (labels: (N,) int64 of the training images, or None)."""
        return {}
