"""Weighted k-NN classification on frozen features (DINO protocol, paper Tab. 1; docs/evaluation.md, "k-NN")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Subset

from sove.errors import SoveError
from sove.preflight import check_writable
from sove.seeding import stream_seed


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


def knn_on_splits(train_features: torch.Tensor, train: Any, test_features: torch.Tensor, test: Any,
                  ks: list[int] | tuple[int, ...], temperature: float, list_dir: str | Path) -> dict[str, Any]:
    """:func:`knn_classify` on the features of :func:`sove.eval.features.eval_splits`' train and test
    splits, the rows of unreadable images dropped with their labels (:func:`sove.eval.features.readable_rows`,
    lists in ``list_dir``); C = the train split's number of classes.

    Raises:
        DataError: an unreadable image with ``data.on_error=raise``, or every image of a split unreadable.
    """
    from sove.eval.features import labels_of, readable_rows

    keep_train = readable_rows(train_features, train, "train", list_dir)
    keep_test = readable_rows(test_features, test, "test", list_dir)
    return knn_classify(train_features[keep_train], labels_of(train)[keep_train], test_features[keep_test],
                        labels_of(test)[keep_test], ks, temperature, num_classes=len(train.source.classes))


#: Modes of ``sove eval knn``, in the order ``--all`` runs them, and their result files in ``RUN/eval``.
KNN_MODES = {"trained": "knn.json", "random_init": "knn_random_init.json", "pixels": "knn_pixels.json"}
#: Largest decoded splits (bytes of float32 images) that :func:`evaluate_knn_modes` keeps in memory.
DECODED_LIMIT = 2 * 2**30


def evaluate_knn(run_dir: str | Path | None, mode: str = "trained", overrides: list[str] | tuple[str, ...] = (),
                 device: str = "cpu", backbone: str | Path | None = None) -> dict[str, Any]:
    """``sove eval knn``: k-NN on the labelled train/test splits; writes ``eval/knn*.json``.

    Args:
        run_dir: a directory written by ``sove pretrain`` (its config gives the data and, without
            ``backbone``, its ``checkpoints/last.pt`` the teacher).
        mode: ``trained`` (the frozen backbone), ``random_init`` (the run's architecture as initialised,
            untrained) or ``pixels`` (raw pixels, mean-centred); the baselines need ``run_dir``.
        overrides: config overrides (e.g. ``eval.knn_k=[1,5]``).
        device: device for feature extraction.
        backbone: an exported backbone.json or a ``RUN/checkpoints/FILE.pt`` instead of the run's last
            checkpoint (:func:`sove.eval.encoder.load_frozen`; without ``run_dir`` the data come from
            the package defaults ⊕ the export's preprocessing ⊕ ``overrides``).

    Returns:
        The result dict of :func:`knn_classify` plus ``mode``, ``command``, ``seconds`` (wall time of
        the mode's features and k-NN) and the provenance (:func:`sove.eval.provenance.write_result`:
        ``checkpoint_step`` and ``weights_sha256`` of the trained teacher, None for the baselines;
        ``inputs``; ``fingerprint``); saved to ``eval/knn.json``, ``eval/knn_random_init.json`` or
        ``eval/knn_pixels.json`` (in the results folder of :func:`sove.eval.encoder.results_dir`).

    Test labels are numbered by the train split's class names (:func:`sove.eval.features.eval_splits`);
    unreadable images follow ``data.on_error`` (:func:`sove.eval.features.readable_rows`).

    Raises:
        SoveError: unknown mode, not a run directory, no checkpoint, unlabelled data, an unreadable
            image with ``data.on_error=raise``, the results folder not writable.
    """
    return evaluate_knn_modes(run_dir, (mode,), overrides, device, backbone)[mode]


def evaluate_knn_modes(run_dir: str | Path | None, modes: tuple[str, ...] | list[str] = tuple(KNN_MODES),
                       overrides: list[str] | tuple[str, ...] = (), device: str = "cpu",
                       backbone: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_knn` for several modes in one pass (``sove eval knn --all``): the splits are read and
    preprocessed once (kept in memory as float32 when they take at most :data:`DECODED_LIMIT` bytes),
    pixels need no network pass, each network extracts the train and test features once. The results
    are those of separate :func:`evaluate_knn` calls.

    Returns:
        mode -> result dict (as :func:`evaluate_knn`), in the order of ``modes``.

    Raises:
        SoveError: as :func:`evaluate_knn`.
    """
    from sove.eval.encoder import load_frozen, results_dir
    from sove.eval.features import eval_splits
    from sove.run import Run

    bad = [m for m in modes if m not in KNN_MODES]
    if bad:
        raise SoveError(f"unknown k-NN mode {bad[0]!r}; use {', '.join(KNN_MODES)}")
    if run_dir is None and set(modes) != {"trained"}:
        raise SoveError("--random-init, --pixels and --all need --run RUN_DIR (the run's architecture, seed and data)")
    out_dir = results_dir(run_dir, backbone)
    check_writable(out_dir, "k-NN results")  # before minutes of feature extraction
    frozen = None
    if run_dir is None:  # an export or a checkpoint alone: its data config comes with it
        frozen = load_frozen(None, backbone, overrides, device)
    cfg = frozen.cfg if frozen is not None else Run(run_dir, overrides=overrides).config
    splits = eval_splits(cfg)
    inputs = [_decoded(s) for s in splits] if len(modes) > 1 else list(splits)
    results = {}
    for mode in modes:
        if mode == "trained" and frozen is None:
            frozen = load_frozen(run_dir, backbone, overrides, device)
        results[mode] = _evaluate_mode(mode, frozen, device, cfg, splits, inputs, out_dir)
    return results


def _decoded(split: Any) -> Any:
    """``split`` read and preprocessed once, as a TensorDataset of (image, label) items (unreadable images
    stay all-NaN markers, recorded in ``split.unreadable``); ``split`` itself when too large for memory."""
    from torch.utils.data import DataLoader, TensorDataset

    image = split[0][0] if len(split) else None
    if image is None or len(split) * image.numel() * 4 > DECODED_LIMIT:
        return split
    images, labels = zip(*DataLoader(split, batch_size=1024, shuffle=False, num_workers=0))
    return TensorDataset(torch.cat(images), torch.cat(labels))


def _evaluate_mode(mode: str, frozen: Any, device: str, cfg: DictConfig, splits: tuple[Any, Any],
                   inputs: list[Any], out_dir: Path) -> dict[str, Any]:
    """One mode of :func:`evaluate_knn_modes`: features of ``inputs`` (the splits, maybe decoded), k-NN with
    the labels and unreadable lists of ``splits``, the result JSON in ``out_dir``."""
    import time

    from sove.eval.features import extract_features, pixel_features, random_init_backbone
    from sove.eval.provenance import data_identity, write_result

    start = time.perf_counter()
    train, test = splits
    encoder = None
    if mode == "pixels":
        train_f, center = pixel_features(inputs[0])
        test_f, _ = pixel_features(inputs[1], center)
    else:
        if mode == "trained":
            backbone, encoder = frozen.module, frozen.identity()
        else:
            backbone = random_init_backbone(cfg)
        train_f = extract_features(backbone, inputs[0], cfg.eval.batch_size, device, "train features")
        test_f = extract_features(backbone, inputs[1], cfg.eval.batch_size, device, "test features")
    result = knn_on_splits(train_f, train, test_f, test, list(cfg.eval.knn_k), cfg.eval.knn_temperature, out_dir)
    result.update(mode=mode, seconds=time.perf_counter() - start)
    arch = cfg.model.arch if frozen is None or frozen.run is not None else frozen.arch
    settings = {"mode": mode, "knn_k": list(cfg.eval.knn_k), "knn_temperature": cfg.eval.knn_temperature,
                "seed": cfg.trainer.seed if mode == "random_init" else None, "arch": arch}
    write_result(result, out_dir / KNN_MODES[mode], encoder, settings, data_identity(cfg),
                 {"train": train, "test": test})
    return result


def estimate_knn_seconds(cfg: DictConfig, sample: int = 2048, device: str = "cpu") -> float:
    """Seconds :func:`evaluate_knn_modes` will take for all three modes on this machine, from a probe.

    The probe reads and preprocesses ``sample`` train images, runs the (untrained) backbone on them
    and times one chunk of k-NN queries against a random bank of the train split's size at the
    pixel and the feature width; each is scaled to the full splits (read once, two networks,
    three k-NNs). Used by ``make demo`` to leave the evaluation its time inside the demo's budget.

    Raises:
        DataError: the data has no labels or no test split (:func:`sove.eval.features.eval_splits`).
    """
    import time

    from sove.eval.features import eval_splits, extract_features, random_init_backbone

    train, test = eval_splits(cfg)
    n_train, n_all = len(train), len(train) + len(test)
    idx = torch.linspace(0, n_train - 1, min(sample, n_train)).long().tolist()
    start = time.perf_counter()
    images = Subset(train, idx)
    decoded = [images[i] for i in range(len(images))]
    read = time.perf_counter() - start
    backbone = random_init_backbone(cfg)
    start = time.perf_counter()
    feats = extract_features(backbone, decoded, cfg.eval.batch_size, device, "probe")
    forward = time.perf_counter() - start
    knn = 0.0
    g = torch.Generator().manual_seed(0)
    for dim in (decoded[0][0].numel(), feats.shape[1], feats.shape[1]):
        bank = torch.nn.functional.normalize(torch.randn(n_train, dim, generator=g), dim=1)
        queries = bank[:256]
        start = time.perf_counter()
        knn_classify(bank, torch.zeros(n_train, dtype=torch.long), queries, torch.zeros(256, dtype=torch.long),
                     list(cfg.eval.knn_k), cfg.eval.knn_temperature, num_classes=10)
        knn += (time.perf_counter() - start) * len(test) / 256
    return (read + 2 * forward) * n_all / len(idx) + knn


def periodic_subsets(cfg: DictConfig, sources: tuple[Any, Any] | None = None) -> tuple[Subset, Subset, str]:
    """The labelled train and test subsets of the periodic k-NN during pretraining.

    ``sources``: labelled (train, test) sources to use instead of the config's data (the Python datasets
    of ``sove.pretrain(dataset=..., test_dataset=...)``, :class:`sove.data.python_source.PythonSource`,
    their integer labels numbering the same classes).

    ``eval.knn_train_subset`` train and ``eval.knn_test_subset`` test images, each a seeded
    class-balanced draw (:func:`sove.eval.frozen.balanced_subset`) from the ``periodic_knn`` stream of
    ``trainer.seed`` at the split index (:mod:`sove.seeding`): the same images at every evaluation of the run (and
    after a resume), and no draw from the training RNGs. Images are preprocessed as by ``sove eval knn``.

    Returns:
        (train subset, test subset, a description for the log, e.g. ``class-balanced subset: 1000
        train / 500 test images of 10 classes, seed 0``).

    Raises:
        DataError: the data has no labels or no test split (see :func:`sove.eval.features.eval_splits`).
    """
    from sove.eval.features import eval_splits, labels_of
    from sove.eval.frozen import balanced_subset

    e, seed = cfg.eval, int(cfg.trainer.seed)
    subsets = []
    if sources is None:
        splits = eval_splits(cfg)  # test labels numbered by the train split's class names
    else:
        from sove.eval.features import EvalImages

        d = cfg.data
        splits = tuple(EvalImages(source, d.global_crop_size, d.mean, d.std, d.on_error) for source in sources)
    for code, (dataset, num) in enumerate(zip(splits, (e.knn_train_subset, e.knn_test_subset))):
        idx = balanced_subset(labels_of(dataset), num, stream_seed(seed, "periodic_knn", code))
        subsets.append(Subset(dataset, idx.tolist()))
    train, test = subsets
    classes = len(torch.unique(subset_labels(train)))
    return train, test, (f"class-balanced subset: {len(train)} train / {len(test)} test images of {classes} "
                         f"classes, seed {seed}")


def subset_labels(subset: Subset) -> torch.Tensor:
    """int64 tensor (len(subset),) of the labels of a :class:`~torch.utils.data.Subset` of ``EvalImages``."""
    from sove.eval.features import labels_of

    return labels_of(subset.dataset)[torch.as_tensor(subset.indices, dtype=torch.long)]
