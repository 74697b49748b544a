"""Parameter groups, per-tensor clipping and the EMA teacher update (docs/method.md, "Optimisation and schedules")."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import param_groups_weight_decay


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups by timm's rule (``param_groups_weight_decay``, as DINO's): weight decay on >= 2-D
    weights only; none on biases and 1-D parameters (``pos_embed`` and ``cls_token`` are decayed).

    Returns:
        The decayed group first (``apply_wd`` True: the trainer sets its ``weight_decay`` from the
        schedule each step), then the undecayed one (``apply_wd`` False, ``weight_decay`` 0); this order
        is the one saved optimizer states were written with. A group with no parameters is left out.
    """
    groups = param_groups_weight_decay(model, weight_decay=1.0)  # 1.0: a placeholder the schedule overwrites
    return sorted(({**g, "apply_wd": g["weight_decay"] > 0} for g in groups), key=lambda g: not g["apply_wd"])


@torch.no_grad()
def clip_per_tensor(params: list[torch.nn.Parameter], max_norm: float) -> bool:
    """Scale each gradient tensor whose L2 norm exceeds ``max_norm`` down to that norm (DINO's rule).

    Args:
        params: parameters whose ``.grad`` is clipped in place (None grads are ignored).
        max_norm: per-tensor norm limit; <= 0 disables clipping (the finiteness check still runs).

    Returns:
        True when every gradient norm is finite.

    Why ours: torch's ``clip_grad_norm_`` scales all gradients by their one total norm, not each tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    finite = bool(torch.stack(norms).isfinite().all())
    if max_norm > 0 and finite:
        torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms])
    return finite


class EMA:
    """Teacher <- m * teacher + (1 - m) * student over parameters of the same name (fused foreach lerp).

    The student's mask token has no teacher counterpart and is skipped.

    Why ours: timm's ``ModelEmaV3`` and torch's ``AveragedModel`` average a deep copy of the student
    (pairing state-dict entries by position, buffers included) with their own decay rule; the teacher
    here is a separate network without the mask token, moved by the cosine momentum schedule.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        s = dict(student.named_parameters())
        names = [name for name, _ in teacher.named_parameters()]
        missing = [n for n in names if n not in s]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        self.teacher_params = [p for _, p in teacher.named_parameters()]
        self.student_params = [s[n] for n in names]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step with momentum m in [0, 1] (m = 1 leaves the teacher unchanged)."""
        torch._foreach_lerp_(self.teacher_params, [p.detach() for p in self.student_params], 1.0 - momentum)
