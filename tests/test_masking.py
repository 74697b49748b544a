"""Blockwise (BEiT) and random patch masks (docs/method.md, "Masking")."""

from __future__ import annotations

import pytest
import torch

from sove.data import BlockwiseMaskGenerator, RandomMaskGenerator, build_mask_generator
from sove.errors import DataError


@pytest.mark.parametrize("side", [4, 7, 14])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_blockwise_count_never_above_target_and_exact_with_fill(side, ratio):
    field, filled = (BlockwiseMaskGenerator((side, side), ratio=ratio, fill_remainder=f) for f in (False, True))
    for seed in range(50):
        mask = field(torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.shape == (side * side,)
        assert int(mask.sum()) <= ratio * side * side
        assert int(filled(torch.Generator().manual_seed(seed)).sum()) == round(ratio * side * side)


def test_blockwise_count_distribution_at_14x14():
    # Target 0.3 * 196 = 58.8 (59 with the fill). Expected values: iBOT's blockwise masking
    # (ImageFolderMask, pred_shape='block', after BEiT's MaskingGenerator) as measured over
    # 20,000 masks: mean 57.25, 58 patches in 58% of masks, never above 58, range 47-58.
    seeds = range(300)
    field, filled = (BlockwiseMaskGenerator((14, 14), ratio=0.3, fill_remainder=f) for f in (False, True))
    counts = torch.tensor([int(field(torch.Generator().manual_seed(s)).sum()) for s in seeds], dtype=torch.float)
    assert 56.8 < counts.mean() < 57.7 and counts.max() == 58 and counts.min() >= 47
    assert 0.5 < (counts == 58).float().mean() < 0.67
    assert all(int(filled(torch.Generator().manual_seed(s)).sum()) == 59 for s in seeds)


def test_fill_remainder_config_reaches_the_dataset(image_folder, tiny_cfg):
    from sove.train.builders import build_train_dataset

    for value in (False, True):
        cfg = tiny_cfg(f"data.root={image_folder}", f"mask.fill_remainder={value}")
        assert build_train_dataset(cfg).mask_generator.fill_remainder is value


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
        with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
            build_mask_generator("blockwise", (4, 4), ratio)
    assert build_mask_generator("blockwise", (4, 4), 0.3, fill_remainder=True).fill_remainder
    with pytest.raises(DataError, match="mask.mode 'grid'.*blockwise, random"):
        build_mask_generator("grid", (4, 4), 0.3)
