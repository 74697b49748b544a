"""``sove embed``: teacher-backbone embeddings of any image folder (or a run's split) to .npy + .csv."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sove.errors import SoveError
from sove.preflight import check_writable
from sove.train.checkpoint import atomic_write


@torch.no_grad()
def embed(out: str | Path, run_dir: str | Path | None = None, backbone: str | Path | None = None,
          images: str | Path | None = None, split: str | None = None, batch_size: int = 256,
          on_error: str | None = None) -> dict[str, Any]:
    """Embed images with a trained teacher backbone; L2-normalised global feature after the final
    norm ([CLS], or the mean patch token with ``model.global_pool=mean_patch``; Swin: mean final-stage token).

    Exactly the features ``sove eval knn`` uses, so a k-NN on them reproduces its numbers.

    Args:
        out: output prefix (:func:`output_paths`): writes ``<out>.npy`` (float32, shape (N, D)) and ``<out>.csv``
            (columns ``row, item, label``: ``item`` is the file path or the dataset index, ``label``
            the class name — the sub-folder name, or the Fashion-MNIST class — empty when unlabelled).
        run_dir: a run directory (its teacher backbone and preprocessing), or
        backbone: an exported ``backbone.json`` (``sove export``) or a ``RUN/checkpoints/FILE.pt``
            (both loaded by :func:`sove.eval.encoder.load_frozen`).
        images: a folder of images (flat or one sub-folder per class) or shards of one (``sove shard``), or
        split: ``train`` / ``test`` of the run's own data (needs ``run_dir``).
        batch_size: images per forward.
        on_error: unreadable images: ``skip`` (left out, listed in ``<out>.unreadable.txt``) or ``raise``
            (stop at the first, naming it); default: the run's ``data.on_error``, else ``skip``.

    Returns:
        dict with ``npy``, ``csv``, ``shape``, ``skipped`` (messages of the distinct unreadable files) and
        ``report`` (the one-line summary of them, None when every image was read).

    Raises:
        SoveError: neither or both of run_dir/backbone, or of images/split; an empty folder; a bad
            ``on_error``; an unreadable image with ``on_error=raise`` (DataError); the output folder is
            not writable; DiskFullError: no space for an output (each file is written atomically).
    """
    from sove.data import build_source
    from sove.data.decode import unreadable_report
    from sove.data.shards import folder_or_shards
    from sove.eval.encoder import load_frozen
    from sove.eval.features import EvalImages, image_features

    if (run_dir is None) == (backbone is None):
        raise SoveError("sove embed: give exactly one of --run RUN_DIR or --backbone backbone.json")
    if (images is None) == (split is None):
        raise SoveError("sove embed: give exactly one of --images DIR or --split train|test")
    check_writable(Path(out).parent, "embeddings")
    frozen = load_frozen(run_dir, backbone)
    on_error = on_error or (frozen.cfg.data.on_error if frozen.run is not None else "skip")
    if on_error not in ("skip", "raise"):
        raise SoveError(f"sove embed: --on-error must be skip or raise, got {on_error!r}")
    if images is not None:
        source = folder_or_shards(images, frozen.channels, "--images")
        names = [str(source.path(i)) for i in range(len(source))]
    else:
        if frozen.run is None:
            raise SoveError("sove embed --split needs --run RUN_DIR (the run's data)")
        d = frozen.cfg.data
        source = build_source(d.source, d.root, split, d.download, d.num_channels, d.test_root)
        names = [str(i) for i in range(len(source))]
    labels, classes = getattr(source, "labels", None), getattr(source, "classes", None)
    dataset = EvalImages(source, frozen.image_size, frozen.mean, frozen.std, on_error)
    feats, rows = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="embed", unit="batch", leave=False):
        batch = [(i, dataset[i][0]) for i in range(start, min(start + batch_size, len(dataset)))]
        batch = [(i, image) for i, image in batch if i not in dataset.unreadable]
        if batch:
            x = torch.stack([image for _, image in batch])
            feats.append(image_features(frozen.module, x, "global").numpy())
            rows += [(names[i], "" if labels is None else classes[labels[i]]) for i, _ in batch]
    skipped = list(dataset.unreadable.values())
    if not rows:
        raise SoveError(f"sove embed: no readable image ({len(skipped)} unreadable)")
    array = np.concatenate(feats)
    npy, table, unreadable = output_paths(out)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["row", "item", "label"])
    writer.writerows((r, name, label) for r, (name, label) in enumerate(rows))
    atomic_write(npy, lambda f: np.save(f, array))
    atomic_write(table, lambda f: f.write(text.getvalue().encode()))
    report = unreadable_report(skipped, len(dataset), unreadable) if skipped else None
    return {"npy": str(npy), "csv": str(table), "shape": array.shape, "skipped": skipped, "report": report}


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``<out>.npy``, ``<out>.csv`` and ``<out>.unreadable.txt`` for the prefix ``out`` (dots in it kept:
    ``emb/run.v2`` gives ``emb/run.v2.npy``; a trailing ``.npy`` or ``.csv`` is taken as the prefix's)."""
    out = Path(out)
    if out.suffix in (".npy", ".csv"):
        out = out.with_suffix("")
    return tuple(out.with_name(out.name + ext) for ext in (".npy", ".csv", ".unreadable.txt"))
