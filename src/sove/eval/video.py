"""Semi-supervised video object segmentation by label propagation on DAVIS-2017 (paper Tab. 4; docs/evaluation.md).

The first frame's object masks are propagated through the sequence with frozen patch features
(the protocol of Jabri et al. 2020 as used by DINO): each patch of frame t takes the soft labels of
its top-5 most similar patches among the first frame and the 7 previous frames, restricted to a
square window of ±12 patches around its position, weighted by exp(cos / 0.1). The propagated
patch labels are upsampled bilinearly to the frame size and arg-maxed into an indexed PNG.

Scores: J (region similarity, the IoU) and F (boundary F-measure) per object, averaged over the
frames of a sequence except the first and the last, then over all objects of all sequences; J&F
is their mean. No maintained DAVIS evaluation package installs from PyPI (the official
``davis2017-evaluation`` is source-only), so J and F are re-implemented here to give the same
values as its semi-supervised evaluation (``davis2017/metrics.py``: ``db_eval_iou``,
``f_measure``, ``_seg2bmap``; ``davis2017/evaluation.py``): ``seg2bmap`` boundaries, a disk of
radius ceil(0.008 × image diagonal) pixels, void pixels scored as background.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from sove.errors import DataError
from sove.eval.encoder import FrozenBackbone, load_frozen, result_path
from sove.eval.provenance import write_result
from sove.preflight import check_writable

VOID = 255  # DAVIS "void" label: never an object; scored as background (see _sequence_scores)


@torch.no_grad()
def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, context: int = 7, radius: int = 12,
                     topk: int = 5, temperature: float = 0.1) -> torch.Tensor:
    """Propagate soft labels from frame 0 through a sequence of patch-feature grids.

    Frame t's context is frame 0 (ground truth) plus the ``context`` previous frames (their
    propagated soft labels). Affinity of a target patch to a context patch is
    exp(cos / temperature), zero outside a square window of ±``radius`` patches; only the
    ``topk`` largest affinities over all context patches are kept and normalised to sum to 1.

    Args:
        features: float (frames, rows, cols, dim) patch features (normalised here along dim).
        first_labels: float (classes, rows, cols) labels of frame 0 (one-hot or soft; class 0 = background).
        context: previous frames in the context (7).
        radius: spatial window half-size in patches (12).
        topk: neighbours kept per target patch (5).
        temperature: affinity temperature (0.1).

    Returns:
        float32 (frames, classes, rows, cols) soft labels; frame 0 is ``first_labels``.

    Raises:
        ValueError: grids of features and labels differ.
    """
    t_frames, rows, cols, _ = features.shape
    if tuple(first_labels.shape[1:]) != (rows, cols):
        raise ValueError(f"first_labels grid {tuple(first_labels.shape[1:])} != feature grid {(rows, cols)}")
    feats = F.normalize(features.float(), dim=-1).reshape(t_frames, rows * cols, -1)  # (frames, patches, dim)
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    outside = ((yy[:, None] - yy[None]).abs() > radius) | ((xx[:, None] - xx[None]).abs() > radius)  # (src, tar)
    labels = torch.zeros(t_frames, first_labels.shape[0], rows * cols)  # (frames, classes, patches)
    labels[0] = first_labels.float().reshape(first_labels.shape[0], -1)
    for t in range(1, t_frames):
        src = [0] + list(range(max(1, t - context), t))
        sim = torch.einsum("nsd,td->nst", feats[src], feats[t]) / temperature  # (context, src, tar)
        sim = sim.masked_fill(outside, -math.inf).reshape(-1, rows * cols)  # (context * src, tar)
        val, idx = sim.topk(min(topk, sim.shape[0]), dim=0)  # (topk, tar)
        weight = torch.softmax(val, dim=0)  # exp(cos / T) normalised over the kept neighbours
        src_labels = labels[src].permute(1, 0, 2).reshape(labels.shape[1], -1)  # (classes, context * src)
        labels[t] = (src_labels[:, idx] * weight).sum(1)
    return labels.reshape(t_frames, -1, rows, cols)


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two boolean masks (H, W); 1 when the union is empty.

    Source: ``db_eval_iou`` of the DAVIS-2017 evaluation (davis2017-evaluation,
    ``davis2017/metrics.py``): pixels of ``void`` (bool (H, W)) count in neither the intersection
    nor the union.
    """
    keep = np.ones_like(gt, bool) if void is None else ~void
    inter, union = (pred & gt & keep).sum(), ((pred | gt) & keep).sum()
    return 1.0 if union == 0 else float(inter / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (H, W), as ``seg2bmap`` of the DAVIS-2017 evaluation.

    A pixel is a boundary pixel when it differs from its east, south or south-east neighbour, so
    the boundary lies half a pixel towards the origin: background pixels just above or left of the
    object and object pixels on its bottom or right edge. Pixels beyond the image count as
    background, except that the last row only compares with its east neighbour, the last column
    only with its south neighbour, and the bottom-right pixel is never a boundary.

    Returns:
        bool (H, W).
    """
    seg = mask.astype(bool)
    padded = np.pad(seg, ((0, 1), (0, 1)))
    east, south, south_east = padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    bmap = (seg != east) | (seg != south) | (seg != south_east)
    bmap[-1, :] = seg[-1, :] != east[-1, :]
    bmap[:, -1] = seg[:, -1] != south[:, -1]
    bmap[-1, -1] = False
    return bmap


def _within(points: np.ndarray, targets: np.ndarray, radius: int) -> np.ndarray:
    """Which ``points`` (bool (H, W)) lie in ``targets`` dilated by the disk {x² + y² <= radius²}.

    The Euclidean distance transform gives, per pixel, the distance to the nearest target pixel;
    ``distance <= radius`` is exactly the dilation by that disk (the structuring element of
    ``skimage.morphology.disk``) with nothing dilated in from beyond the image border.
    """
    return points & (ndimage.distance_transform_edt(~targets) <= radius)


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
                       tolerance: float = 0.008) -> float:
    """F: boundary F-measure of two boolean masks (H, W) (Perazzi et al. 2016).

    Source: ``f_measure`` of the DAVIS-2017 evaluation (davis2017-evaluation,
    ``davis2017/metrics.py``), reproduced exactly: void pixels (bool (H, W)) are removed from both
    masks, boundaries come from :func:`boundary_map`, and a boundary pixel is matched when it lies
    within a disk of radius r pixels around the other mask's boundary, r = ceil(tolerance × image
    diagonal) (``bound_th`` 0.008) or ``tolerance`` itself when >= 1. Precision = matched predicted
    / predicted boundary pixels, recall = matched true / true boundary pixels, F = 2PR / (P + R)
    (0 when P + R = 0). Both boundaries empty: 1; exactly one empty: 0 (a mask covering the whole
    image has an empty boundary).

    Raises:
        ValueError: a tolerance >= 1 that is not a whole number of pixels.
    """
    if tolerance >= 1 and tolerance != int(tolerance):
        raise ValueError(f"boundary tolerance {tolerance} >= 1 is a radius in pixels and must be a whole number")
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    bp, bg = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(bp.sum()), int(bg.sum())
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0
    radius = int(tolerance) if tolerance >= 1 else math.ceil(tolerance * math.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2))
    precision = _within(bp, bg, radius).sum() / n_pred
    recall = _within(bg, bp, radius).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def read_annotation(path: Path) -> tuple[np.ndarray, list[int] | None]:
    """An indexed annotation PNG -> (int64 labels (H, W), its palette or None).

    Raises:
        DataError: unreadable file or a colour (not indexed) image.
    """
    try:
        with Image.open(path) as img:
            palette = img.getpalette() if img.mode == "P" else None
            labels = np.array(img).astype(np.int64)
    except OSError as e:
        raise DataError(f"cannot read annotation '{path}': {e}") from e
    if labels.ndim != 2:
        raise DataError(f"annotation '{path}' is a {img.mode} colour image; DAVIS annotations are indexed "
                        "(palette) PNGs whose pixel values are object ids")
    return labels, palette


def write_indexed_png(labels: np.ndarray, palette: list[int] | None, path: Path) -> None:
    """Write uint8 object ids (H, W) as a palette PNG (``palette``, or a grey ramp when None)."""
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    img.putpalette(palette if palette is not None else [v for i in range(256) for v in (i, i, i)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def davis_sequences(root: str | Path, split: str = "val", resolution: str = "480p") -> list[dict[str, Any]]:
    """List the sequences of a DAVIS-2017 folder with their frame and annotation files.

    Returns:
        per sequence ``{"name", "frames": [jpg paths], "annotations": [png path or None per frame]}``.

    Raises:
        DataError: missing ``ImageSets/2017/<split>.txt``, frame folder, annotation folder or
            first-frame annotation; the message names the path.
    """
    root = Path(root)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"sequence list '{listing}' not found; expected the DAVIS-2017 layout "
                        f"JPEGImages/{resolution}/<seq>, Annotations/{resolution}/<seq>, ImageSets/2017/{split}.txt")
    seqs = []
    for name in [s.strip() for s in listing.read_text().splitlines() if s.strip()]:
        frame_dir, ann_dir = root / "JPEGImages" / resolution / name, root / "Annotations" / resolution / name
        frames = sorted(frame_dir.glob("*.jpg"))
        if not frames:
            raise DataError(f"no frames (*.jpg) in '{frame_dir}' for sequence '{name}' listed in '{listing}'")
        if not ann_dir.is_dir():
            raise DataError(f"no annotations folder '{ann_dir}' for sequence '{name}'; label propagation "
                            "needs at least the first frame's indexed PNG")
        anns = [ann_dir / (f.stem + ".png") for f in frames]
        if not anns[0].is_file():
            raise DataError(f"first-frame annotation '{anns[0]}' not found (sequence '{name}')")
        seqs.append({"name": name, "frames": frames, "annotations": [a if a.is_file() else None for a in anns]})
    return seqs


def _sequence_scores(pred: list[np.ndarray], anns: list[Path | None], object_ids: Sequence[int]) -> dict[str, Any]:
    """Per object mean J and F over the annotated frames except the first and the last.

    Void (255) ground-truth pixels count as background, as in the semi-supervised path of the
    DAVIS-2017 evaluation: its ``DAVIS`` reader sets them to 0 before splitting the objects, and
    the void mask it then derives from those boolean masks is empty, so no pixel is excluded.
    """
    frames = list(range(1, len(pred) - 1)) if len(pred) > 2 else list(range(1, len(pred)))
    frames = [t for t in frames if anns[t] is not None]
    j = {o: [] for o in object_ids}
    f = {o: [] for o in object_ids}
    for t in frames:
        gt, _ = read_annotation(anns[t])
        if gt.shape != pred[t].shape:
            raise DataError(f"annotation '{anns[t]}' is {gt.shape[1]}x{gt.shape[0]} but its frame is "
                            f"{pred[t].shape[1]}x{pred[t].shape[0]}")
        for o in object_ids:
            j[o].append(region_similarity(pred[t] == o, gt == o))
            f[o].append(boundary_f_measure(pred[t] == o, gt == o))
    return {"frames_scored": len(frames),
            "J": {str(o): float(np.mean(v)) if v else None for o, v in j.items()},
            "F": {str(o): float(np.mean(v)) if v else None for o, v in f.items()}}


def _propagate_sequence(encoder: FrozenBackbone, seq: dict[str, Any], image_size: int, bar: tqdm,
                        **kwargs: Any) -> tuple[list[np.ndarray], list[int] | None, list[int]]:
    """Predicted object ids (H, W) per frame, the first-frame palette and the object ids."""
    first, palette = read_annotation(seq["annotations"][0])
    ids = sorted({0} | {int(v) for v in np.unique(first) if v != VOID})
    feats = []
    for path in seq["frames"]:
        image = encoder.read(path)
        if len(feats) == 0 and tuple(image.shape[-2:]) != first.shape:
            raise DataError(f"annotation '{seq['annotations'][0]}' is {first.shape[1]}x{first.shape[0]} but "
                            f"frame '{path}' is {image.shape[2]}x{image.shape[1]}")
        size = encoder.fit(image.shape[1], image.shape[2], image_size)
        feats.append(encoder(encoder.prepare(image, size)[None])[1][0])  # (rows, cols, dim)
        bar.update(1)
    one_hot = torch.stack([torch.from_numpy(first == i).float() for i in ids])  # (objects, H, W), void -> 0
    grid_labels = F.interpolate(one_hot[None], size=feats[0].shape[:2], mode="area")[0]
    soft = propagate_labels(torch.stack(feats), grid_labels, **kwargs)  # (frames, objects, rows, cols)
    lut = np.array(ids, dtype=np.int64)
    pred = [first.copy()]
    for t in range(1, len(feats)):
        up = F.interpolate(soft[t][None], size=first.shape, mode="bilinear", align_corners=False)[0]
        pred.append(lut[up.argmax(0).numpy()])
    return pred, palette, [i for i in ids if i != 0]


def evaluate_video(data: str | Path, run_dir: str | Path | None = None, backbone: str | Path | None = None,
                   split: str = "val", out: str | Path | None = None, masks_dir: str | Path | None = None,
                   image_size: int = 480, context: int = 7, radius: int = 12, topk: int = 5,
                   temperature: float = 0.1, resolution: str = "480p", device: str = "cpu",
                   encoder: FrozenBackbone | None = None) -> dict[str, Any]:
    """``sove eval video``: DAVIS-2017 label propagation; indexed PNGs + J, F and J&F.

    Args:
        data: DAVIS-2017 folder (``JPEGImages/<resolution>/<seq>/*.jpg``,
            ``Annotations/<resolution>/<seq>/*.png``, ``ImageSets/2017/<split>.txt``).
        run_dir / backbone: the frozen backbone (a run's teacher, or ``sove export``'s backbone.json).
        split: sequence list name (``val``).
        out: result JSON; default ``RUN/eval/video.json``, or ``eval/`` next to ``backbone.json``.
        masks_dir: where the predicted PNGs go (``<masks_dir>/<seq>/<frame>.png``); default
            ``video_masks/`` next to the result JSON.
        image_size: short side of the frames fed to the backbone, in pixels (sides rounded down to
            patch multiples).
        context, radius, topk, temperature: see :func:`propagate_labels`.
        resolution: DAVIS resolution folder name.
        device: device of the backbone.
        encoder: a ready :class:`FrozenBackbone` instead of run_dir/backbone.

    Returns:
        dict with ``J_mean``, ``F_mean``, ``JF_mean`` (percent, over all objects of all sequences
        with annotated frames; None if none), ``sequences`` (per sequence: ``J``/``F`` per object id
        in [0, 1], ``frames_scored``), ``num_objects``, ``masks_dir``, the protocol settings and ``command``.

    Raises:
        DataError: see :func:`davis_sequences`; annotation/frame size mismatch; colour annotations.
        SoveError: neither or both of run_dir/backbone.
    """
    seqs = davis_sequences(data, split, resolution)
    path = result_path("video", run_dir, backbone, out)
    masks = Path(masks_dir) if masks_dir is not None else path.parent / "video_masks"
    check_writable(masks, "the predicted masks")
    encoder = encoder or load_frozen(run_dir, backbone, device=device)
    per_seq, js, fs = {}, [], []
    with tqdm(total=sum(len(s["frames"]) for s in seqs), desc="video propagation", unit="frame", leave=False) as bar:
        for seq in seqs:
            pred, palette, objects = _propagate_sequence(encoder, seq, image_size, bar, context=context,
                                                         radius=radius, topk=topk, temperature=temperature)
            for frame, labels in zip(seq["frames"], pred):
                write_indexed_png(labels, palette, masks / seq["name"] / (frame.stem + ".png"))
            scores = _sequence_scores(pred, seq["annotations"], objects)
            per_seq[seq["name"]] = scores
            if scores["frames_scored"]:
                js += [v for v in scores["J"].values()]
                fs += [v for v in scores["F"].values()]
    j_mean = 100 * float(np.mean(js)) if js else None
    f_mean = 100 * float(np.mean(fs)) if fs else None
    result = {"J_mean": j_mean, "F_mean": f_mean,
              "JF_mean": (j_mean + f_mean) / 2 if js else None, "num_objects": len(js),
              "num_sequences": len(seqs), "sequences": per_seq, "masks_dir": str(masks), "split": split,
              "image_size": image_size, "context": context, "radius": radius, "topk": topk,
              "temperature": temperature}
    write_result(result, path, encoder.identity(),
                 {"data": str(Path(data).resolve()), "split": split, "resolution": resolution,
                  "image_size": image_size, "context": context, "radius": radius, "topk": topk,
                  "temperature": temperature})
    return result
