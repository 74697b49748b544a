"""Per-iteration schedules (docs/method.md, "Optimisation and schedules")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from sove.config import load_config
from sove.train.optim import param_groups
from sove.train.schedules import build_schedules, cosine_schedule


def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.0, 10, warmup_iters=4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    assert s[4] == 1.0 and abs(s[-1]) < 1e-12
    assert np.all(np.diff(s[4:]) <= 0)


def test_paper_schedules():
    cfg = load_config(None, ["optim.epochs=4", "optim.warmup_epochs=1", "loss.teacher_temp_final=0.07",
                             "loss.teacher_temp_warmup_epochs=2"])
    sch = build_schedules(cfg.optim, cfg.loss, iters_per_epoch=10, global_batch=512)
    assert sch.total_iters == 40
    assert math.isclose(sch.lr.max(), 5e-4 * 512 / 256)  # linear scaling rule
    assert sch.lr[0] == 0.0 and math.isclose(sch.lr[10], 1e-3) and math.isclose(sch.lr[-1], 1e-6)
    # momentum m(i) = 1 - (1 - m0)(1 + cos(pi i / I)) / 2 from 0.996 to 1
    assert math.isclose(sch.momentum[0], 0.996) and math.isclose(sch.momentum[-1], 1.0)
    i, n = 13, 39
    assert math.isclose(sch.momentum[i], 1 - (1 - 0.996) * (1 + math.cos(math.pi * i / n)) / 2)
    assert math.isclose(sch.weight_decay[0], 0.04) and math.isclose(sch.weight_decay[-1], 0.4)
    assert math.isclose(sch.teacher_temp[0], 0.04) and math.isclose(sch.teacher_temp[19], 0.07)
    assert np.all(sch.teacher_temp[20:] == 0.07)


def test_param_groups_decay_only_matrices_and_tokens():
    """timm's rule (as DINO's): decay on >= 2-D weights (cls_token included), none on biases and 1-D
    parameters, frozen parameters left out; decayed group first (the saved optimizer states' order)."""
    net = torch.nn.Module()
    net.fc, net.norm = torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)
    net.cls_token, net.frozen = torch.nn.Parameter(torch.zeros(1, 1, 3)), torch.nn.Parameter(torch.zeros(3, 3))
    net.frozen.requires_grad_(False)
    decay, no_decay = param_groups(net)
    assert [g["apply_wd"] for g in (decay, no_decay)] == [True, False] and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.cls_token), id(net.fc.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(net.fc.bias), id(net.norm.weight), id(net.norm.bias)]


@pytest.mark.parametrize("start, end, total, warmup", [(1e-3, 1e-6, 40, 10), (0.04, 0.4, 40, 0), (0.996, 1.0, 37, 0),
                                                       (1.0, 0.0, 5, 5), (1.0, 0.1, 1, 0)])
def test_cosine_schedule_is_timms_cosine(start, end, total, warmup):
    """The arrays equal timm's CosineLRScheduler (warm-up prefix, per-update steps) value for value."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=start)
    timm_sched = CosineLRScheduler(opt, t_initial=max(total - warmup - 1, 1), lr_min=end, warmup_t=warmup,
                                   warmup_prefix=True, t_in_epochs=False)
    values = []
    for t in range(total):
        timm_sched.step_update(t)
        values.append(opt.param_groups[0]["lr"])
    assert cosine_schedule(start, end, total, warmup).tolist() == values
