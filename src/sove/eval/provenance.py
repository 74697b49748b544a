"""What an evaluation result or feature cache was computed from, and whether that still holds.

Feature caches (:func:`sove.eval.frozen.cached_extract`) are keyed on everything that determines the
features: a SHA-256 of the backbone weights actually loaded, the checkpoint step, architecture and
global pool, the ``data.*`` preprocessing keys with absolute data roots, and the images of the split
(paths, sizes, modification times and inodes). Result JSONs record the checkpoint step, the weights
hash, these inputs and a fingerprint of them, so ``sove summary`` can flag a result computed from an older checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from sove import __version__
from sove.errors import SoveError

#: Bumped whenever the meaning of a cache key changes (old caches are then recomputed).
CACHE_FORMAT = 2
#: ``data.*`` keys that determine evaluation features (roots are made absolute).
DATA_KEYS = ("source", "root", "test_root", "num_channels", "global_crop_size", "mean", "std", "on_error")


def digest(obj: Any) -> str:
    """First 16 hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict: every key, dtype, shape and the raw bytes, in sorted key order.

    The same weights give the same hash whether they come from a run's checkpoint or from an export.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_checkpoint(run_dir: str | Path, checkpoint: str = "last.pt") -> dict[str, Any]:
    """Step and teacher-backbone weights hash of ``RUN/checkpoints/<checkpoint>``.

    The file is memory-mapped: only the step and the teacher backbone's tensors are read.

    Returns:
        dict with ``path`` (str), ``step`` (int) and ``weights_sha256`` (as :func:`weights_sha256` of
        the loaded teacher backbone).

    Raises:
        SoveError: the checkpoint is missing or unreadable.
    """
    from sove.run import CHECKPOINT_DIR, checkpoint_step, teacher_backbone_state

    path = Path(run_dir) / CHECKPOINT_DIR / checkpoint
    weights = weights_sha256(teacher_backbone_state(path))
    return {"path": str(path), "step": checkpoint_step(path), "weights_sha256": weights}


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The ``data.*`` keys of :data:`DATA_KEYS`, with ``root`` / ``test_root`` as absolute paths."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    out = {k: d.get(k) for k in DATA_KEYS}
    for k in ("root", "test_root"):
        if out[k] is not None:
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """(size, modification time in ns, inode) of a file, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def items_identity(dataset: Dataset) -> dict[str, Any]:
    """Item count, a digest of the image files (folders; None for other sources) and class names.

    The digest covers each file's path, size, modification time and inode, so pictures rewritten
    or moved under the same names (a regenerated or re-sorted data set) change it; one ``stat`` per file.
    """
    source = getattr(dataset, "source", dataset)
    files = getattr(source, "files", None)
    return {"num": len(dataset), "files": None if files is None else digest([(str(f), _file_state(f)) for f in files]),
            "classes": None if getattr(source, "classes", None) is None else list(source.classes)}


def encoder_identity(weights_hash: str | None, step: int | None, arch: str, global_pool: str | None,
                     weights: Path | None) -> dict[str, Any]:
    """The part of a cache key / result inputs that describes the frozen encoder."""
    return {"format": CACHE_FORMAT, "sove": __version__, "weights_sha256": weights_hash, "step": step,
            "arch": arch, "global_pool": global_pool, "weights": None if weights is None else str(weights.resolve())}


def command_line() -> str:
    """The ``sove ...`` command that is running, for the result JSON."""
    return " ".join(["sove"] + sys.argv[1:]) if sys.argv else ""


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` atomically (temporary file, then rename; parents
    created): a crash leaves the previous file or the new one. Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_result(result: dict[str, Any], path: str | Path, encoder: dict[str, Any] | None, settings: dict[str, Any],
                 data: dict[str, Any] | None = None, splits: dict[str, Dataset] | None = None) -> Path:
    """The one writer of evaluation results: stamp ``result`` and write it atomically as JSON to ``path``.

    Adds ``command`` (:func:`command_line`, unless the protocol set it) and, by :func:`stamp`,
    ``checkpoint_step``, ``weights_sha256``, ``inputs`` and their ``fingerprint``; ``sove summary``
    compares them with the run's last checkpoint.

    Args:
        encoder: :func:`encoder_identity` of the frozen backbone (None for checkpoint-independent
            baselines: raw pixels, random init).
        settings: the protocol's settings (data folder included where it brings its own).
        data: :func:`data_identity` of the config that gave the splits, when it did.
        splits: name -> dataset, recorded as :func:`items_identity`.

    Returns:
        The path written.
    """
    result.setdefault("command", command_line())
    inputs: dict[str, Any] = {"encoder": encoder, "settings": settings}
    if data is not None:
        inputs["data"] = data
    if splits is not None:
        inputs["items"] = {name: items_identity(split) for name, split in splits.items()}
    stamp(result, inputs)
    return write_json(result, Path(path))


def stamp(result: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Add ``checkpoint_step``, ``weights_sha256``, ``inputs`` and their ``fingerprint`` to ``result``.

    ``inputs`` holds an ``encoder`` entry (:func:`encoder_identity`, or None for checkpoint-independent
    baselines) and whatever else the protocol depends on (data, settings).
    """
    encoder = inputs.get("encoder") or {}
    result.update(checkpoint_step=encoder.get("step"), weights_sha256=encoder.get("weights_sha256"),
                  inputs=inputs, fingerprint=digest(inputs))
    return result


def staleness(result: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why ``result`` no longer describes the run's checkpoint ``current`` (:func:`run_checkpoint`), or None.

    A result is current when its ``weights_sha256`` equals the checkpoint's (without a hash: when
    its step does). Results without a checkpoint (raw pixels, random init) are never stale; results
    written before sove recorded ``checkpoint_step`` are reported as of unknown age.
    """
    if "checkpoint_step" not in result:
        return f"computed at an unknown step (no checkpoint_step recorded), last checkpoint step {current['step']}"
    step, weights = result["checkpoint_step"], result.get("weights_sha256")
    if step is None and weights is None:
        return None
    same = weights == current["weights_sha256"] if weights is not None else step == current["step"]
    if same:
        return None
    if step is not None and step != current["step"]:
        return f"computed at step {step}, last checkpoint step {current['step']}"
    return f"computed from other weights than {current['path']} (step {current['step']})"


def review_results(run_dir: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
    """Read every result JSON in ``RUN/eval`` and compare it with ``RUN/checkpoints/last.pt``.

    A result is a JSON object with a ``command`` or ``checkpoint_step`` key (``concepts.json`` is not).

    Returns:
        (file name -> result, file name -> why it is stale (:func:`staleness`), notes): the notes say
        which files are stale and how to recompute them, which could not be read, and whether there
        was a checkpoint to compare with.
    """
    from sove.run import EVAL_DIR

    run_dir = Path(run_dir)
    results, notes = {}, []
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"unreadable: {path} ({e}); re-run the evaluation that wrote it")
            continue
        if isinstance(r, dict) and ("command" in r or "checkpoint_step" in r):
            results[path.name] = r
    try:
        current = run_checkpoint(run_dir)
    except SoveError as e:
        return results, {}, notes + [f"cannot tell whether the results are current: {e}"]
    stale = {name: why for name, r in results.items() if (why := staleness(r, current)) is not None}
    for name, why in stale.items():
        command = results[name].get("command") or ""
        if not command.startswith("sove eval "):
            command = f"sove eval {name.split('.')[0].split('_')[0]} --run {run_dir}"
        notes.append(f"stale: eval/{name} {why}; re-run `{command}`")
    return results, stale, notes
