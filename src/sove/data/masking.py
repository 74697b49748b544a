"""Patch masks for the student's global views (docs/method.md, "Masking").

SOVE masks both student global views with BEiT's blockwise masking (Bao et al., "BEiT:
BERT Pre-Training of Image Transformers", ICLR 2022, §2.5 / Algorithm 1) at ratio 0.3 by
default; uniformly random masking (ratio 0.7 in the paper's Fig. B.1) is the alternative.
Masks are made in the data pipeline and returned with the crops; the teacher is never
masked and local crops get an all-false mask.

All randomness comes from the ``torch.Generator`` passed to ``__call__`` (or torch's global
RNG when None), so a mask is reproducible from the generator's seed.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from sove.choices import MASK_MODES
from sove.errors import DataError


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(g) for g in grid)
    if height < 1 or width < 1:
        raise ValueError(f"mask grid must be positive, got {tuple(grid)}")
    return height, width


def _check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return float(ratio)


class BlockwiseMaskGenerator:
    """BEiT blockwise masking of a (height, width) patch grid, as iBOT applies it (docs/method.md, "Masking").

    Blocks are placed while fewer than ``ratio * height * width`` patches are masked (a real
    number: 58.8 at 14x14, ratio 0.3). Per block round: target area uniform between
    ``min_area = max(1, (min(h, w) // 3) ** 2)`` and the remaining count, aspect ratio log-uniform in
    [min_aspect, 1 / min_aspect], block height ``round(sqrt(area * aspect))`` and width
    ``round(sqrt(area / aspect))``, smaller than the grid on both sides; up to ``max_attempts``
    random placements, one being accepted when it masks between 1 and the remaining count of
    new patches. Placement stops when the target is reached or a round places no block.
    Source: BEiT's MaskingGenerator (Bao et al., ICLR 2022, §2.5 / Algorithm 1) with iBOT's
    real-valued target (iBOT's ``ImageFolderMask``, ``pred_shape='block'``).

    ``fill_remainder=False`` (the default, ``mask.fill_remainder``) is that behaviour: the
    count varies per mask and never exceeds the target; at 14x14, ratio 0.3 it averages 57.3
    of 59, is 58 in 59% of masks and below 52 in under 1%. ``fill_remainder=True`` places
    blocks toward the integer ``round(ratio * height * width)`` and then masks the deficit
    with random unmasked patches, preferring those 4-adjacent to the masked region, so every
    mask has exactly that count. A grid with a side of 1 fits no block (every block must be smaller than the grid):
    its masks are empty without the fill.

    Args:
        grid: (height, width) of the patch grid, e.g. (14, 14) for 224 px / patch 16.
        ratio: fraction of patches to mask, in [0, 1).
        min_aspect: smallest block aspect ratio, in (0, 1]; 0.3 in BEiT, iBOT and SOVE.
        max_attempts: placement attempts per block (10 in BEiT and iBOT).
        fill_remainder: top every mask up to exactly ``round(ratio * height * width)``.

    Raises:
        ValueError: a non-positive grid, ratio outside [0, 1), min_aspect outside (0, 1]
            or max_attempts < 1.

    Example:
        >>> gen = BlockwiseMaskGenerator((14, 14), ratio=0.3, fill_remainder=True)
        >>> mask = gen(torch.Generator().manual_seed(0))  # bool, shape (196,)
        >>> int(mask.sum())
        59
    """

    def __init__(
        self,
        grid: tuple[int, int],
        ratio: float = 0.3,
        min_aspect: float = 0.3,
        max_attempts: int = 10,
        fill_remainder: bool = False,
    ) -> None:
        self.grid = _check_grid(grid)
        self.ratio = _check_ratio(ratio)
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = int(max_attempts)
        self.fill_remainder = bool(fill_remainder)
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        height, width = self.grid
        self.num_patches = height * width
        self.num_masked = round(self.ratio * self.num_patches)
        # Block placement aims at the real target (iBOT) or, with the fill, at the exact count.
        self.target = float(self.num_masked) if self.fill_remainder else self.ratio * self.num_patches
        self.min_area = max(1, (min(height, width) // 3) ** 2)  # >= 1 on grids under 3x3

    def _place_block(self, mask: np.ndarray, remaining: float, generator) -> int:
        """Try to place one block on ``mask`` (in place); returns the patches newly masked."""
        height, width = self.grid
        # One draw per round: (attempt, [area, aspect, top, left]) uniforms in [0, 1).
        draws = torch.rand(self.max_attempts, 4, generator=generator).tolist()
        for u_area, u_aspect, u_top, u_left in draws:
            # Uniform between min_area and remaining, whichever is larger (Python's random.uniform).
            area = self.min_area + u_area * (remaining - self.min_area)
            low_log, high_log = self.log_aspect
            aspect = math.exp(low_log + u_aspect * (high_log - low_log))
            block_h = round(math.sqrt(area * aspect))
            block_w = round(math.sqrt(area / aspect))
            if not (1 <= block_h < height and 1 <= block_w < width):
                continue
            top = int(u_top * (height - block_h + 1))
            left = int(u_left * (width - block_w + 1))
            window = mask[top : top + block_h, left : left + block_w]
            added = block_h * block_w - int(window.sum())
            if 1 <= added <= remaining:
                window[...] = True
                return added
        return 0

    def _fill(self, mask: np.ndarray, deficit: int, generator) -> None:
        """Mask ``deficit`` more random patches, 4-adjacent to the masked region when possible."""
        while deficit > 0:
            near = np.zeros_like(mask)
            near[1:] |= mask[:-1]
            near[:-1] |= mask[1:]
            near[:, 1:] |= mask[:, :-1]
            near[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(near & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            order = torch.randperm(candidates.size, generator=generator)[:deficit].numpy()
            mask.reshape(-1)[candidates[order]] = True
            deficit -= order.size

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one mask.

        Args:
            generator: source of randomness; None uses torch's global RNG.

        Returns:
            bool tensor of shape (height * width,), row-major over the grid, True = masked:
            at most ``ratio * height * width`` True entries, exactly ``round(ratio * height *
            width)`` with ``fill_remainder``.
        """
        mask = np.zeros(self.grid, dtype=bool)  # (height, width)
        count = 0
        while count < self.target:
            added = self._place_block(mask, self.target - count, generator)
            if added == 0:
                break
            count += added
        if self.fill_remainder:
            self._fill(mask, self.num_masked - count, generator)
        return torch.from_numpy(mask.reshape(-1))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, ratio={self.ratio}, "
            f"min_aspect={math.exp(self.log_aspect[0]):.3g}, max_attempts={self.max_attempts}, "
            f"fill_remainder={self.fill_remainder})"
        )


class RandomMaskGenerator:
    """Uniformly random patch masking (the alternative of docs/method.md, "Masking"; paper Fig. B.1).

    Args:
        grid: (height, width) of the patch grid.
        ratio: fraction of patches to mask, in [0, 1); exactly ``round(ratio * height * width)``
            patches are masked.

    Raises:
        ValueError: a non-positive grid or a ratio outside [0, 1).
    """

    def __init__(self, grid: tuple[int, int], ratio: float = 0.7) -> None:
        self.grid = _check_grid(grid)
        self.ratio = _check_ratio(ratio)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = round(self.ratio * self.num_patches)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one mask: bool tensor of shape (height * width,), True = masked."""
        mask = torch.zeros(self.num_patches, dtype=torch.bool)
        mask[torch.randperm(self.num_patches, generator=generator)[: self.num_masked]] = True
        return mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid}, ratio={self.ratio})"


def build_mask_generator(
    mode: str, grid: tuple[int, int], ratio: float, fill_remainder: bool = False
) -> Callable[[torch.Generator | None], torch.Tensor]:
    """Build the mask generator named by the ``mask.mode`` / ``mask.ratio`` / ``mask.fill_remainder`` keys.

    Args:
        mode: ``"blockwise"`` (BEiT, default in SOVE) or ``"random"``.
        grid: (height, width) patch grid of a global crop (crop size // patch size).
        ratio: fraction of patches to mask, in [0, 1).
        fill_remainder: blockwise only: top every mask up to exactly ``round(ratio * patches)``
            (random masks always have that count).

    Returns:
        A callable ``generator -> bool tensor (height * width,)``.

    Raises:
        DataError: unknown ``mask.mode``.
        ValueError: ``ratio`` outside [0, 1) (the config refuses such a ``mask.ratio`` when it is loaded).
    """
    if mode == "blockwise":
        return BlockwiseMaskGenerator(grid, ratio, fill_remainder=fill_remainder)
    if mode == "random":
        return RandomMaskGenerator(grid, ratio)
    raise DataError(f"mask.mode '{mode}' is unknown; allowed: {', '.join(MASK_MODES)}")
