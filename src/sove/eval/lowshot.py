"""Low-shot evaluation: weighted k-NN and logistic regression on 1% / 10% labelled subsets (paper Tab. A.1).

The frozen features are the ones ``sove eval knn`` uses (L2-normalised CLS after the final norm of the
teacher backbone). Subsets are drawn from the train split, class-balanced and seeded (each class keeps
``round(percent / 100 * count)`` of its images, at least one), or read from SimCLR-style subset files.
Every classifier is evaluated on the full test split.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sove.errors import SoveError
from sove.seeding import stream_seed

#: Inverse regularisation strengths tried for the logistic regression.
LOGREG_CS = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: C used when the subset is too small to hold anything out (every class has a single image).
LOGREG_FALLBACK_C = 10.0


def subset_identifiers(source: Dataset) -> dict[str, int]:
    """Identifier -> index of every train item, as accepted in a subset file.

    Image folders: the path relative to ``data.root`` with ``/`` separators (``dog/img_001.png``) and,
    when it names exactly one file, the bare file name (``img_001.png``; SimCLR's ImageNet lists, e.g.
    ``n01440764_10026.JPEG``, use this form). Other sources (Fashion-MNIST): ``train/<index>``, 0-based.
    """
    files = getattr(source, "files", None)
    if files is None:
        return {f"train/{i}": i for i in range(len(source))}
    root = Path(source.root)
    ids = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    names: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        names.setdefault(f.name, []).append(i)
    ids.update({name: idx[0] for name, idx in names.items() if len(idx) == 1 and name not in ids})
    return ids


def read_subset_file(path: str | Path, source: Dataset) -> torch.Tensor:
    """Indices of the train items listed in a subset file (one identifier per line, SimCLR format).

    Blank lines and lines starting with ``#`` are skipped; identifiers as in :func:`subset_identifiers`.

    Returns:
        int64 tensor of sorted indices.

    Raises:
        SoveError: the file is missing or lists nothing; a line names no train item or repeats one
            (the message gives ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise SoveError(f"subset file '{path}' not found")
    ids = subset_identifiers(source)
    seen: dict[int, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry not in ids:
            example = next(iter(ids))
            raise SoveError(f"{path}:{number}: '{entry}' is not an item of the train split "
                            f"(expected identifiers like '{example}')")
        if ids[entry] in seen:
            raise SoveError(f"{path}:{number}: '{entry}' is listed twice (first on line {seen[ids[entry]]})")
        seen[ids[entry]] = number
    if not seen:
        raise SoveError(f"subset file '{path}' lists no image")
    return torch.tensor(sorted(seen), dtype=torch.long)


def logistic_regression(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                        test_labels: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Multinomial L2-regularised logistic regression (scikit-learn, lbfgs) and its test top-1.

    C is chosen among :data:`LOGREG_CS` on a seeded, class-balanced 20% of the training rows (each
    class keeps at least one row for fitting), then the model is refit on all training rows; when
    nothing can be held out, C = :data:`LOGREG_FALLBACK_C`. BLAS runs single-threaded (threadpoolctl):
    these small fits gain nothing from threads, and on a busy 2-core machine threads made them 20-40x slower.

    Args:
        train_features: float tensor (N_train, D), L2-normalised rows; train_labels: int64 (N_train,).
        test_features: float tensor (N_test, D); test_labels: int64 (N_test,).

    Returns:
        dict with ``top1`` (percent), ``C``, ``val_top1`` (str(C) -> percent; empty when not selected).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from sove.eval.frozen import stratified_subset

    x, y = train_features.numpy(), train_labels.numpy()
    if len(np.unique(y)) < 2:
        raise SoveError("logistic regression needs labelled images of at least 2 classes in the subset")

    def fit(rows: np.ndarray, c: float) -> LogisticRegression:
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x[rows], y[rows])

    val = stratified_subset(train_labels, 0.2, stream_seed(seed, "validation_split"), leave_one=True).numpy()
    fit_rows = np.setdiff1d(np.arange(len(y)), val)
    scores: dict[str, float] = {}
    best_c = LOGREG_FALLBACK_C
    if len(val) and len(np.unique(y[fit_rows])) > 1:
        scores = {str(c): 100.0 * float(fit(fit_rows, c).score(x[val], y[val])) for c in LOGREG_CS}
        best_c = max(LOGREG_CS, key=lambda c: (scores[str(c)], -c))
    model = fit(np.arange(len(y)), best_c)
    top1 = 100.0 * float(model.score(test_features.numpy(), test_labels.numpy()))
    return {"top1": top1, "C": best_c, "val_top1": scores}


def lowshot_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     test_labels: torch.Tensor, subset: torch.Tensor,
                     ks: list[int] | tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07,
                     seed: int = 0) -> dict[str, Any]:
    """k-NN (:func:`sove.eval.knn.knn_classify`) and logistic regression trained on ``subset`` rows only.

    Args:
        train_features: float tensor (N_train, D), L2-normalised; train_labels: int64 (N_train,).
        test_features, test_labels: the full test split, (N_test, D) and (N_test,).
        subset: int64 indices into the train rows (the labelled images).
        ks, temperature: k-NN settings (each k capped at the subset size).

    Returns:
        dict with ``num_labelled``, ``knn_top1`` / ``knn_top5`` (str(k) -> percent), ``knn_best_k``,
        ``knn_best_top1``, ``logreg_top1``, ``logreg_C``, ``logreg_val_top1``.
    """
    from sove.eval.knn import knn_classify

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x, y = train_features[subset], train_labels[subset]
    knn = knn_classify(x, y, test_features, test_labels, list(ks), temperature, num_classes)
    logreg = logistic_regression(x, y, test_features, test_labels, seed)
    return {"num_labelled": int(len(subset)), "knn_top1": knn["top1"], "knn_top5": knn["top5"],
            "knn_best_k": knn["best_k"], "knn_best_top1": knn["best_top1"], "logreg_top1": logreg["top1"],
            "logreg_C": logreg["C"], "logreg_val_top1": logreg["val_top1"]}


def evaluate_lowshot(
    run_dir: str | Path | None = None, backbone: str | Path | None = None,
    percents: list[float] | tuple[float, ...] = (1.0, 10.0), subset_files: list[str] | tuple[str, ...] = (),
    seed: int = 0, cache: bool = True, overrides: list[str] | tuple[str, ...] = (), device: str = "cpu",
) -> dict[str, Any]:
    """``sove eval lowshot``: frozen k-NN and logistic regression on labelled subsets of the train split.

    Args:
        run_dir / backbone: see :func:`sove.eval.encoder.load_frozen`.
        percents: subset sizes in percent of each class, each in (0, 100]; ignored when
            ``subset_files`` are given.
        subset_files: SimCLR-style lists (see :func:`read_subset_file`); one result per file.
        seed: subset sampling and C selection seed.
        cache: reuse/write ``<out_dir>/lowshot_features_global_<split>.pt``.
        overrides: config overrides (``data.*``, ``eval.knn_k``, ``eval.knn_temperature``).

    Returns:
        dict with ``subsets`` (key: the percent as written, e.g. ``"1"``, or the subset file path ->
        :func:`lowshot_classify` result plus ``percent`` (labelled share of the train split), ``seed``,
        ``subset_file``), ``num_train``, ``num_test``, ``knn_temperature``, ``command`` and the
        provenance of :func:`sove.eval.provenance.write_result` (the settings include the SHA-256 of
        every subset file); written to ``<out_dir>/lowshot.json``.

    Test labels are numbered by the train split's class names (:func:`sove.eval.features.eval_splits`);
    unreadable images follow ``data.on_error`` (:func:`sove.eval.features.readable_rows`; skipped ones are
    left out of every count and subset).

    Raises:
        SoveError: a percent outside (0, 100], a bad subset file, unlabelled data or an unreadable image
            with ``data.on_error=raise`` (DataError).
    """
    from sove.eval.encoder import load_frozen
    from sove.eval.features import eval_splits, labels_of, readable_rows
    from sove.eval.frozen import cached_extract, stratified_subset
    from sove.eval.provenance import command_line, data_identity, write_result

    bad = [p for p in percents if not 0.0 < p <= 100.0]
    if bad:
        raise SoveError(f"--percent must be in (0, 100], got {bad[0]:g}")
    if not percents and not subset_files:
        raise SoveError("give --percent values or --subset-file lists")
    encoder = load_frozen(run_dir, backbone, overrides, results="results and feature caches")
    train, test = eval_splits(encoder.cfg)
    listed = {str(f): read_subset_file(f, train.source) for f in subset_files}
    train_f = cached_extract(encoder, train, "train", "global", "lowshot", device, cache)
    test_f = cached_extract(encoder, test, "test", "global", "lowshot", device, cache)
    keep_train = readable_rows(train_f, train, "train", encoder.out_dir)
    keep_test = readable_rows(test_f, test, "test", encoder.out_dir)
    train_f, y_train = train_f[keep_train], labels_of(train)[keep_train]
    test_f, y_test = test_f[keep_test], labels_of(test)[keep_test]
    row = torch.cumsum(keep_train, 0) - 1  # split index -> row of the readable train features
    if subset_files:  # unreadable listed images are left out of their subset
        subsets = {f: (row[idx[keep_train[idx]]], f) for f, idx in listed.items()}
        empty = [f for f, (idx, _) in subsets.items() if len(idx) == 0]
        if empty:
            raise SoveError(f"every image listed in subset file '{empty[0]}' is unreadable")
    else:
        subsets = {f"{p:g}": (stratified_subset(y_train, p / 100.0, stream_seed(seed, "lowshot_subsets")), None)
                   for p in percents}
    e = encoder.cfg.eval
    results = {}
    for name, (idx, path) in tqdm(subsets.items(), desc="low-shot", unit="subset", leave=False):
        r = lowshot_classify(train_f, y_train, test_f, y_test, idx, list(e.knn_k), e.knn_temperature, seed)
        results[name] = {"percent": 100.0 * len(idx) / len(y_train), "seed": seed, "subset_file": path, **r}
    result = {"subsets": results, "num_train": int(len(y_train)), "num_test": int(len(y_test)),
              "knn_temperature": e.knn_temperature,
              "features": "L2-normalised CLS (model.global_pool), as sove eval knn",
              "command": command_line()}
    files = {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in subset_files}
    write_result(result, encoder.out_dir / "lowshot.json", encoder.identity(),
                 {"percents": [] if subset_files else list(percents), "subset_files_sha256": files, "seed": seed,
                  "knn_k": list(e.knn_k), "knn_temperature": e.knn_temperature},
                 data_identity(encoder.cfg), {"train": train, "test": test})
    return result
