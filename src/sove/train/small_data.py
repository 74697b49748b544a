"""Settings that fit a small dataset: what ``sove pretrain`` suggests when one's own folder is too
small for the configured batch or feature sets (:func:`sove.train.preflight.check_run_plan`).

The suggestion changes only what does not fit, to the largest power of two that does:

* ``optim.batch_size``: at least :data:`MIN_STEPS_PER_EPOCH` steps per epoch and at most
  :data:`DROP_FRACTION` of the images dropped (only whole global batches are used);
* ``loss.cls_feature_set_size`` / ``patch_feature_set_size``: no larger than what the schedule
  enqueues, and E_C no larger than the dataset (E_C holds one teacher embedding per image and
  step, so a larger E_C holds several views of the same image, embedded by older teachers);
* ``loss.cls.num_anchors`` / ``loss.patch.num_anchors``: at most 1/8 (CLS) and 1/16 (patch) of
  the feature set, the ratios of the paper's ImageNet setting (65536 / 8192 and 8192 / 512 rows;
  docs/method.md, "Feature sets"), and ``num_judges`` what the pool left after the anchors holds.
"""

from __future__ import annotations

from omegaconf import DictConfig

#: Fewer optimizer steps per epoch than this is "a few batches": epoch-based settings round coarsely.
MIN_STEPS_PER_EPOCH = 4
#: Share of the images ``drop_last`` may discard per epoch before a warning.
DROP_FRACTION = 0.1
#: Feature-set rows per anchor in the paper's setting, per loss.
ANCHOR_RATIO = {"cls": 8, "patch": 16}


def power_of_two_at_most(x: int) -> int:
    """The largest power of two <= ``x`` (1 for ``x`` < 2)."""
    return 1 << (max(1, int(x)).bit_length() - 1)


def batch_fits(batch: int, num_images: int, world: int) -> bool:
    """True when ``batch`` per process gives >= :data:`MIN_STEPS_PER_EPOCH` steps per epoch and drops at
    most :data:`DROP_FRACTION` of ``num_images``."""
    g = batch * world
    return num_images // g >= MIN_STEPS_PER_EPOCH and num_images % g <= DROP_FRACTION * num_images


def fitting_batch_size(batch: int, num_images: int, world: int) -> int:
    """``batch`` if it fits (:func:`batch_fits`), else the largest power of two below it that does (>= 1)."""
    if batch_fits(batch, num_images, world):
        return batch
    b = power_of_two_at_most(min(batch, num_images // (world * MIN_STEPS_PER_EPOCH)))
    while b > 1 and not batch_fits(b, num_images, world):
        b //= 2
    return b


def fitting_overrides(cfg: DictConfig, num_images: int, world: int, enqueued: int | None = None) -> list[str]:
    """``key=value`` overrides that make ``cfg`` fit ``num_images`` images on ``world`` processes;
    empty when everything fits.

    Args:
        cfg: the validated config.
        num_images: length of the training dataset.
        world: number of processes.
        enqueued: teacher embeddings the schedule enqueues with the fitting batch size (steps x
            global batch); None computes it from ``optim.epochs``.

    Returns:
        e.g. ``["optim.batch_size=16", "loss.cls_feature_set_size=1024", "loss.cls.num_anchors=128"]``
        (the ``loss.*`` feature-set keys for ``method=sove`` only).
    """
    o, lo = cfg.optim, cfg.loss
    out = []
    batch = fitting_batch_size(o.batch_size, num_images, world)
    if batch != o.batch_size:
        out.append(f"optim.batch_size={batch}")
    if enqueued is None:
        g = batch * world
        enqueued = max(1, round(o.epochs * (num_images // g))) * g
    for name in ("cls", "patch") if cfg.method == "sove" else ():  # E_C / E_P are SOVE's (DINO / iBOT: none)
        if lo[f"{name}_weight"] > 0:
            out += _fitting_feature_set(lo, name, num_images if name == "cls" else enqueued, enqueued)
    return out


def _fitting_feature_set(lo: DictConfig, name: str, dataset_cap: int, enqueued: int) -> list[str]:
    """Overrides of one loss's feature-set size, anchors and judges (empty when they fit)."""
    size, c = lo[f"{name}_feature_set_size"], lo[name]
    cap = min(dataset_cap, enqueued)
    if size <= cap:
        return []
    rows = power_of_two_at_most(cap)
    if rows < 4:  # too few rows for anchors plus a pool: the batch suggestion comes first
        return []
    anchors = max(2, min(c.num_anchors, rows // ANCHOR_RATIO[name]))
    judges = max(1, min(c.num_judges, rows - anchors + 1))
    out = [f"loss.{name}_feature_set_size={rows}"]
    if anchors != c.num_anchors:
        out.append(f"loss.{name}.num_anchors={anchors}")
    if judges != c.num_judges:
        out.append(f"loss.{name}.num_judges={judges}")
    return out
