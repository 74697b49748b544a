"""Weighted k-NN classification on frozen features (DINO protocol; SOVE_SPEC §7, paper Tab. 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from sove.errors import SoveError
from sove.preflight import check_writable


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, ks: list[int] | tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 256,
) -> dict[str, Any]:
    """Weighted k-NN top-1 / top-5 accuracy (Wu et al. 2018 as used by DINO).

    Each test sample takes its k most cosine-similar train samples; each votes for its label with
    weight exp(similarity / temperature). Top-5 counts a hit only among classes with a positive
    vote (classes no neighbour voted for are never "predicted", which matters when k < 5).

    Args:
        train_features: float tensor (N_train, D), L2-normalised rows.
        train_labels: int64 tensor (N_train,).
        test_features: float tensor (N_test, D), L2-normalised rows.
        test_labels: int64 tensor (N_test,).
        ks: neighbour counts to report; each is capped at N_train.
        temperature: vote temperature (0.07).
        num_classes: number of classes C (default: max label + 1).
        chunk_size: test rows per similarity chunk; peak memory O(chunk_size * N_train).

    Returns:
        dict with ``top1`` and ``top5`` (str(k) -> percent), ``best_k``, ``best_top1``,
        ``num_train``, ``num_test``, ``temperature``.

    Raises:
        ValueError: empty inputs or mismatched shapes.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test sample")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    max_k = min(max(ks), train_features.shape[0])
    hits1 = {k: 0 for k in ks}
    hits5 = {k: 0 for k in ks}
    train_features = train_features.float()
    for start in range(0, test_features.shape[0], chunk_size):
        feats = test_features[start:start + chunk_size].float()
        labels = test_labels[start:start + chunk_size]
        sim, idx = (feats @ train_features.T).topk(max_k, dim=1)  # (chunk, max_k)
        weight = (sim / temperature).exp()
        neighbour_labels = train_labels[idx]
        for k in ks:
            kk = min(k, max_k)
            votes = torch.zeros(feats.shape[0], c).scatter_add_(1, neighbour_labels[:, :kk], weight[:, :kk])
            hits1[k] += int((votes.argmax(1) == labels).sum())
            top = votes.topk(min(5, c), dim=1)
            hits5[k] += int(((top.indices == labels[:, None]) & (top.values > 0)).any(1).sum())
    n = test_features.shape[0]
    top1 = {str(k): 100.0 * hits1[k] / n for k in ks}
    top5 = {str(k): 100.0 * hits5[k] / n for k in ks}
    best_k = max(ks, key=lambda k: (top1[str(k)], -k))
    return {"top1": top1, "top5": top5, "best_k": best_k, "best_top1": top1[str(best_k)],
            "num_train": int(train_features.shape[0]), "num_test": int(n), "temperature": temperature}


def evaluate_knn(run_dir: str | Path, mode: str = "trained", overrides: list[str] | tuple[str, ...] = (),
                 device: str = "cpu") -> dict[str, Any]:
    """``sove eval knn``: k-NN on a run's labelled train/test splits; writes ``eval/knn*.json``.

    Args:
        run_dir: a directory written by ``sove pretrain``.
        mode: ``trained`` (teacher backbone of ``checkpoints/last.pt``), ``random_init`` (the same
            architecture as initialised, untrained) or ``pixels`` (raw pixels, mean-centred).
        overrides: config overrides (e.g. ``eval.knn_k=[1,5]``).
        device: device for feature extraction.

    Returns:
        The result dict of :func:`knn_classify` plus ``mode`` and ``command``; saved to
        ``eval/knn.json``, ``eval/knn_random_init.json`` or ``eval/knn_pixels.json``.

    Raises:
        SoveError: not a run directory, no checkpoint, unlabelled data, ``RUN/eval`` not writable.
    """
    from sove.eval.features import (eval_split, extract_features, labels_of, load_run_config, pixel_features,
                                    random_init_backbone, teacher_backbone)

    if mode not in ("trained", "random_init", "pixels"):
        raise SoveError(f"unknown k-NN mode {mode!r}; use trained, random_init or pixels")
    cfg = load_run_config(run_dir, overrides)
    check_writable(Path(run_dir) / "eval", "k-NN results")  # before minutes of feature extraction
    train, test = eval_split(cfg, "train"), eval_split(cfg, "test")
    if mode == "pixels":
        train_f, center = pixel_features(train)
        test_f, _ = pixel_features(test, center)
    else:
        backbone = teacher_backbone(run_dir, cfg) if mode == "trained" else random_init_backbone(cfg)
        train_f = extract_features(backbone, train, cfg.eval.batch_size, device, "train features")
        test_f = extract_features(backbone, test, cfg.eval.batch_size, device, "test features")
    result = knn_classify(train_f, labels_of(train), test_f, labels_of(test), list(cfg.eval.knn_k),
                          cfg.eval.knn_temperature)
    result.update(mode=mode, command=" ".join(["sove"] + sys.argv[1:]) if sys.argv else "")
    name = {"trained": "knn.json", "random_init": "knn_random_init.json", "pixels": "knn_pixels.json"}[mode]
    out = Path(run_dir) / "eval" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
