"""The method registry: ``method=`` name -> :class:`~sove.method.base.Method` class, and the method
state of a checkpoint (this format or the one before methods existed)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from sove.errors import SoveError
from sove.method.base import Method
from sove.method.peers import DINO, IBOT
from sove.method.sove import SOVE

#: ``method=`` name -> class; the keys are :data:`sove.choices.METHODS` (tests/test_methods.py checks it).
METHODS: dict[str, type[Method]] = {"sove": SOVE, "dino": DINO, "ibot": IBOT}

def build_method(cfg: DictConfig) -> Method:
    """The :class:`Method` named by ``cfg.method`` (built from the full config, on the CPU).

    Raises:
        SoveError: the peers' optional dependency is missing (names ``pip install 'sove[peers]'``).
    """
    return METHODS[cfg.method](cfg)


def checkpoint_method(state: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """``(name, state_dict)`` of the method saved in a checkpoint. A checkpoint written before methods
    existed (top-level ``cls_feature_set`` / ``patch_feature_set``) is a SOVE one: its feature sets
    become the ``cls_fs.*`` / ``patch_fs.*`` entries of :class:`SOVE`'s state.

    Raises:
        SoveError: the checkpoint holds no method state, naming ``source``.
    """
    if "method" in state:
        return state["method"]["name"], state["method"]["state"]
    if "cls_feature_set" not in state and "patch_feature_set" not in state:
        raise SoveError(f"{source} holds no method state (no 'method' entry); is it a sove training checkpoint?")
    converted = {}
    for key, prefix in (("cls_feature_set", "cls_fs."), ("patch_feature_set", "patch_fs.")):
        converted.update({prefix + k: v for k, v in (state.get(key) or {}).items()})
    return "sove", converted
