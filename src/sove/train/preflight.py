"""Checks before a run starts or resumes, so that a run does what its config says or does not start.

* :func:`check_run_plan`: the config against the dataset size and the number of processes
  (steps per epoch, warm-ups that fit, feature sets the run can fill, images dropped per epoch).
* :func:`check_resume`: a resume against its checkpoint. Only the keys in
  :data:`TRAJECTORY_NEUTRAL` may differ from the config the checkpoint was trained with; the
  world size and the resolved precision must be the ones stored in the checkpoint.

Errors are :class:`~sove.errors.ConfigError` / :class:`~sove.errors.DataError` naming the keys;
warnings go to stderr (rank 0), prefixed ``sove: warning:``.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sove.errors import ConfigError, DataError
from sove.train.schedules import schedule_lengths
from sove.train.small_data import DROP_FRACTION, MIN_STEPS_PER_EPOCH, fitting_overrides

#: Keys a resume may change: they cannot change the weights, feature sets or data order of the
#: steps that follow. Execution settings (threads, compile) compute the same step, though
#: floating-point rounding may differ. A key ending in ``.*`` allows its whole section
#: (evaluation settings; the periodic k-NN leaves the training RNG untouched). Every other key is
#: refused; see docs/cli.md "Resuming a run".
TRAJECTORY_NEUTRAL = (
    "trainer.max_steps", "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.progress", "trainer.num_threads", "trainer.compile", "trainer.deterministic", "trainer.check_sync",
    "trainer.on_nonfinite",
    "trainer.out_dir", "trainer.name", "trainer.init_from", "trainer.auto_resume", "trainer.loggers",
    "model.init",
    "data.num_workers", "data.prefetch_factor", "data.download", "data.on_error", "data.test_root", "eval.*",
)

#: Keys a resume may change as long as the world size and the resolved precision they give stay
#: the ones stored in the checkpoint (e.g. ``trainer.devices=[1]`` instead of ``1``).
CHECKED_BY_VALUE = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                    "trainer.precision")


def warn(message: str) -> None:
    """Print ``sove: warning: MESSAGE`` to stderr on rank 0."""
    if rank_zero_only.rank == 0:
        print(f"sove: warning: {message}", file=sys.stderr, flush=True)


def planned_world_size(cfg: DictConfig) -> int:
    """Processes the run will have (``trainer.devices`` x ``num_nodes``, or torchrun/SLURM), before any launch.

    Raises:
        ConfigError: devices Lightning Fabric cannot provide, naming the trainer keys.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.trainer
    try:
        return Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy).world_size
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise ConfigError(f"trainer.accelerator/devices/num_nodes/strategy: {str(e).splitlines()[0]}") from None


def check_run_plan(cfg: DictConfig, num_images: int, world_size: int) -> list[str]:
    """Refuse a run that cannot happen as configured; warn where the user may mean it.

    Refused (ConfigError/DataError naming the key): fewer images than one global batch; an lr
    warm-up not shorter than the schedule; ``trainer.max_steps`` beyond the schedule; a feature set
    the whole schedule cannot fill (its random initial rows would stay concept candidates).
    Warned: fewer than :data:`~sove.train.small_data.MIN_STEPS_PER_EPOCH` steps per epoch, more than
    :data:`~sove.train.small_data.DROP_FRACTION` of the images dropped per epoch, an E_C larger than
    the dataset, a warm-up that
    rounds to 0 steps or that ``trainer.max_steps`` cuts short, a feature set ``max_steps`` leaves
    partly random, ``optim.min_lr`` above the peak lr, an unused ``loss.teacher_temp``, a periodic
    k-NN that never runs.

    A time-budgeted run (``trainer.time_budget``) has no schedule length before its first steps
    (:mod:`sove.train.budget`): only the checks that do not need it run here (one global batch, images
    dropped, min_lr, teacher temperature; ``trainer.max_steps`` is a stop wherever the plan ends); the
    feature sets and the warm-up are checked, as warnings, when the plan is made
    (:func:`check_budget_plan`).

    Args:
        cfg: the validated config.
        num_images: length of the training dataset.
        world_size: number of processes (:func:`planned_world_size`).

    Returns:
        The warnings, also printed by :func:`warn`.
    """
    o, lo, t = cfg.optim, cfg.loss, cfg.trainer
    g = o.batch_size * world_size
    fit = _fitting(cfg, num_images, world_size)
    if num_images < g:
        raise DataError(f"data.root: {num_images} images is fewer than one global batch (optim.batch_size "
                        f"{o.batch_size} x {world_size} processes = {g}): every batch would be dropped; "
                        f"lower optim.batch_size{fit}")
    per_epoch = num_images // g
    out = _small_data(cfg, num_images, per_epoch, g)
    if t.time_budget is not None:
        out += _unused_settings(cfg, per_epoch, None, g)
        for message in out:
            warn(message)
        return out
    total, warm, temp_warm = schedule_lengths(o, lo, per_epoch)
    sched = f"{total} steps (optim.epochs {o.epochs} x {per_epoch} steps/epoch of {g} images)"
    if o.warmup_epochs > 0 and warm >= total:
        raise ConfigError(f"optim.warmup_epochs: {o.warmup_epochs} epochs = {warm} steps is not shorter than the "
                          f"schedule, {sched}: the lr would never reach its peak")
    if t.max_steps is not None and t.max_steps > total:
        raise ConfigError(f"trainer.max_steps: {t.max_steps} is beyond the schedule, {sched}; the run would stop "
                          "at its end. Raise optim.epochs or lower trainer.max_steps")
    steps = min(total, t.max_steps or total)
    for key, epochs, length, what in (("optim.warmup_epochs", o.warmup_epochs, warm, "lr warm-up"),
                                      ("loss.teacher_temp_warmup_epochs", lo.teacher_temp_warmup_epochs, temp_warm,
                                       "teacher-temperature warm-up")):
        if epochs > 0 and length == 0:
            out.append(f"{key}={epochs} is 0 steps at {per_epoch} steps/epoch: no {what}")
        elif steps < length:
            out.append(f"trainer.max_steps={steps} stops the run inside the {what} ({length} steps)")
    small = bool(out)
    feature_sets = _feature_set_plan(lo, total, steps, g, fit) if cfg.method == "sove" else []  # E_C, E_P: SOVE's
    out += feature_sets + _unused_settings(cfg, per_epoch, steps, g)
    if small and fit:
        out.append(fit.lstrip("; "))
    for message in out:
        warn(message)
    return out


def _fitting(cfg: DictConfig, num_images: int, world_size: int) -> str:
    """``"; settings that fit N images: key=value ..."`` (:func:`~sove.train.small_data.fitting_overrides`),
    or "" when the config fits."""
    fit = fitting_overrides(cfg, num_images, world_size)
    on = f" on {world_size} processes" if world_size > 1 else ""
    return f"; settings that fit {num_images} images{on}: {' '.join(fit)}" if fit else ""


def _small_data(cfg: DictConfig, num_images: int, per_epoch: int, g: int) -> list[str]:
    """Warnings for a dataset small for the config: a few steps per epoch, a large share dropped by
    ``drop_last``, an E_C larger than the dataset."""
    out = []
    if per_epoch < MIN_STEPS_PER_EPOCH:
        out.append(f"{num_images} images make {per_epoch} step(s) per epoch of {g} images (fewer than "
                   f"{MIN_STEPS_PER_EPOCH}): epoch-based settings (optim.epochs, warm-ups) round to few steps")
    dropped = num_images - per_epoch * g
    if dropped > DROP_FRACTION * num_images:
        out.append(f"each epoch drops {dropped} of {num_images} images ({100 * dropped / num_images:.0f}%): "
                   f"only whole global batches of {g} are used; lower optim.batch_size to use more of the data")
    lo = cfg.loss
    if cfg.method == "sove" and lo.cls_weight > 0 and lo.cls_feature_set_size > num_images:
        out.append(f"loss.cls_feature_set_size ({lo.cls_feature_set_size}) is larger than the dataset ({num_images} "
                   "images): E_C holds several views of each image, embedded by older teachers, as concept "
                   "candidates")
    return out


def check_budget_plan(cfg: DictConfig, total: int, g: int) -> list[str]:
    """Warnings for the plan of a time-budgeted run once its length is known (:mod:`sove.train.budget`):
    a feature set the ``total`` planned steps x ``g`` images cannot fill, an lr warm-up of 0 steps.
    Printed by :func:`warn`; returned."""
    from sove.train.schedules import scaled_lengths

    o, lo, out = cfg.optim, cfg.loss, []
    for name in ("cls", "patch"):
        key, size = f"loss.{name}_feature_set_size", lo[f"{name}_feature_set_size"]
        if lo[f"{name}_weight"] > 0 and total * g < size:
            out.append(f"trainer.time_budget fits {total} steps x {g} = {total * g} teacher embeddings: {size - total * g} "
                       f"of the {size} rows of {key} stay random initial rows; raise the budget or lower {key}")
    if o.warmup_epochs > 0 and scaled_lengths(o, lo, total)[1] == 0:
        out.append(f"trainer.time_budget fits {total} steps: the lr warm-up (optim.warmup_epochs) rounds to 0 steps")
    for message in out:
        warn(message)
    return out


def _unused_settings(cfg: DictConfig, per_epoch: int, steps: int | None, g: int) -> list[str]:
    """Warnings for settings the run will not use as written: a rising lr, an unused start
    temperature, a periodic k-NN after the last step (``steps`` None: not known yet, not checked)."""
    o, lo, out = cfg.optim, cfg.loss, []
    peak = o.base_lr * g / 256
    if o.min_lr > peak:
        out.append(f"optim.min_lr {o.min_lr:g} is above the peak lr {peak:g} (optim.base_lr {o.base_lr:g} x {g}/256): "
                   "the cosine schedule rises instead of decaying")
    if lo.teacher_temp_final is not None and lo.teacher_temp_warmup_epochs == 0:
        out.append(f"loss.teacher_temp ({lo.teacher_temp}) is unused: without loss.teacher_temp_warmup_epochs the "
                   f"teacher temperature is loss.teacher_temp_final ({lo.teacher_temp_final}) from step 0")
    every = cfg.eval.knn_every_epochs
    if every > 0 and steps is not None and steps < every * per_epoch:
        out.append(f"eval.knn_every_epochs={every}: the run ends after {steps} steps, before the first periodic "
                   f"k-NN at step {every * per_epoch}")
    return out


def _feature_set_plan(lo: DictConfig, total: int, steps: int, g: int, fit: str) -> list[str]:
    """Refuse a feature set the whole schedule cannot fill (``fit``: the suggestion appended); warnings
    when ``max_steps`` leaves one partly random."""
    out = []
    for name in ("cls", "patch"):
        key, size = f"loss.{name}_feature_set_size", lo[f"{name}_feature_set_size"]
        if lo[f"{name}_weight"] == 0:
            continue
        if total * g < size:
            raise ConfigError(f"{key}: {size} rows are never filled: the whole schedule enqueues {total} steps x {g} "
                              f"= {total * g} teacher embeddings, so random initial rows would stay concept "
                              f"candidates; lower {key} or train longer{fit}")
        if steps * g < size:
            out.append(f"trainer.max_steps={steps} enqueues {steps * g} of the {size} rows of {key}: the rest stay "
                       "random initial rows")
    return out


def check_resume(state: dict[str, Any], cfg: DictConfig, world_size: int, precision: str, source: str,
                 how: str = "--resume") -> None:
    """Refuse a resume that would not continue the checkpoint's trajectory.

    Args:
        state: the loaded checkpoint (``config`` YAML, ``world_size``, ``precision``). A checkpoint
            without ``world_size`` (written before it was stored) gets the keys of
            :data:`CHECKED_BY_VALUE` compared as plain keys instead.
        cfg: the config of the resume (the run's config.yaml plus overrides).
        world_size: processes of this launch (:func:`planned_world_size`).
        precision: the resolved ``trainer.precision`` of this launch.
        source: the checkpoint path, for messages.
        how: what resumes, for messages (``--resume``, ``trainer.auto_resume``, ``restart N (torchrun)``).

    Raises:
        ConfigError: one line naming every changed key that is not in :data:`TRAJECTORY_NEUTRAL`
            (with its old and new value), or the world size / precision that differ.
    """
    from sove.config import SOVEConfig
    from sove.seeding import SCHEME as SEED_SCHEME

    try:
        stored = OmegaConf.merge(OmegaConf.structured(SOVEConfig), OmegaConf.create(state["config"]))
    except (OmegaConfBaseException, KeyError) as e:
        raise ConfigError(f"{how}: the config stored in {source} does not load ({str(e).splitlines()[0]})") from None
    old, new = flatten(OmegaConf.to_container(stored)), flatten(OmegaConf.to_container(cfg))
    by_value = CHECKED_BY_VALUE if "world_size" in state else ()  # older checkpoints: compared as keys
    changed = [f"{k} ({old.get(k)} -> {new.get(k)})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not _neutral(k) and k not in by_value]
    if state.get("world_size") not in (None, world_size):
        changed.append(f"world size (trainer.devices x trainer.num_nodes: {state['world_size']} -> {world_size} "
                       "processes)")
    if state.get("precision") not in (None, precision):
        changed.append(f"trainer.precision ({state['precision']} -> {precision})")
    if state.get("seed_scheme") != SEED_SCHEME:
        warn(f"{source} was written by an older sove, before its named seed streams (sove.seeding, scheme "
             f"{SEED_SCHEME}): {how} continues the run, but its random draws from here on (data order, augmentation, "
             "anchors, drop path) differ from those of the code that wrote it, so it will not equal that code's "
             "uninterrupted run")
    if changed:
        raise ConfigError(f"{how} would change training from {source}: {', '.join(changed)}. A resume may "
                          "change only trajectory-neutral keys (trainer.max_steps, logging, checkpoint cadence, "
                          "threads, eval.*; see docs/cli.md); for other settings start a new run "
                          f"(trainer.init_from={source} keeps the weights)")


def _neutral(key: str) -> bool:
    return key in TRAJECTORY_NEUTRAL or any(n.endswith(".*") and key.startswith(n[:-1]) for n in TRAJECTORY_NEUTRAL)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
