"""Blockwise (BEiT) and random patch masks (docs/method.md, "Masking")."""

from __future__ import annotations

import pytest
import torch

from sove.data import BlockwiseMaskGenerator, RandomMaskGenerator, build_mask_generator
from sove.errors import DataError


@pytest.mark.parametrize("side", [4, 7, 14])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_blockwise_count_near_target(side, ratio):
    gen = BlockwiseMaskGenerator((side, side), ratio=ratio)
    target = round(ratio * side * side)
    for seed in range(50):
        mask = gen(torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.shape == (side * side,)
        assert abs(int(mask.sum()) - target) <= 1


def test_blockwise_reproducible_and_seed_dependent():
    gen = BlockwiseMaskGenerator((14, 14), ratio=0.3)
    a = gen(torch.Generator().manual_seed(3))
    b = gen(torch.Generator().manual_seed(3))
    c = gen(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_blockwise_masks_contiguous_blocks():
    # On a 14x14 grid the first block alone covers at least min_area = 16 patches, so the
    # masked region is far more clustered than uniform: most masked patches have a masked
    # 4-neighbour.
    gen = BlockwiseMaskGenerator((14, 14), ratio=0.3)
    grid = gen(torch.Generator().manual_seed(0)).view(14, 14)
    near = torch.zeros_like(grid)
    near[1:] |= grid[:-1]
    near[:-1] |= grid[1:]
    near[:, 1:] |= grid[:, :-1]
    near[:, :-1] |= grid[:, 1:]
    assert (near & grid).sum() >= 0.9 * grid.sum()


def test_ratio_zero_masks_nothing():
    for gen in (BlockwiseMaskGenerator((7, 7), ratio=0.0), RandomMaskGenerator((7, 7), ratio=0.0)):
        assert not gen(torch.Generator().manual_seed(0)).any()


def test_random_exact_count_and_reproducible():
    gen = RandomMaskGenerator((7, 5), ratio=0.7)
    masks = [gen(torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(int(m.sum()) == round(0.7 * 35) and m.shape == (35,) for m in masks)
    assert torch.equal(masks[0], gen(torch.Generator().manual_seed(0)))


def test_build_mask_generator():
    assert isinstance(build_mask_generator("blockwise", (4, 4), 0.3), BlockwiseMaskGenerator)
    assert isinstance(build_mask_generator("random", (4, 4), 0.3), RandomMaskGenerator)
    for ratio in (1.0, -0.1):
        with pytest.raises(DataError, match="mask.ratio"):
            build_mask_generator("blockwise", (4, 4), ratio)
    with pytest.raises(DataError, match="mask.mode 'grid'.*blockwise, random"):
        build_mask_generator("grid", (4, 4), 0.3)
