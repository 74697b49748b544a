"""Atomic checkpoint writing and safe loading (``weights_only=True``)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sove.errors import SoveError

#: Wrapper prefixes stripped from state-dict keys on load (DDP, torch.compile, Fabric).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code execution).

    Raises:
        SoveError: if the file is missing or cannot be read, naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise SoveError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise SoveError(f"checkpoint '{path}' could not be loaded: {e}") from None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``_forward_module.``) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` with strict keys, listing missing/unexpected keys on failure.

    Raises:
        SoveError: naming ``what`` (e.g. "teacher in runs/x/checkpoints/last.pt") and the missing,
            unexpected or differently shaped keys.
    """
    state = strip_prefixes(state)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SoveError(f"{what}: state dict mismatch; missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in this model"
              for k, v in own.items() if state[k].shape != v.shape]
    if shapes:
        raise SoveError(f"{what}: parameter shapes differ ({len(shapes)}): {'; '.join(shapes[:3])}"
                        f"{' ...' if len(shapes) > 3 else ''}; the model config must match the checkpoint's")
    module.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
