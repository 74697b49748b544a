"""L_CLS (Eq. 2), L_patch (Eq. 4) and the SOVE objective (docs/method.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference
from reference import unit
from sove.method.concepts import draw_anchors, select_judges
from sove.method.feature_set import FeatureSet
from sove.method.losses import ConceptSettings, SOVELoss, cls_loss, cross_view_pairs, patch_loss

DIM = 8


def make_concepts(seed: int = 0, num_judges: int = 3, num_anchors: int = 6):
    features = unit(32, DIM, seed=seed)
    anchors = draw_anchors(32, num_anchors, torch.Generator().manual_seed(seed))
    return select_judges(features, anchors, num_judges=num_judges)


def patch_reference(student, teacher, owner, num_images, concepts, tau_s, tau_t) -> float:
    return reference.patch_loss(student, teacher, owner, num_images, concepts.judges, concepts.weights, tau_s, tau_t)


def test_cross_view_pairs_two_globals_four_locals():
    pairs = cross_view_pairs(6, 2)
    assert len(pairs) == 2 * 6 - 2 == 10
    assert len(set(pairs)) == 10
    assert all(i != j for i, j in pairs)
    assert (0, 1) in pairs and (1, 0) in pairs
    for local in range(2, 6):
        assert {j for i, j in pairs if i == local} == {0, 1}
    assert {j for i, j in pairs if i in (0, 1)} == {0, 1}


@pytest.mark.parametrize("student_views", [2, 4])
def test_cls_loss_matches_slow_reference(student_views):
    concepts = make_concepts(seed=1)
    student = unit(student_views, 3, DIM, seed=2)
    teacher = unit(2, 3, DIM, seed=3)
    got = cls_loss(student, teacher, concepts, 0.1, 0.04)
    assert got.dtype == torch.float32 and got.ndim == 0
    expected = reference.cls_loss(student, teacher, concepts.judges, concepts.weights, 0.1, 0.04)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_cls_loss_gradient_only_through_student():
    concepts = make_concepts(seed=1)
    student = unit(3, 2, DIM, seed=2).requires_grad_()
    teacher = unit(2, 2, DIM, seed=3).requires_grad_()
    cls_loss(student, teacher, concepts, 0.1, 0.04).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_patch_loss_matches_slow_per_image_loop():
    concepts = make_concepts(seed=4, num_judges=1, num_anchors=5)
    # 4 images: image 0 has 2 masked tokens, image 1 none, image 2 three, image 3 one.
    owner = torch.tensor([0, 0, 2, 2, 2, 3])
    student = unit(6, DIM, seed=5)
    teacher = unit(6, DIM, seed=6)
    got = patch_loss(student, teacher, owner, 4, concepts, 0.1, 0.04)
    expected = patch_reference(student, teacher, owner, 4, concepts, 0.1, 0.04)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # Image 1 counts as 0 in the mean: the loss is 3/4 of the mean over the 3 other images.
    with_tokens = patch_reference(student, teacher, torch.tensor([0, 0, 1, 1, 1, 2]), 3,
                                       concepts, 0.1, 0.04)
    assert got.item() == pytest.approx(with_tokens * 3 / 4, abs=1e-5)


def test_patch_loss_empty_is_zero_and_keeps_graph():
    concepts = make_concepts(seed=4, num_judges=1, num_anchors=5)
    student = torch.zeros(0, DIM, requires_grad=True)
    got = patch_loss(student, torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long), 4, concepts, 0.1, 0.04)
    assert got.item() == 0.0 and got.ndim == 0
    assert got.requires_grad
    got.backward()
    assert student.grad.shape == (0, DIM)


def make_inputs(batch: int = 3, local_views: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([0, 0, 1, 3, 4, 4, 4])  # 2 * batch = 6 images; images 2 and 5 unmasked
    return dict(
        student_cls=unit(2 + local_views, batch, DIM, seed=seed + 1),
        teacher_cls=unit(2, batch, DIM, seed=seed + 2),
        student_patches=F.normalize(torch.randn(len(owner), DIM, generator=g), dim=1),
        teacher_patches=F.normalize(torch.randn(len(owner), DIM, generator=g), dim=1),
        patch_owner=owner,
        num_images=2 * batch,
    )


def make_loss(num_cls_tasks: int = 1, cls_weight: float = 1.0, patch_weight: float = 1.0) -> SOVELoss:
    return SOVELoss(
        ConceptSettings(num_anchors=6, num_judges=3, num_tasks=num_cls_tasks),
        ConceptSettings(num_anchors=4, num_judges=1, num_tasks=1),
        cls_weight=cls_weight, patch_weight=patch_weight, student_temp=0.1, seed=7,
    )


def test_sove_loss_terms_and_weighting():
    inputs = make_inputs()
    cls_fs, patch_fs = FeatureSet(24, DIM, seed=1), FeatureSet(10, DIM, seed=2)
    loss_fn = make_loss(cls_weight=0.7, patch_weight=1.3)
    out = loss_fn(**inputs, cls_feature_set=cls_fs, patch_feature_set=patch_fs, step=3, teacher_temp=0.04)
    assert set(out) == {"loss", "cls", "patch"}
    assert out["loss"].item() == pytest.approx(0.7 * out["cls"].item() + 1.3 * out["patch"].item(), abs=1e-6)
    # Each term is the function of the concepts of (seed, step, task 0, stream).
    c_cls = loss_fn.concepts(loss_fn.cls, cls_fs.features, 3, 0, 0)
    c_patch = loss_fn.concepts(loss_fn.patch, patch_fs.features, 3, 0, 1)
    expected_cls = cls_loss(inputs["student_cls"], inputs["teacher_cls"], c_cls, 0.1, 0.04)
    expected_patch = patch_loss(inputs["student_patches"], inputs["teacher_patches"], inputs["patch_owner"], 6,
                                c_patch, 0.1, 0.04)
    assert out["cls"].item() == pytest.approx(expected_cls.item(), abs=1e-6)
    assert out["patch"].item() == pytest.approx(expected_patch.item(), abs=1e-6)
    assert out["cls"].item() == pytest.approx(
        reference.cls_loss(inputs["student_cls"], inputs["teacher_cls"], c_cls.judges, c_cls.weights, 0.1, 0.04),
        abs=1e-5)


def test_sove_loss_without_patch_term():
    inputs = make_inputs()
    cls_fs = FeatureSet(24, DIM, seed=1)
    loss_fn = make_loss(patch_weight=0.0)
    out = loss_fn(**inputs, cls_feature_set=cls_fs, patch_feature_set=None, step=0, teacher_temp=0.04)
    assert set(out) == {"loss", "cls"}
    assert out["loss"].item() == pytest.approx(out["cls"].item(), abs=1e-7)


def test_sove_loss_two_tasks_is_mean_of_single_tasks():
    inputs = make_inputs()
    cls_fs = FeatureSet(24, DIM, seed=1)
    loss_fn = make_loss(num_cls_tasks=2, patch_weight=0.0)
    out = loss_fn(**inputs, cls_feature_set=cls_fs, patch_feature_set=None, step=5, teacher_temp=0.04)
    singles = []
    for task in (0, 1):
        concepts = loss_fn.concepts(loss_fn.cls, cls_fs.features, 5, task, 0)
        singles.append(cls_loss(inputs["student_cls"], inputs["teacher_cls"], concepts, 0.1, 0.04).item())
    assert singles[0] != pytest.approx(singles[1], abs=1e-6)  # tasks draw different concepts
    assert out["cls"].item() == pytest.approx(sum(singles) / 2, abs=1e-6)


def test_sove_loss_same_under_autocast():
    inputs = make_inputs(seed=10)
    cls_fs, patch_fs = FeatureSet(24, DIM, seed=1), FeatureSet(10, DIM, seed=2)
    loss_fn = make_loss(num_cls_tasks=2)
    kwargs = dict(cls_feature_set=cls_fs, patch_feature_set=patch_fs, step=1, teacher_temp=0.04)
    outside = loss_fn(**inputs, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(**inputs, **kwargs)
    for key in ("loss", "cls", "patch"):
        assert inside[key].dtype == torch.float32
        assert inside[key].item() == pytest.approx(outside[key].item(), abs=1e-4)


def test_shared_similarity_path_equals_per_task_judge_products():
    """num_tasks * K * J > N switches to one u @ features.T per step, gathered per task (regression:
    same loss and gradient as the per-task u @ judges.T path)."""
    import torch.nn.functional as F

    from sove.method import ConceptSettings, FeatureSet, SOVELoss

    torch.manual_seed(0)
    d, b, n = 8, 5, 30
    fs = FeatureSet(n, d, seed=3)
    fs.enqueue(F.normalize(torch.randn(n, d), dim=1), torch.arange(n))
    cls = ConceptSettings(num_anchors=6, num_judges=4, num_tasks=2)  # 2 * 6 * 4 = 48 > 30: shared path
    patch = ConceptSettings(num_anchors=4, num_judges=2, num_tasks=4)  # 32 > 30: shared path
    s_cls = F.normalize(torch.randn(4, b, d), dim=-1).requires_grad_()
    t_cls = F.normalize(torch.randn(2, b, d), dim=-1)
    s_pat = F.normalize(torch.randn(7, d), dim=-1).requires_grad_()
    t_pat = F.normalize(torch.randn(7, d), dim=-1)
    owner = torch.tensor([0, 0, 1, 3, 3, 3, 9])
    results = []
    for shared in (True, False):
        loss_fn = SOVELoss(cls, patch, seed=11)
        if not shared:
            loss_fn.similarities = lambda *args: (None, None)
        assert (loss_fn.similarities(cls, fs.features, s_cls, t_cls)[0] is not None) == shared
        out = loss_fn(student_cls=s_cls, teacher_cls=t_cls, student_patches=s_pat, teacher_patches=t_pat,
                      patch_owner=owner, num_images=2 * b, cls_feature_set=fs, patch_feature_set=fs,
                      step=3, teacher_temp=0.04)
        g_cls, g_pat = torch.autograd.grad(out["loss"], [s_cls, s_pat])
        results.append((out["cls"].detach(), out["patch"].detach(), g_cls, g_pat))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_concept_cache_is_keyed_on_the_feature_set_version_and_settings():
    """Concepts are cached per feature set and its change counter ``FeatureSet.version`` (regression: the key
    was torch's private ``tensor._version``); a bare tensor is never cached."""
    loss = make_loss()
    fs = FeatureSet(40, DIM, seed=3)
    full = loss.concepts(loss.cls, fs, step=5, task=0, stream=0)
    assert loss.concepts(loss.cls, fs, step=5, task=0, stream=0) is full  # micro-batches share one search
    rows = fs.features.clone()
    bare = loss.concepts(loss.cls, rows, step=5, task=0, stream=0)
    assert bare is not full and torch.equal(bare.judge_index, full.judge_index)  # same draw, same rows
    assert loss.concepts(loss.cls, rows, step=5, task=0, stream=0) is not bare
    fs.enqueue(unit(4, DIM, seed=9))  # rows 0..3 change in place: a new search
    assert fs.version == 1
    after = loss.concepts(loss.cls, fs, step=5, task=0, stream=0)
    fresh = make_loss().concepts(loss.cls, fs.features.clone(), step=5, task=0, stream=0)
    assert after is not full and torch.equal(after.weights, fresh.weights)
    fs.load_state_dict(FeatureSet(40, DIM, seed=4).state_dict())  # copied in place, same memory
    assert fs.version == 2 and loss.concepts(loss.cls, fs, step=5, task=0, stream=0) is not after
    # another setting (e.g. the smoothing of another loss) is another set of concepts
    smooth = ConceptSettings(num_anchors=6, num_judges=3, num_tasks=1, smoothing=0.5)
    assert not torch.equal(loss.concepts(smooth, fs, step=5, task=0, stream=0).weights,
                           loss.concepts(loss.cls, fs, step=5, task=0, stream=0).weights)
