"""Fast path vs an independent slow reference over the switch grid (issue #8 item 3).

The reference is written separately from ``sove.method``: float64, brute-force neighbour search,
the dense (K*J, K) label matrix, explicit loops over view pairs and images. Grid:
label_mode x num_judges {1, 3, 9} x anchor exclusion (all anchors removed vs keep-fraction 0.5,
where discarded anchors stay out of the pool) x tasks {1, 2}.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sove.method import ConceptSettings, FeatureSet, SOVELoss, anchor_generator

D = torch.float64


def ref_concepts(feats, anchors, num_judges, smoothing, label_mode, kept):
    """Judges (K', J) by brute force over rows that are not anchors; dense labels (K'*J, K')."""
    f = feats.to(D)
    is_anchor = torch.zeros(f.shape[0], dtype=torch.bool)
    is_anchor[anchors] = True
    judges, weights = [], []
    for a in anchors[kept].tolist():
        sims = [(float(f[a] @ f[r]), r) for r in range(f.shape[0]) if not is_anchor[r]]
        nbrs = [r for _, r in sorted(sims, key=lambda t: (-t[0], t[1]))[: num_judges - 1]]
        rows = [a] + nbrs
        judges.append(rows)
        w = [1 - smoothing] + [(1 - smoothing) if label_mode == "onehot" else float(f[a] @ f[r]) for r in nbrs]
        weights.append(w)
    k = len(judges)
    flat = [r for rows in judges for r in rows]
    labels = torch.zeros(len(flat), k, dtype=D)
    for c, w in enumerate(weights):
        for j, wj in enumerate(w):
            labels[c * num_judges + j] = (1 - wj) / (k - 1)
            labels[c * num_judges + j, c] = wj
    return f[flat], labels


def ref_probs(u, judge_feats, labels, tau):
    return torch.softmax(u.to(D) @ judge_feats.T / tau, dim=-1) @ labels


def ref_loss(settings, fs_feats, s_cls, t_cls, s_pat, t_pat, owner, n_img, seed, step, stream, tau_s, tau_t):
    per_task = []
    for task in range(settings.num_tasks):
        # The documented draw: randperm(N)[:K] from the (seed, step, task, stream) generator, then
        # randperm(K)[:round(K * keep)] (sorted) from the same generator for the keep-fraction.
        g = anchor_generator(seed, step, task, stream)
        anchors = torch.randperm(fs_feats.shape[0], generator=g)[: settings.num_anchors]
        keep = torch.arange(anchors.shape[0])
        if settings.anchor_keep_fraction < 1:
            n_keep = max(2, round(anchors.shape[0] * settings.anchor_keep_fraction))
            keep = torch.randperm(anchors.shape[0], generator=g)[:n_keep].sort().values
        jf, lab = ref_concepts(fs_feats, anchors, settings.num_judges, settings.smoothing, settings.label_mode, keep)
        if stream == 0:
            total, pairs = 0.0, 0
            for i in range(s_cls.shape[0]):
                for j in range(t_cls.shape[0]):
                    if i == j:
                        continue
                    q = ref_probs(t_cls[j], jf, lab, tau_t)
                    p = ref_probs(s_cls[i], jf, lab, tau_s)
                    total += float(-(q * p.log()).sum(-1).mean())
                    pairs += 1
            per_task.append(total / pairs)
        else:
            q, p = ref_probs(t_pat, jf, lab, tau_t), ref_probs(s_pat, jf, lab, tau_s)
            ce = -(q * p.log()).sum(-1)
            img = [float(ce[owner == m].sum()) / max(1, int((owner == m).sum())) for m in range(n_img)]
            per_task.append(sum(img) / n_img)
    return sum(per_task) / len(per_task)


GRID = list(itertools.product(["soft", "onehot"], [1, 3, 9], [1.0, 0.5], [1, 2]))


@pytest.mark.parametrize("label_mode, num_judges, keep, tasks", GRID)
def test_fast_path_equals_slow_reference(label_mode, num_judges, keep, tasks):
    g = torch.Generator().manual_seed(hash((label_mode, num_judges, keep, tasks)) % 2**31)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    b, d = 3, 8
    fs = FeatureSet(48, d, seed=1)
    settings = ConceptSettings(num_anchors=6, num_judges=num_judges, label_mode=label_mode, smoothing=0.1,
                               anchor_keep_fraction=keep, num_tasks=tasks)
    s_cls, t_cls = unit(4, b, d), unit(2, b, d)
    owner = torch.tensor([0, 0, 1, 3, 3, 3, 5])
    s_pat, t_pat = unit(7, d), unit(7, d)
    loss_fn = SOVELoss(settings, settings, cls_weight=1.0, patch_weight=1.0, student_temp=0.1, seed=7)
    out = loss_fn(student_cls=s_cls, teacher_cls=t_cls, student_patches=s_pat, teacher_patches=t_pat,
                  patch_owner=owner, num_images=2 * b, cls_feature_set=fs, patch_feature_set=fs, step=5,
                  teacher_temp=0.04)
    for name, stream in (("cls", 0), ("patch", 1)):
        expected = ref_loss(settings, fs.features, s_cls, t_cls, s_pat, t_pat, owner, 2 * b, 7, 5, stream, 0.1, 0.04)
        assert abs(float(out[name]) - expected) < 1e-6 * max(1.0, abs(expected)), (name, float(out[name]), expected)
