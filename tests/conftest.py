"""Shared fixtures: generated image folders and a tiny config (depth 2, width 32, 16 px crops).

Tests take the tiny config through fixtures: ``tiny_cfg(*overrides)`` (a loaded config),
``tiny_overrides`` (the override list, for CLI argv), ``tiny_labelled_run(root)`` and
``config_only_run(run, overrides)``; plain helpers are in tests/helpers.py, the float64 reference of
the objective in tests/reference.py.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import DictConfig

from helpers import make_image_folder

# The tests of benchmarks/*.py (compare_methods, recipe_trials, profile_objective) import those scripts:
# the one sys.path edit of the test suite.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A labelled folder of 32 generated 20x20 RGB images in two classes."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _sigint_handled():
    """Every test starts with Python's own SIGINT handler, also when pytest runs in the background of a
    script (``make test &``), where SIGINT arrives ignored and the stop tests' Ctrl-C would be ignored too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The TINY overrides (``key=value`` strings), e.g. for a CLI argv: ``["pretrain", *tiny_overrides, ...]``."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_cfg() -> Callable[..., DictConfig]:
    """``tiny_cfg(*overrides)``: the validated TINY config with ``overrides`` applied after it."""
    from sove.config import load_config

    return lambda *overrides: load_config(None, TINY + list(overrides))


@pytest.fixture(scope="session")
def tiny_labelled_run(tiny_cfg) -> Callable[[Path], Path]:
    """``tiny_labelled_run(root)``: a 1-step run of the TINY config on two brightness classes in ``root``
    (the labelled folder doubles as the test split); returns its run directory. Shared by the
    supervised-protocol tests."""
    from sove.api import pretrain

    def run(root: Path) -> Path:
        images = make_image_folder(root / "images")
        return pretrain(tiny_cfg(f"data.root={images}", f"data.test_root={images}", f"trainer.out_dir={root}",
                                 "trainer.name=r", "trainer.max_steps=1")).path

    return run


@pytest.fixture(scope="session")
def config_only_run(tiny_cfg) -> Callable[[Path, list[str]], Path]:
    """``config_only_run(run, overrides)``: a run directory holding only the TINY config.yaml (+ overrides):
    enough for `sove eval knn --pixels`."""
    from omegaconf import OmegaConf

    def make(run: Path, overrides: list[str]) -> Path:
        run.mkdir(parents=True)
        OmegaConf.save(tiny_cfg(*overrides), run / "config.yaml", resolve=True)
        return run

    return make
