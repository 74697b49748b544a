"""DINO and iBOT as :class:`~sove.method.base.Method` s, with lightly's maintained heads and losses.

* **DINO** (Caron et al. 2021): lightly's ``DINOProjectionHead`` (``model.head_hidden_dim`` MLP,
  ``model.head_out_dim`` bottleneck, weight-normalised last layer to ``peers.num_prototypes``
  logits) and ``DINOLoss`` (teacher centering, every cross-view pair). No masking.
* **iBOT** (Zhou et al. 2022): the DINO loss on masked global views (``mask.*``, as SOVE) plus
  ``IBOTPatchLoss`` on the masked tokens (the same head), weights ``loss.cls_weight`` / ``loss.patch_weight``.

Both use the trainer's teacher-temperature schedule and ``loss.student_temp``. lightly updates a
loss's center inside its forward; here the center is held during the micro-batches and updated
once per optimizer step from the teacher outputs of the whole global batch (a mean over all ranks'
rows), so gradient accumulation and DDP give the center of one process with the full batch.
lightly is an optional extra: ``pip install 'sove[peers]'``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from sove.distributed import is_distributed
from sove.errors import SoveError
from sove.method.base import Method, StepContext, micro_views


def _lightly(method: str):
    """lightly's modules (head, losses, center update), the centers held for :meth:`Peer.after_optimizer_step`.

    Raises:
        SoveError: lightly is not installed, naming the extra to install.
    """
    try:
        from lightly.loss import DINOLoss, IBOTPatchLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.modules.center import Center, center_momentum
    except ImportError:
        raise SoveError(f"method={method} needs lightly (the DINO / iBOT heads and losses): "
                        "pip install 'sove[peers]'") from None

    class HeldDINOLoss(DINOLoss):
        def update_center(self, teacher_out: torch.Tensor) -> None:  # held: updated after the optimizer step
            return None

    class HeldCenter(Center):
        def update(self, x: torch.Tensor) -> None:  # held: updated after the optimizer step
            return None

    return DINOProjectionHead, HeldDINOLoss, IBOTPatchLoss, HeldCenter, center_momentum


@torch.no_grad()
def global_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of every rank: (N_rank, K) -> (K,), sums and counts all-reduced (exact for any
    split of the rows over ranks)."""
    stats = torch.cat([rows.float().sum(0), rows.new_tensor([rows.shape[0]], dtype=torch.float32)])
    if is_distributed():
        dist.all_reduce(stats)
    return stats[:-1] / stats[-1]


class Peer(Method):
    """DINO (``patch = False``) or iBOT (``patch = True``) with lightly's head and losses.

    Submodules: ``cls_loss`` (DINOLoss, buffer ``center`` (1, 1, K)) and for iBOT ``patch_loss``
    (IBOTPatchLoss, buffer ``center.center`` (1, K)).
    """

    patch: bool = False

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._head, dino_loss, ibot_loss, held_center, self._momentum = _lightly(self.name)
        lo, p = cfg.loss, cfg.peers
        self.cls_loss = dino_loss(p.num_prototypes, lo.teacher_temp, lo.teacher_temp, 0, lo.student_temp,
                                  p.center_momentum)
        self.patch_loss = None
        if self.patch:
            self.patch_loss = ibot_loss(p.num_prototypes, lo.teacher_temp, lo.student_temp,
                                        center_momentum=p.center_momentum)
            self.patch_loss.center = held_center((1, p.num_prototypes), momentum=p.center_momentum)
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.stats: dict[str, torch.Tensor] = {}

    def make_head(self, embed_dim: int) -> nn.Module:
        """lightly's ``DINOProjectionHead``: D -> hidden -> ``model.head_out_dim`` -> ``peers.num_prototypes``."""
        m = self.cfg.model
        return self._head(embed_dim, m.head_hidden_dim, m.head_out_dim, self.cfg.peers.num_prototypes)

    def begin_step(self, ctx: StepContext, batch: dict[str, Any]) -> None:
        self.pending, self.stats = ([], []), {}

    def forward_step(self, student: nn.Module, teacher: nn.Module, batch: dict[str, Any], micro: slice,
                     ctx: StepContext) -> dict[str, torch.Tensor]:
        """DINO loss over the cross-view pairs of [CLS] logits (iBOT: masked student globals, + the patch
        loss on the masked tokens); keeps the teacher logits for the center update."""
        v = micro_views(batch, micro, list(self.cfg.mask.views))
        b, flat = v.b, v.masks.flatten(0, 1)  # (2b, L)
        if not self.patch:  # DINO masks nothing; an all-False mask keeps the mask token in the graph (DDP)
            flat = torch.zeros_like(flat)
        with ctx.phase("forward"):
            with torch.no_grad(), ctx.autocast():
                t_out = teacher(v.global_crops, masks=None, patch_select=flat)
            out = student(v.global_crops, v.local_crops, masks=flat, patch_select=flat)
        with ctx.phase("objective"):
            t_cls = t_out["cls"].float().view(2, b, -1)
            s_cls = out["cls"].float().view(-1, b, out["cls"].shape[-1])
            terms = {"cls": self.cls_loss(list(t_cls), list(s_cls), teacher_temp=ctx.teacher_temp)}
            loss = self.cfg.loss.cls_weight * terms["cls"]
            self.pending[0].append(t_cls.flatten(0, 1))
            if self.patch:
                side = int(flat.shape[1] ** 0.5)
                t_patch = t_out["patches"].float()
                terms["patch"] = self.patch_loss(t_patch, out["patches"].float(), flat.view(-1, side, side),
                                                 teacher_temp=ctx.teacher_temp)
                loss = loss + self.cfg.loss.patch_weight * terms["patch"]
                self.pending[1].append(t_patch)
            terms["loss"] = loss
        self.stats = {"teacher_cls": t_cls.detach(), "student_cls": s_cls.detach()}
        return terms

    @torch.no_grad()
    def after_optimizer_step(self, index: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean teacher logits of the step (all micro-batches and ranks)."""
        m = self.cfg.peers.center_momentum
        center = self.cls_loss.center
        center.copy_(self._momentum(center, global_mean(torch.cat(self.pending[0])).view_as(center), m))
        if self.patch:
            center = self.patch_loss.center.center
            center.copy_(self._momentum(center, global_mean(torch.cat(self.pending[1])).view_as(center), m))
        self.pending = ([], [])

    def report_stats(self) -> dict[str, torch.Tensor]:
        return self.stats

    def term_temperatures(self, bad: list[str], teacher_temp: float) -> dict[str, dict[str, float]]:
        """Every term uses ``loss.student_temp`` and the scheduled teacher temperature."""
        names = ["cls", "patch"] if self.patch else ["cls"]
        temps = {"student_temp": float(self.cfg.loss.student_temp), "teacher_temp": float(teacher_temp)}
        return {n: dict(temps) for n in [n for n in names if n in bad] or names}

    def sync_state(self) -> dict[str, torch.Tensor]:
        """The centers."""
        state = {"cls center": self.cls_loss.center}
        if self.patch:
            state["patch center"] = self.patch_loss.center.center
        return state


class DINO(Peer):
    """DINO: :class:`Peer` without masking or patch loss (``method=dino``)."""

    name = "dino"
    patch = False


class IBOT(Peer):
    """iBOT: :class:`Peer` with masked student globals and lightly's ``IBOTPatchLoss`` (``method=ibot``)."""

    name = "ibot"
    patch = True
