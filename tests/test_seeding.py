"""One seeding scheme: named streams of sove.seeding (docs/method.md, "Precision, memory and reproducibility")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sove.data.sampler import ResumableSampler
from sove.seeding import STREAMS, generator, numpy_rng, stream_seed


def test_stream_numbers_are_fixed():
    # Renumbering a stream silently changes every run's draws: the table is part of the format.
    assert STREAMS == {
        "network_init": 1, "feature_set_init": 2, "data_order": 3, "augmentation": 4, "anchors": 5,
        "patch_positions": 6, "loader": 7, "global": 8, "linear_probe": 9, "linear_augmentation": 10,
        "validation_split": 11, "lowshot_subsets": 12, "periodic_knn": 13, "segmentation_probe": 14,
    }


def test_stream_seed_is_the_seed_sequence_of_seed_stream_and_keys():
    # numpy's SeedSequence is stable across versions and processes (no per-process hash()).
    assert stream_seed(0, "data_order", 0) == 10211092977287034356
    assert stream_seed(0, "anchors", 5, 1, 0) == 8706279771428449047
    assert stream_seed(0, "network_init") == 2891495331969630074
    words = np.random.SeedSequence(0, spawn_key=(5, 5, 1, 0)).generate_state(2, dtype=np.uint32)
    assert stream_seed(0, "anchors", 5, 1, 0) == int(words[0]) << 32 | int(words[1])
    assert stream_seed(7, "augmentation", 2, 31, bits=32) == stream_seed(7, "augmentation", 2, 31) >> 32
    a, b = generator(3, "anchors", 1, 0, 0), generator(3, "anchors", 1, 0, 0)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert numpy_rng(3, "lowshot_subsets").integers(1 << 30) == numpy_rng(3, "lowshot_subsets").integers(1 << 30)


def test_no_two_draws_share_a_seed():
    # Regression: the flat SeedSequence([seed, step, task, 0]) of the CLS anchors equalled the
    # SeedSequence([seed, epoch, index]) of image `task`'s augmentation in epoch `step` (numpy ignores
    # trailing zero words), and `seed + epoch` / `seed + 1` made neighbouring seeds share orders and rows.
    seeds = {(stream, seed, keys): stream_seed(seed, stream, *keys)
             for stream in STREAMS for seed in (0, 1, 2**32) for keys in ((), (0,), (1,), (0, 0), (1, 0), (1, 0, 0))}
    assert len(set(seeds.values())) == len(seeds)


def test_neighbouring_seeds_do_not_share_data_order():
    # Regression: epoch e of seed s was randperm from seed s + e, so seed 1 replayed seed 0's epoch 1.
    order = lambda seed, epoch: ResumableSampler(64, 8, seed=seed).epoch_indices(epoch)  # noqa: E731
    assert not torch.equal(order(1, 0), order(0, 1))
    assert torch.equal(order(1, 0), order(1, 0))


def test_neighbouring_seeds_do_not_share_feature_set_rows(tiny_cfg):
    # Regression: E_C started from seed s and E_P from seed s + 1, so E_P of seed 0 was E_C of seed 1.
    from sove.method import SOVE

    sizes = ["data.root=unused", "loss.cls_feature_set_size=24", "loss.patch_feature_set_size=24"]
    zero, one = SOVE(tiny_cfg(*sizes, "trainer.seed=0")), SOVE(tiny_cfg(*sizes, "trainer.seed=1"))
    assert not torch.equal(zero.patch_fs.features, one.cls_fs.features)
    assert not torch.equal(zero.cls_fs.features, zero.patch_fs.features)
    assert torch.equal(zero.cls_fs.features, SOVE(tiny_cfg(*sizes, "trainer.seed=0")).cls_fs.features)


def test_network_init_is_seeded_and_leaves_the_global_rng_alone(tiny_cfg):
    # Regression: build_networks(cfg, seed) called torch.manual_seed(seed), resetting the caller's RNG.
    from sove.models import build_networks

    cfg = tiny_cfg("data.root=unused")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    student, _ = build_networks(cfg, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    again, other = build_networks(cfg, seed=0)[0], build_networks(cfg, seed=1)[0]
    weights = [(k, v) for k, v in student.state_dict().items() if k.endswith("qkv.weight")]
    assert weights and all(torch.equal(v, again.state_dict()[k]) for k, v in weights)
    assert not any(torch.equal(v, other.state_dict()[k]) for k, v in weights)


def test_bad_stream_seed_or_key_is_refused():
    with pytest.raises(ValueError, match="unknown random stream 'anchor'; known: network_init, "):
        stream_seed(0, "anchor")
    with pytest.raises(ValueError, match=r"stream 'data_order' needs a seed >= 0 and keys in \[0, 2\*\*32\), got seed -1"):
        stream_seed(-1, "data_order", 0)
    with pytest.raises(ValueError, match=r"keys \(4294967296,\)"):
        stream_seed(0, "data_order", 2**32)
