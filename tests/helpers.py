"""Plain helpers shared by the tests (fixtures live in conftest.py): generated image folders,
checkpoint comparisons and the peer methods as pytest parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image_folder(root: Path, num_per_class: int = 16, size: int = 20, classes: tuple[str, ...] = ("dark", "light"),
                      seed: int = 0) -> Path:
    """Write ``num_per_class`` PNGs per class sub-folder: class c has mean brightness 60 + 120 c (noise added)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(num_per_class):
            base = 60 + 120 * c
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{i:03d}.png")
    return root


def with_method_state(state: dict) -> dict:
    """A checkpoint dict whose ``method`` entry is the method's state dict itself (for key-by-key comparisons)."""
    return {**state, "method": state["method"]["state"]}


#: The peer methods as pytest parameters, skipped without the optional lightly (``sove[peers]``).
PEERS = [pytest.param(m, marks=pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                                                  reason="DINO / iBOT need lightly (sove[peers])"))
         for m in ("dino", "ibot")]
