"""Every random draw of sove from one seed: named streams, each a pure function of (seed, stream, keys).

A draw never depends on another one: the generator of stream ``name`` at keys ``k1, k2, ...`` is
seeded from ``numpy.random.SeedSequence(seed, spawn_key=(STREAMS[name], k1, k2, ...))`` (numpy's
own derivation of independent child streams; the seed and the keys are kept apart, so, unlike a flat
``SeedSequence([seed, k1, k2])``, a trailing zero key or a seed above 2**32 cannot alias another
draw). Adding a draw to one stream, resuming mid-epoch, changing the number of DataLoader workers or
of processes leaves every other draw as it was. The stream numbers below are fixed (never Python's
per-process ``hash()``); a new stream gets a new number, an old number is never reused.

==================  ==  =====================  ===========================================================
stream              id  keys                   what draws from it
==================  ==  =====================  ===========================================================
network_init         1  —                      student / teacher weights (torch's global RNG, forked)
feature_set_init     2  set (0 E_C, 1 E_P)     the random unit rows E_C / E_P start with
data_order           3  epoch                  the permutation of the training images of an epoch
augmentation         4  epoch, index           one image's crops, flips, colour draws and masks
anchors              5  step, task, loss       anchors and anchor keep fraction (loss: 0 CLS, 1 patch)
patch_positions      6  step                   the view-2 patch of each image that E_P receives
loader               7  —                      the DataLoader generator (its workers' base seed)
global               8  —                      torch / numpy / random global RNGs (drop path, device aug.)
linear_probe         9  —                      linear-probe head init and batch order
linear_augmentation 10  epoch                  augmented training images of a linear-probe epoch
validation_split    11  —                      held-out split choosing the probe's lr / logreg's C
lowshot_subsets     12  —                      the labelled subsets of ``sove eval lowshot``
periodic_knn        13  split (0 train, 1 test) the images of the periodic k-NN during pretraining
segmentation_probe  14  —                      segmentation linear-head init and batch order
==================  ==  =====================  ===========================================================

The training streams (1-8) derive from ``trainer.seed``; the evaluation streams from the protocol's
``--seed`` (13 from ``trainer.seed``). See docs/method.md, "Precision, memory and reproducibility".
"""

from __future__ import annotations

import numpy as np
import torch

#: The seeding scheme a checkpoint was written under (stored as ``seed_scheme``): a resume of a checkpoint of
#: another scheme (or of none: written before this module) continues, but not along the trajectory the code that
#: wrote it would have drawn, and says so (:func:`sove.train.preflight.check_resume`).
SCHEME = 1

#: Stream name -> fixed stream number (see the module docstring for keys and users).
STREAMS: dict[str, int] = {
    "network_init": 1, "feature_set_init": 2, "data_order": 3, "augmentation": 4, "anchors": 5,
    "patch_positions": 6, "loader": 7, "global": 8, "linear_probe": 9, "linear_augmentation": 10,
    "validation_split": 11, "lowshot_subsets": 12, "periodic_knn": 13, "segmentation_probe": 14,
}


def stream_seed(seed: int, stream: str, *keys: int, bits: int = 64) -> int:
    """The ``bits``-bit integer seed of stream ``stream`` at ``keys`` (a pure function of its arguments).

    Args:
        seed: the run's or the protocol's seed, an integer >= 0.
        stream: a name of :data:`STREAMS`.
        keys: integers in [0, 2**32) that pick one draw of the stream (e.g. epoch and image index).
        bits: 64, or 32 for APIs that take a 32-bit seed (``lightning``'s ``seed_everything``).

    Raises:
        ValueError: an unknown stream name, a negative seed, or a key outside [0, 2**32).
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    keys = tuple(int(k) for k in keys)
    if int(seed) < 0 or any(not 0 <= k < 2**32 for k in keys):
        raise ValueError(f"stream {stream!r} needs a seed >= 0 and keys in [0, 2**32), got seed {seed}, keys {keys}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(STREAMS[stream], *keys))
    state = sequence.generate_state(2, dtype=np.uint32)
    value = int(state[0]) << 32 | int(state[1])
    return value >> (64 - bits)


def generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`stream_seed` (identical on every process)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *keys))


def numpy_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded by :func:`stream_seed`."""
    return np.random.default_rng(stream_seed(seed, stream, *keys))
