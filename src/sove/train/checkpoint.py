"""Atomic checkpoint writing and safe loading (``weights_only=True``)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from sove.errors import DiskFullError, SoveError, disk_full
from sove.run_lock import pid_alive
from sove.state_keys import strip_key_prefixes


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a partial file; a
    kill leaves at most a hidden ``.NAME.tmp-PID`` (see :func:`remove_stale_temporaries`).

    Raises:
        DiskFullError: no space left (or quota exceeded) while writing: the message names the file
            and the free space; the previous ``path`` is intact and the temporary file is removed.
    """
    atomic_write(path, lambda f: torch.save(obj, f), " (a run continues with `sove pretrain --resume RUN_DIR`)")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], hint: str = "") -> None:
    """Call ``write`` on a temporary binary file in the folder of ``path``, fsync, then rename it over
    ``path`` (as :func:`atomic_save`, for any writer: safetensors bytes, ``np.save``, text).

    Raises:
        DiskFullError: no space left (or quota exceeded): names the file and the free space (``hint``
            appended); the previous ``path`` is intact and the temporary file is removed.

    Why ours: no dependency writes atomically with the folder fsync and this disk-full message
    (``atomicwrites`` is unmaintained); the stale temporaries' PID names serve
    :func:`remove_stale_temporaries`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.is_file()
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if disk_full(e) is None:
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous '{path.name}' is intact" if existed else f"no earlier '{path.name}' existed"
        raise DiskFullError(f"no space left on device while saving '{path}' ({free:.1f} MiB free there); {kept} "
                            f"and nothing was replaced; free some space, then run again{hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files :func:`atomic_save` left in ``folder`` when its process was
    killed mid-write (up to a checkpoint's size each). Only files whose PID is no longer alive are
    removed; a live writer's temporary file is never touched.

    Returns:
        The removed paths.
    """
    removed = []
    for tmp in sorted(Path(folder).glob(".*.tmp-*")):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        print(f"removed {len(removed)} temporary file(s) of interrupted saves in {folder}")
    return removed


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
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``_forward_module.``) from every key
    (:data:`sove.state_keys.WRAPPER_PREFIXES`)."""
    return {strip_key_prefixes(key): value for key, value in state.items()}


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
    """Python, numpy, torch CPU and (where present) CUDA RNG states in a ``weights_only``-loadable form.

    ``cuda`` is the list of per-device generator states (``torch.cuda.get_rng_state_all``), absent
    when CUDA is not available.

    Why ours: Lightning's ``_collect_rng_states`` is private and keeps numpy's state as a tuple holding
    an ndarray, which ``torch.load(weights_only=True)`` refuses.
    """
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`. CUDA states are restored when saved and CUDA
    is available (for the first ``min(saved, present)`` devices); a checkpoint without them loads too."""
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[:torch.cuda.device_count()])
