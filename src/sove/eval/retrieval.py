"""Image retrieval on revisited Oxford / Paris (Radenović et al. 2018; paper Tab. 5; docs/evaluation.md).

A dataset folder holds ``jpg/<image>.jpg`` and ``gnd_<name>.pkl``: a dict with ``imlist`` (database
image names), ``qimlist`` (query image names) and ``gnd`` (one dict per query with index lists
``easy``, ``hard``, ``junk`` into ``imlist`` and the query box ``bbx`` = [x1, y1, x2, y2] in pixels).
Query cropping is a choice (``query_crop``): ``"bbox"`` (default) crops each query to its
``bbx``, the revisited protocol's own convention (its reference example, ``revisitop``
``example_process_images.py``, crops every query with ``gnd[i]['bbx']``); ``"none"`` encodes the
whole query image, as DINO's ``eval_image_retrieval.py`` does (the script the multi-scale
descriptor below comes from). Every image is encoded at three scales (1, 1/√2, 1/2) of its
resized size; the frozen global features ([CLS]) of the scales are summed and L2-normalised, and
the database is ranked by cosine similarity. Medium: positives easy + hard, junk ignored.
Hard: positives hard, easy + junk ignored.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sove.errors import DataError, SoveError
from sove.eval.encoder import FrozenBackbone, load_frozen, result_path
from sove.eval.provenance import write_result

#: Image scales of the multi-scale descriptor (DINO's ``eval_image_retrieval.py --multiscale``; docs/method.md, "Evaluation protocols").
SCALES = (1.0, 1 / math.sqrt(2), 0.5)
#: Cut-offs of the mean precision mP@k.
KAPPAS = (1, 5, 10)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Query-cropping conventions: the revisited protocol's box crop, or the whole image (DINO).
QUERY_CROPS = ("bbox", "none")


def average_precision(ranks: np.ndarray, num_positives: int) -> float:
    """Average precision of the revisited protocol (trapezoidal interpolation of precision).

    Each positive, found at 0-based rank r_j (junk removed) as the (j+1)-th positive, adds
    (1 / num_positives) × (p_before + p_at) / 2 with p_before = j / r_j (1 when r_j = 0) and
    p_at = (j + 1) / (r_j + 1): the precision just before and at the hit.

    Args:
        ranks: int array (found,), sorted 0-based ranks of the positives in the ranking after
            junk images are removed.
        num_positives: positives of the query (>= len(ranks)).

    Returns:
        AP in [0, 1]; NaN when the query has no positive.
    """
    if num_positives == 0:
        return float("nan")
    r = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(r), dtype=np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    at = (j + 1) / (r + 1)
    return float(((before + at) / 2).sum() / num_positives)


def precision_at(ranks: np.ndarray, k: int) -> float:
    """Revisited-protocol precision at k: positives within the first k' = min(k, last positive's rank)
    results, divided by k' (1-based ranks after junk removal), so a query with fewer than k
    positives can still reach 1. NaN when ``ranks`` is empty.
    """
    if len(ranks) == 0:
        return float("nan")
    one_based = np.asarray(ranks) + 1
    kq = min(int(one_based.max()), k)
    return float((one_based <= kq).sum() / kq)


def query_metrics(ranking: np.ndarray, positives: Sequence[int], junk: Sequence[int],
                  kappas: Sequence[int] = KAPPAS) -> tuple[float, list[float]]:
    """AP and precision@k of one query.

    Args:
        ranking: int array (num_database,), database indices from most to least similar.
        positives, junk: database indices; junk images are removed from the ranking.

    Returns:
        (AP, [P@k for k in kappas]); NaN values when there is no positive.
    """
    is_pos = np.isin(ranking, np.asarray(positives, dtype=np.int64))
    is_junk = np.isin(ranking, np.asarray(junk, dtype=np.int64))
    pos = np.flatnonzero(is_pos & ~is_junk)
    ranks = pos - np.searchsorted(np.flatnonzero(is_junk), pos)  # junk ranked before each hit removed
    return average_precision(ranks, len(set(positives) - set(junk))), [precision_at(ranks, k) for k in kappas]


def revisited_metrics(ranking: np.ndarray, gnd: list[dict], kappas: Sequence[int] = KAPPAS) -> dict[str, Any]:
    """mAP and mP@k (percent) for the Medium and Hard setups of the revisited protocol.

    Args:
        ranking: int array (num_queries, num_database): per query, database indices best first.
        gnd: per query a dict with index lists ``easy``, ``hard``, ``junk``.

    Returns:
        ``{"medium": {...}, "hard": {...}}``, each with ``mAP``, ``mP@k`` per k (percent, mean over
        queries that have a positive in that setup), ``ap`` (per-query AP in percent, None for a
        query without positive) and ``num_queries`` (queries counted).
    """
    out = {}
    for setup in ("medium", "hard"):
        aps, prs = [], []
        for q, g in enumerate(gnd):
            if setup == "medium":
                positives, junk = list(g["easy"]) + list(g["hard"]), list(g["junk"])
            else:
                positives, junk = list(g["hard"]), list(g["junk"]) + list(g["easy"])
            ap, pr = query_metrics(ranking[q], positives, junk, kappas)
            aps.append(ap)
            prs.append(pr)
        aps_np, prs_np = np.array(aps), np.array(prs)
        valid = ~np.isnan(aps_np)
        res: dict[str, Any] = {"mAP": 100 * float(aps_np[valid].mean()) if valid.any() else float("nan")}
        for i, k in enumerate(kappas):
            res[f"mP@{k}"] = 100 * float(prs_np[valid, i].mean()) if valid.any() else float("nan")
        res["ap"] = [None if math.isnan(a) else 100 * a for a in aps]
        res["num_queries"] = int(valid.sum())
        out[setup] = res
    return out


def _image_file(root: Path, name: str) -> Path:
    return root / "jpg" / (name if name.lower().endswith(_IMAGE_SUFFIXES) else name + ".jpg")


def load_ground_truth(root: str | Path, name: str | None = None,
                      boxes: bool = True) -> tuple[str, dict[str, Any]]:
    """Read and check ``root/gnd_<name>.pkl`` and the presence of every listed image in ``root/jpg``.

    Args:
        root: dataset folder.
        name: dataset name (``roxford5k``); default: the only ``gnd_*.pkl`` in ``root``.
        boxes: require a query box ``bbx`` in every ``gnd`` entry (needed by the ``"bbox"`` crop).

    Returns:
        (name, ground-truth dict with ``imlist``, ``qimlist``, ``gnd``).

    Raises:
        DataError: no / several ground-truth files, unreadable pkl, missing keys, ``gnd`` and
            ``qimlist`` of different lengths, index out of range, or images missing from ``jpg/``.
    """
    root = Path(root)
    if name is None:
        found = sorted(root.glob("gnd_*.pkl"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found)
            what = f"several ground-truth files ({names})" if found else "no gnd_<name>.pkl"
            raise DataError(f"--data '{root}' has {what}; give --name (e.g. roxford5k) and put gnd_<name>.pkl "
                            "(revisited Oxford/Paris ground truth) next to jpg/")
        name = found[0].stem[len("gnd_"):]
    path = root / f"gnd_{name}.pkl"
    if not path.is_file():
        raise DataError(f"ground-truth file '{path}' not found; download gnd_{name}.pkl of the revisited "
                        "Oxford/Paris benchmark into the dataset folder")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot read ground-truth file '{path}': {e}") from e
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"ground-truth file '{path}' lacks the key(s) {missing}; expected a dict with "
                        "imlist, qimlist and gnd")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise DataError(f"'{path}': {len(data['qimlist'])} query images (qimlist) but {len(data['gnd'])} "
                        "ground-truth entries (gnd); the file is inconsistent")
    n = len(data["imlist"])
    for q, g in enumerate(data["gnd"]):
        for key in ("easy", "hard", "junk", "bbx") if boxes else ("easy", "hard", "junk"):
            if key not in g:
                hint = " (query boxes are needed by --query-crop bbox)" if key == "bbx" else ""
                raise DataError(f"'{path}': gnd[{q}] has no '{key}'{hint}")
        bad = [i for key in ("easy", "hard", "junk") for i in g[key] if not 0 <= int(i) < n]
        if bad:
            raise DataError(f"'{path}': gnd[{q}] lists image index {bad[0]} but imlist has {n} images "
                            "(image count mismatch between the pkl and its image list)")
    absent = [nm for nm in list(data["imlist"]) + list(data["qimlist"]) if not _image_file(root, nm).is_file()]
    if absent:
        raise DataError(f"{len(absent)} image(s) listed in '{path}' are missing from '{root / 'jpg'}' "
                        f"(first: {_image_file(root, absent[0]).name}); the folder does not match its ground truth")
    return name, data


@torch.no_grad()
def multiscale_feature(encoder: FrozenBackbone, image: torch.Tensor, image_size: int,
                       scales: Sequence[float] = SCALES) -> torch.Tensor:
    """Multi-scale global descriptor: sum over scales of the global feature, then L2-normalised.

    Args:
        encoder: frozen backbone.
        image: uint8 (channels, H, W).
        image_size: the longer side at scale 1, in pixels; each scale s resizes to s × that size,
            sides rounded down to patch multiples (at least one patch).

    Returns:
        float32 (dim,), unit norm.
    """
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        long_side = s * image_size
        p = encoder.token_stride
        size = tuple(max(p, int(x * long_side / max(h, w)) // p * p) for x in (h, w))
        feat = encoder(encoder.prepare(image, size)[None])[0][0]
        total = feat if total is None else total + feat
    return torch.nn.functional.normalize(total, dim=0)


def _crop(image: torch.Tensor, bbx: Sequence[float], what: str) -> torch.Tensor:
    """Crop uint8 (channels, H, W) to ``bbx`` = [x1, y1, x2, y2] px, rounded as PIL's ``Image.crop``
    does (round half to even) and clamped to the image, where PIL would pad with black."""
    h, w = image.shape[-2:]
    x1, y1 = max(0, int(round(bbx[0]))), max(0, int(round(bbx[1])))
    x2, y2 = min(w, int(round(bbx[2]))), min(h, int(round(bbx[3])))
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"query box {list(bbx)} of {what} is empty inside the {w}x{h} image")
    return image[:, y1:y2, x1:x2]


def evaluate_retrieval(data: str | Path, run_dir: str | Path | None = None, backbone: str | Path | None = None,
                       name: str | None = None, out: str | Path | None = None, image_size: int | None = None,
                       scales: Sequence[float] = SCALES, query_crop: str = "bbox", device: str = "cpu",
                       encoder: FrozenBackbone | None = None) -> dict[str, Any]:
    """``sove eval retrieval``: revisited Oxford/Paris mAP and mP@{1,5,10}, Medium and Hard.

    Args:
        data: dataset folder with ``jpg/`` and ``gnd_<name>.pkl``.
        run_dir / backbone: the frozen backbone (a run's teacher, or ``sove export``'s backbone.json).
        name: dataset name; default: the only ``gnd_*.pkl`` in the folder.
        out: result JSON; default ``RUN/eval/retrieval_<name>.json``, or ``eval/`` next to ``backbone.json``.
        image_size: longer image side at scale 1 in pixels (default: the backbone's training crop size).
        scales: descriptor scales.
        query_crop: ``"bbox"``: each query cropped to its ``bbx`` (the revisited protocol,
            Radenović et al. 2018); ``"none"``: whole query images (DINO's retrieval script).
        device: device of the backbone.
        encoder: a ready :class:`FrozenBackbone` instead of run_dir/backbone (tests, notebooks).

    Returns:
        :func:`revisited_metrics` output plus ``dataset``, ``num_database``, ``num_queries``,
        ``image_size``, ``scales``, ``query_crop``, ``command``; written to the result JSON.

    Raises:
        DataError: see :func:`load_ground_truth`; an unreadable image or an empty query box.
        SoveError: neither or both of run_dir/backbone; ``query_crop`` not in :data:`QUERY_CROPS`.
    """
    if query_crop not in QUERY_CROPS:
        raise SoveError(f"query_crop must be one of {', '.join(QUERY_CROPS)}, not '{query_crop}'")
    root = Path(data)
    name, gt = load_ground_truth(root, name, boxes=query_crop == "bbox")
    path = result_path(f"retrieval_{name}", run_dir, backbone, out)
    encoder = encoder or load_frozen(run_dir, backbone, device=device)
    size = image_size or encoder.image_size
    boxes = [g["bbx"] if query_crop == "bbox" else None for g in gt["gnd"]]
    items = [(nm, None) for nm in gt["imlist"]] + list(zip(gt["qimlist"], boxes))
    feats = []
    for nm, bbx in tqdm(items, desc=f"retrieval {name}", unit="img", leave=False):
        image = encoder.read(_image_file(root, nm))
        if bbx is not None:
            image = _crop(image, bbx, f"query '{nm}' in '{root / f'gnd_{name}.pkl'}'")
        feats.append(multiscale_feature(encoder, image, size, scales))
    feats_t = torch.stack(feats)  # (database + queries, dim)
    database, queries = feats_t[:len(gt["imlist"])], feats_t[len(gt["imlist"]):]
    scores = (queries @ database.T).numpy()  # (queries, database) cosine
    ranking = np.argsort(-scores, axis=1, kind="stable")
    result = revisited_metrics(ranking, list(gt["gnd"]))
    result.update(dataset=name, num_database=len(gt["imlist"]), num_queries=len(gt["qimlist"]),
                  image_size=size, scales=list(scales), query_crop=query_crop)
    write_result(result, path, encoder.identity(),
                 {"data": str(root.resolve()), "name": name, "image_size": size, "scales": list(scales),
                  "query_crop": query_crop})
    return result
