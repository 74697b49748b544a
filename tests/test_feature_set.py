"""FIFO feature sets E_C / E_P (docs/method.md, "Feature sets")."""

from __future__ import annotations

import pytest
import torch

from sove.method.feature_set import FeatureSet


def batch(start: int, n: int, dim: int = 2) -> torch.Tensor:
    """Rows whose first coordinate is their global row number: start, start + 1, ..."""
    rows = torch.zeros(n, dim)
    rows[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return rows


def test_fifo_wrap_around_rows_pointer_and_indices():
    fs = FeatureSet(size=5, dim=2, seed=0)
    init = fs.features.clone()

    fs.enqueue(batch(1, 3), torch.tensor([10, 11, 12]))
    assert int(fs.ptr) == 3
    assert fs.features[:3, 0].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(fs.features[3:], init[3:])
    assert fs.indices.tolist() == [10, 11, 12, -1, -1]

    fs.enqueue(batch(4, 3), torch.tensor([13, 14, 15]))  # rows 3, 4, then wraps to 0
    assert int(fs.ptr) == 1
    assert fs.features[:, 0].tolist() == [6.0, 2.0, 3.0, 4.0, 5.0]
    assert fs.indices.tolist() == [15, 11, 12, 13, 14]

    fs.enqueue(batch(7, 3))  # rows 1, 2, 3; no indices given -> -1
    assert int(fs.ptr) == 4
    assert fs.features[:, 0].tolist() == [6.0, 7.0, 8.0, 9.0, 5.0]
    assert fs.indices.tolist() == [15, -1, -1, -1, 14]
    assert fs.features.dtype == torch.float32 and fs.ptr.dtype == torch.long


def test_batch_larger_than_buffer_keeps_newest_rows():
    fs = FeatureSet(size=5, dim=2, seed=0)
    fs.enqueue(batch(0, 3))  # ptr 3
    fs.enqueue(batch(100, 7), torch.arange(200, 207))  # newest 5 are 102..106
    assert sorted(fs.features[:, 0].tolist()) == [102.0, 103.0, 104.0, 105.0, 106.0]
    # Written from ptr (3) onwards in order, so the pointer is back at 3 and points at the oldest.
    assert fs.features[:, 0].tolist() == [104.0, 105.0, 106.0, 102.0, 103.0]
    assert fs.indices.tolist() == [204, 205, 206, 202, 203]
    assert int(fs.ptr) == 3


def test_enqueue_casts_to_fp32():
    fs = FeatureSet(size=4, dim=2, seed=0)
    fs.enqueue(torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16))
    assert fs.features.dtype == torch.float32
    assert fs.features[0].tolist() == [0.5, 0.25]


def test_state_dict_round_trip_is_bit_identical():
    fs = FeatureSet(size=6, dim=3, seed=0)
    fs.enqueue(torch.randn(4, 3), torch.tensor([7, 8, 9, 10]))
    sd = fs.state_dict()
    assert set(sd) == {"features", "ptr", "indices"}
    other = FeatureSet(size=6, dim=3, seed=99)
    assert not torch.equal(other.features, fs.features)
    other.load_state_dict(sd)
    assert torch.equal(other.features, fs.features)
    assert torch.equal(other.indices, fs.indices)
    assert int(other.ptr) == int(fs.ptr) == 4
    # The loaded buffer continues the same FIFO.
    other.enqueue(batch(1, 3, dim=3))
    assert int(other.ptr) == 1 and other.features[[4, 5, 0], 0].tolist() == [1.0, 2.0, 3.0]


def test_init_is_seeded_and_unit_norm():
    a, b, c = FeatureSet(16, 8, seed=3), FeatureSet(16, 8, seed=3), FeatureSet(16, 8, seed=4)
    assert torch.equal(a.features, b.features)
    assert not torch.equal(a.features, c.features)
    torch.testing.assert_close(a.features.norm(dim=1), torch.ones(16), atol=1e-6, rtol=0)
    assert a.indices.tolist() == [-1] * 16 and int(a.ptr) == 0
    assert (a.size, a.dim) == (16, 8)


def test_wrong_shape_enqueue_raises():
    fs = FeatureSet(size=5, dim=4, seed=0)
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        fs.enqueue(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        fs.enqueue(torch.randn(4))
    with pytest.raises(ValueError, match="indices"):
        fs.enqueue(torch.randn(3, 4), torch.arange(2))
    assert int(fs.ptr) == 0
    with pytest.raises(ValueError, match=r"size \(0\)"):
        FeatureSet(size=0, dim=4)
