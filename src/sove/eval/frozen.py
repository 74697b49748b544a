"""Shared plumbing of the supervised frozen-feature protocols (linear probe, low-shot; docs/evaluation.md):
the feature cache and the seeded class-balanced subsets.

The frozen backbone comes from :func:`sove.eval.encoder.load_frozen`; features of a split can be cached on
disk next to the results, keyed on everything that determines them (:mod:`sove.eval.provenance`).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from sove.eval.encoder import FrozenBackbone


def cached_extract(encoder: FrozenBackbone, dataset: Dataset, split: str, mode: str, name: str,
                   device: str = "cpu", cache: bool = True) -> torch.Tensor:
    """:func:`sove.eval.features.extract_features`, reusing ``out_dir/<name>_features_<mode>_<split>.pt``
    when it matches.

    The file stores the features and the key they were made from: the encoder identity (weights
    hash, checkpoint step, architecture, global pool), the ``data.*`` keys with absolute roots, the mode,
    the split and :func:`sove.eval.provenance.items_identity` of ``dataset`` (item count, image files
    with their sizes, modification times and inodes, class names). Any difference, or an unreadable
    file, re-extracts and atomically overwrites it. ``cache=False`` neither reads nor writes the file.

    Returns:
        float32 tensor (N, F), as :func:`~sove.eval.features.extract_features`.
    """
    from sove.eval.features import extract_features
    from sove.eval.provenance import data_identity, digest, items_identity
    from sove.train.checkpoint import atomic_save

    identity = {"encoder": encoder.identity(), "data": data_identity(encoder.cfg)}
    key = digest({**identity, "mode": mode, "split": split, "items": items_identity(dataset)})
    path = encoder.out_dir / f"{name}_features_{mode}_{split}.pt"
    if cache and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            print(f"warning: feature cache '{path}' is unreadable ({e}); extracting again", file=sys.stderr)
            stored = {}
        if stored.get("key") == key:
            return stored["features"]
    features = extract_features(encoder.module, dataset, encoder.cfg.eval.batch_size, device, f"{split} features",
                                mode=mode)
    if cache:
        atomic_save({"features": features, "key": key}, path)
    return features


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int, leave_one: bool = False) -> torch.Tensor:
    """Seeded class-balanced subset: each class keeps ``round(fraction * count)`` of its items, at least 1.

    Args:
        labels: int64 tensor (N,).
        fraction: in (0, 1].
        seed: numpy seed (the protocols pass a :func:`sove.seeding.stream_seed`); same seed, same subset.
        leave_one: cap each class at ``count - 1`` (so the complement still holds every class with
            at least 2 items); used for the held-out validation part of the linear probe.

    Returns:
        int64 tensor of sorted indices into ``labels``.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(members))))
        n = min(n, len(members) - 1) if leave_one else min(n, len(members))
        chosen.append(rng.permutation(members)[:n])
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


def balanced_subset(labels: torch.Tensor, num: int, seed: int | list[int]) -> torch.Tensor:
    """Seeded class-balanced subset of ``num`` items (all items if ``num >= N``).

    Every class gets the same share where possible: ``num // C`` each, one more for ``num % C`` of
    them (chosen by the seed); a class with fewer items gives all it has and the rest is shared
    equally among the others. Within a class the items are a seeded random draw.

    Args:
        labels: int64 tensor (N,).
        num: subset size.
        seed: numpy seed, an int or a list of ints (the periodic k-NN passes a
            :func:`sove.seeding.stream_seed`); same seed, same subset.

    Returns:
        int64 tensor of sorted indices into ``labels``.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    quota, left = np.zeros_like(counts), min(num, len(y))
    while left > 0:
        open_ = np.flatnonzero(quota < counts)
        share = left // len(open_)
        if share == 0:
            quota[rng.choice(open_, left, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    members = np.split(np.argsort(y, kind="stable"), np.cumsum(counts)[:-1])
    chosen = [rng.permutation(m)[:q] for m, q in zip(members, quota)]
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()
