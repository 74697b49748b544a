"""Fast path vs the independent slow float64 reference (tests/reference.py) over the switch grid.

Grid: label_mode x num_judges {1, 3, 9} x anchor exclusion (all anchors removed vs keep-fraction 0.5,
where discarded anchors stay out of the pool) x tasks {1, 2}.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import reference
from reference import unit
from sove.method import ConceptSettings, FeatureSet, SOVELoss
from sove.seeding import generator


def ref_concepts(feats, settings, g):
    """The documented draw from the ``anchors`` stream: randperm(N)[:K], then randperm(K)[:round(K * keep)]
    (sorted) from the same generator for the keep-fraction; judges of the kept anchors with every drawn
    anchor out of the pool. Returns judge embeddings (K', J, d) and weights (K', J)."""
    anchors = torch.randperm(feats.shape[0], generator=g)[: settings.num_anchors]
    keep = torch.arange(anchors.shape[0])
    if settings.anchor_keep_fraction < 1:
        n_keep = max(2, round(anchors.shape[0] * settings.anchor_keep_fraction))
        keep = torch.randperm(anchors.shape[0], generator=g)[:n_keep].sort().values
    index = reference.judge_index(feats, anchors, settings.num_judges)[keep]
    return feats[index], reference.weights(feats, index, settings.smoothing, settings.label_mode)


def ref_loss(settings, fs_feats, s_cls, t_cls, s_pat, t_pat, owner, n_img, seed, step, stream, tau_s, tau_t):
    per_task = []
    for task in range(settings.num_tasks):
        judges, w = ref_concepts(fs_feats, settings, generator(seed, "anchors", step, task, stream))
        if stream == 0:
            per_task.append(reference.cls_loss(s_cls, t_cls, judges, w, tau_s, tau_t))
        else:
            per_task.append(reference.patch_loss(s_pat, t_pat, owner, n_img, judges, w, tau_s, tau_t))
    return sum(per_task) / len(per_task)


GRID = list(itertools.product(["soft", "onehot"], [1, 3, 9], [1.0, 0.5], [1, 2]))


@pytest.mark.parametrize("case, label_mode, num_judges, keep, tasks", [(i, *p) for i, p in enumerate(GRID)])
def test_fast_path_equals_slow_reference(case, label_mode, num_judges, keep, tasks):
    b, d = 3, 8
    fs = FeatureSet(48, d, seed=1)
    settings = ConceptSettings(num_anchors=6, num_judges=num_judges, label_mode=label_mode, smoothing=0.1,
                               anchor_keep_fraction=keep, num_tasks=tasks)
    s_cls, t_cls = unit(4, b, d, seed=4 * case), unit(2, b, d, seed=4 * case + 1)
    owner = torch.tensor([0, 0, 1, 3, 3, 3, 5])
    s_pat, t_pat = unit(7, d, seed=4 * case + 2), unit(7, d, seed=4 * case + 3)
    loss_fn = SOVELoss(settings, settings, cls_weight=1.0, patch_weight=1.0, student_temp=0.1, seed=7)
    out = loss_fn(student_cls=s_cls, teacher_cls=t_cls, student_patches=s_pat, teacher_patches=t_pat,
                  patch_owner=owner, num_images=2 * b, cls_feature_set=fs, patch_feature_set=fs, step=5,
                  teacher_temp=0.04)
    for name, stream in (("cls", 0), ("patch", 1)):
        expected = ref_loss(settings, fs.features, s_cls, t_cls, s_pat, t_pat, owner, 2 * b, 7, 5, stream, 0.1, 0.04)
        assert abs(float(out[name]) - expected) < 1e-6 * max(1.0, abs(expected)), (name, float(out[name]), expected)
