"""Concepts, judges, soft labels and concept probabilities (SOVE paper Eq. 2 / Eq. 4; docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference import judge_index as reference_judge_index
from reference import probs as reference_probs
from reference import unit
from reference import weights as reference_weights
from sove.method.concepts import draw_anchors, nearest_judges, select_judges
from sove.seeding import generator


@pytest.mark.parametrize("label_mode", ["soft", "onehot"])
@pytest.mark.parametrize("num_judges", [1, 3, 9])
def test_probs_sum_to_one(label_mode, num_judges):
    features = unit(40, 8, seed=num_judges)
    anchors = draw_anchors(40, 6, torch.Generator().manual_seed(1))
    concepts = select_judges(features, anchors, num_judges=num_judges, label_mode=label_mode)
    u = unit(5, 8, seed=100)
    for tau in (0.04, 0.1, 1.0):
        p = concepts.probs(u, tau)
        assert p.dtype == torch.float32 and p.shape == (5, 6)
        torch.testing.assert_close(p.sum(1).double(), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "num_judges,label_mode,keep_fraction",
    [(1, "soft", 1.0), (3, "soft", 1.0), (4, "onehot", 1.0), (3, "soft", 0.5), (3, "onehot", 0.5)],
)
def test_structured_probs_equal_dense_reference(num_judges, label_mode, keep_fraction):
    features = unit(30, 6, seed=7)
    anchors = draw_anchors(30, 8, torch.Generator().manual_seed(3))
    concepts = select_judges(features, anchors, num_judges=num_judges, label_mode=label_mode, smoothing=0.1,
                             keep_fraction=keep_fraction, generator=torch.Generator().manual_seed(5))
    full = reference_judge_index(features, anchors, num_judges)
    expected_k = 8 if keep_fraction == 1.0 else 4
    assert concepts.num_concepts == expected_k and concepts.num_judges == num_judges
    # Every kept concept is exactly the reference concept of its anchor (k-NN before keeping).
    ref_rows = {row[0]: row for row in full.tolist()}
    for row in concepts.judge_index.tolist():
        assert row == ref_rows[row[0]]
    weights = reference_weights(features, concepts.judge_index, 0.1, label_mode)
    torch.testing.assert_close(concepts.weights.double(), weights, atol=1e-6, rtol=0)
    u = unit(4, 6, seed=11)
    for tau in (0.1, 0.5):
        expected = reference_probs(features[concepts.judge_index], weights, u, tau)
        torch.testing.assert_close(concepts.probs(u, tau).double(), expected, atol=1e-6, rtol=0)


def test_hand_computed_two_concepts():
    # Rows: 0 = a0 = (1, 0), 1 = a1 = (0, 1) are the anchors; the pool is rows 2, 3, 4.
    #   row 2 = (0.8, 0.6):    cos with a0 = 0.8,   with a1 = 0.6
    #   row 3 = (-0.28, 0.96): cos with a0 = -0.28, with a1 = 0.96
    #   row 4 = (-1, 0):       cos with a0 = -1,    with a1 = 0
    # Nearest neighbour of a0 is row 2 (0.8), of a1 row 3 (0.96).
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.28, 0.96], [-1.0, 0.0]])
    concepts = select_judges(features, torch.tensor([0, 1]), num_judges=2, smoothing=0.1, label_mode="soft")
    assert concepts.judge_index.tolist() == [[0, 2], [1, 3]]
    # Weights: anchors 1 - 0.1 = 0.9; neighbours their cosine 0.8 and 0.96.
    torch.testing.assert_close(concepts.weights, torch.tensor([[0.9, 0.8], [0.9, 0.96]]), atol=1e-7, rtol=0)
    # u = (1, 0), tau = 1: logits over judges [a0, row 2, a1, row 3] = [1, 0.8, 0, -0.28].
    #   exp = [2.718281828, 2.225540928, 1.0, 0.755783741], Z = 6.699606497
    #   pi  = [0.405738, 0.332190, 0.149263, 0.112810]  (exp / Z)
    # K = 2 so o_j = (1 - w_j) / 1: o = [0.1, 0.2, 0.1, 0.04].
    #   P_0 = 0.9 pi0 + 0.8 pi1 + 0.1 pi2 + 0.04 pi3
    #       = (0.9*2.718281828 + 0.8*2.225540928 + 0.1*1 + 0.04*0.755783741) / Z
    #       = (2.446453645 + 1.780432742 + 0.1 + 0.030231350) / 6.699606497 = 4.357117737 / 6.699606497
    #       = 0.650354
    #   P_1 = 0.1 pi0 + 0.2 pi1 + 0.9 pi2 + 0.96 pi3
    #       = (0.271828183 + 0.445108186 + 0.9 + 0.725552391) / 6.699606497 = 2.342488760 / 6.699606497
    #       = 0.349646
    p = concepts.probs(torch.tensor([[1.0, 0.0]]), 1.0)
    torch.testing.assert_close(p, torch.tensor([[4.357117737 / 6.699606497, 2.342488760 / 6.699606497]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(p, torch.tensor([[0.650354, 0.349646]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(20))
def test_anchor_never_a_judge_random(seed):
    features = unit(24, 4, seed=seed)
    anchors = draw_anchors(24, 8, generator(seed, "anchors", 0, 0, 0))
    concepts = select_judges(features, anchors, num_judges=5)
    assert concepts.judge_index[:, 0].tolist() == anchors.tolist()
    neighbours = set(concepts.judge_index[:, 1:].reshape(-1).tolist())
    assert neighbours.isdisjoint(anchors.tolist())


def test_anchor_never_a_judge_when_anchors_are_mutual_nearest_neighbours():
    # Anchors 0..3 are tight around (1, 0, 0); the pool (rows 4..9) points elsewhere, so without
    # the exclusion every anchor's nearest neighbours would be the other anchors (and itself).
    g = torch.Generator().manual_seed(0)
    cluster = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(4, 3, generator=g), dim=1)
    pool = F.normalize(torch.tensor([0.0, 1.0, 0.0]) + 0.5 * torch.randn(6, 3, generator=g), dim=1)
    features = torch.cat([cluster, pool])
    anchors = torch.tensor([0, 1, 2, 3])
    assert (cluster @ cluster.T).min() > (cluster @ pool.T).max()
    for num_judges in (2, 4, 7):
        concepts = select_judges(features, anchors, num_judges=num_judges)
        assert set(concepts.judge_index[:, 1:].reshape(-1).tolist()) <= set(range(4, 10))
        assert concepts.judge_index.tolist() == reference_judge_index(features, anchors, num_judges).tolist()
    # A discarded anchor (keep_fraction) must not become a judge either.
    kept = select_judges(features, anchors, num_judges=3, keep_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert set(kept.judge_index[:, 1:].reshape(-1).tolist()) <= set(range(4, 10))


def test_chunking_does_not_change_judges():
    features = unit(50, 5, seed=2)
    anchors = draw_anchors(50, 7, torch.Generator().manual_seed(9))
    results = [select_judges(features, anchors, num_judges=4, chunk_size=c) for c in (1, 3, 1024)]
    for r in results[1:]:
        assert torch.equal(r.judge_index, results[0].judge_index)
        assert torch.equal(r.weights, results[0].weights)
    assert torch.equal(nearest_judges(features, anchors, 3, chunk_size=1),
                       nearest_judges(features, anchors, 3, chunk_size=1024))


def test_explicit_anchors_repeatable_and_generator_deterministic():
    features = unit(30, 4, seed=4)
    anchors = torch.tensor([3, 17, 8, 25, 0])
    a = select_judges(features, anchors, num_judges=3)
    b = select_judges(features, anchors, num_judges=3)
    assert torch.equal(a.judge_index, b.judge_index) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.judges, b.judges)

    def draw(seed, step, task, stream=0):
        return draw_anchors(1000, 20, generator(seed, "anchors", step, task, stream))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    base = draw(0, 5, 1)
    for other in (draw(0, 6, 1), draw(0, 5, 2), draw(1, 5, 1), draw(0, 5, 1, stream=1)):
        assert not torch.equal(base, other)
    assert len(set(base.tolist())) == 20


def test_onehot_weights_all_one_minus_smoothing():
    features = unit(30, 4, seed=6)
    anchors = draw_anchors(30, 5, torch.Generator().manual_seed(0))
    concepts = select_judges(features, anchors, num_judges=4, smoothing=0.2, label_mode="onehot")
    assert torch.equal(concepts.weights, torch.full((5, 4), 0.8))


def test_soft_weights_are_fp32_cosines_and_may_be_negative():
    # Anchors (1, 0) and (0, 1); every pool row lies in the third quadrant, so every neighbour
    # has a negative cosine with its anchor.
    pool = F.normalize(torch.tensor([[-0.6, -0.8], [-0.8, -0.6], [-0.1, -1.0], [-1.0, -0.3]]), dim=1)
    features = torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), pool])
    concepts = select_judges(features, torch.tensor([0, 1]), num_judges=3, smoothing=0.1, label_mode="soft")
    idx = concepts.judge_index
    # a0 = (1, 0): cosines are the x coordinates; the two largest are rows 4 (-0.0995) and 2 (-0.6).
    assert idx[0].tolist() == [0, 4, 2]
    assert idx[1].tolist() == [1, 5, 3]
    for c in range(2):
        for j in (1, 2):
            cos = (features[idx[c, j]] * features[idx[c, 0]]).sum()  # fp32
            assert concepts.weights[c, j].item() == pytest.approx(cos.item(), abs=1e-7)
            assert concepts.weights[c, j] < 0
    assert concepts.weights[:, 0].tolist() == pytest.approx([0.9, 0.9])
    u = unit(3, 2, seed=1)
    torch.testing.assert_close(concepts.probs(u, 0.5).sum(1), torch.ones(3), atol=1e-6, rtol=0)
    expected = reference_probs(features[idx], concepts.weights, u, 0.5)
    torch.testing.assert_close(concepts.probs(u, 0.5).double(), expected, atol=1e-6, rtol=0)


def test_shared_neighbour_is_a_judge_of_both_concepts():
    # Row 2 bisects a0 = (1, 0) and a1 = (0.6, 0.8): it is the nearest neighbour of both.
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.6, 0.8], [-1.0, 0.0], [0.0, -1.0]]), dim=1)
    concepts = select_judges(features, torch.tensor([0, 1]), num_judges=2)
    assert concepts.judge_index.tolist() == [[0, 2], [1, 2]]
    # Its own softmax mass appears once per concept: dense reference with the row duplicated.
    u = unit(4, 2, seed=3)
    expected = reference_probs(features[concepts.judge_index], concepts.weights, u, 0.2)
    torch.testing.assert_close(concepts.probs(u, 0.2).double(), expected, atol=1e-6, rtol=0)
    # The two concepts give row 2 different weights (its cosine to each anchor).
    c0, c1 = float(features[2] @ features[0]), float(features[2] @ features[1])
    assert concepts.weights[:, 1].tolist() == pytest.approx([c0, c1], abs=1e-7)


def test_search_is_fp32_under_autocast_when_search_dtype_none():
    # Anchor a0 = (1, 0, 0); rows 2 and 3 have cosines 0.9990 and 0.9985 with it: bf16 cannot
    # tell them apart (spacing 2**-8 near 1), fp32 can. search_dtype=None documents fp32.
    # Anchor a1 = (0, 0, 1) has the clear nearest neighbour row 4 (cosine 0.8).
    def row(c):
        return [c, math.sqrt(1 - c * c), 0.0]

    features = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], row(0.9990), row(0.9985), [0, 0.6, 0.8]]), dim=1)
    anchors = torch.tensor([0, 1])
    fp32 = select_judges(features, anchors, num_judges=2)
    assert fp32.judge_index.tolist() == [[0, 2], [1, 4]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = select_judges(features, anchors, num_judges=2)
    assert torch.equal(under.judge_index, fp32.judge_index)
    assert torch.equal(under.weights, fp32.weights)


def test_bad_arguments_raise_with_value():
    features = unit(6, 3, seed=0)
    anchors = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"num_judges \(0\)"):
        select_judges(features, anchors, num_judges=0)
    with pytest.raises(ValueError, match=r"num_anchors \(6\)"):
        select_judges(features, torch.arange(6), num_judges=2)
    with pytest.raises(ValueError, match=r"num_anchors \(7\)"):
        draw_anchors(6, 7, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'x'"):
        select_judges(features, anchors, num_judges=2, label_mode="x")
    with pytest.raises(ValueError, match=r"anchor_keep_fraction \(0\)"):
        select_judges(features, anchors, num_judges=2, keep_fraction=0, generator=torch.Generator())
