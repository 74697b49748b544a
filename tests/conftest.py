"""Shared fixtures: generated image folders and a tiny config (depth 2, width 32, 16 px crops)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY = [
    "data.source=folder", "data.num_channels=3", "data.global_crop_size=16", "data.local_crop_size=8",
    "data.num_local_crops=2", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.grayscale=0.0",
    "model.arch=vit_tiny", "model.patch_size=4", "model.depth=2",
    "model.embed_dim=32", "model.num_heads=2", "model.head_hidden_dim=32", "model.head_out_dim=16",
    "loss.cls_feature_set_size=40", "loss.patch_feature_set_size=24", "loss.cls.num_anchors=8",
    "loss.cls.num_judges=3", "loss.cls.num_tasks=2", "loss.patch.num_anchors=6", "loss.patch.num_tasks=1",
    "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=0.5", "trainer.precision=32-true",
    "trainer.progress=false", "trainer.log_every=1", "trainer.checkpoint_every=100", "eval.knn_k=[1,3]",
    "eval.batch_size=16",
]


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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder of 32 generated 20x20 RGB images in two classes."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


def tiny_labelled_run(root: Path) -> Path:
    """A 1-step run of the TINY config on two brightness classes in ``root`` (the labelled folder
    doubles as the test split); returns its run directory. Shared by the supervised-protocol tests."""
    from sove.config import load_config
    from sove.api import pretrain

    images = make_image_folder(root / "images")
    cfg = load_config(None, TINY + [f"data.root={images}", f"data.test_root={images}", f"trainer.out_dir={root}",
                                    "trainer.name=r", "trainer.max_steps=1"])
    return pretrain(cfg).path



def config_only_run(run: Path, overrides: list[str]) -> Path:
    """A run directory holding only the TINY config.yaml (+ overrides): enough for `sove eval knn --pixels`."""
    from omegaconf import OmegaConf

    from sove.config import load_config

    run.mkdir(parents=True)
    OmegaConf.save(load_config(None, TINY + overrides), run / "config.yaml", resolve=True)
    return run


def with_method_state(state: dict) -> dict:
    """A checkpoint dict whose ``method`` entry is the method's state dict itself (for key-by-key comparisons)."""
    return {**state, "method": state["method"]["state"]}


#: The peer methods as pytest parameters, skipped without the optional lightly (``sove[peers]``).
PEERS = [pytest.param(m, marks=pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                                                  reason="DINO / iBOT need lightly (sove[peers])"))
         for m in ("dino", "ibot")]
