"""Checks of a merged config (:func:`validate`): value ranges and cross-key consistency, each error naming the key.

The valid values of the string keys come from :mod:`sove.choices` and :mod:`sove.method.settings`, the
concept settings' ranges from :func:`sove.method.settings.concept_problem`; nothing here imports torch.
Checks that need the dataset size run later, in :func:`sove.train.preflight.check_run_plan`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from sove.choices import (
    ACCELERATORS, AUGMENT_ON, GLOBAL_POOLS, LOGGERS, MASK_MODES, METHODS, ON_ERROR, ON_NONFINITE, PRECISIONS, SOURCES,
)
from sove.config import is_swin, token_stride
from sove.errors import ConfigError
from sove.method.settings import SEARCH_DTYPES, concept_problem


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    """``KEY: must be A or B, got 'x'`` (two choices) / ``KEY: must be one of A, B, C; got 'x'``."""
    if len(choices) == 2:
        _check(value in choices, key, f"must be {choices[0]} or {choices[1]}, got {value!r}")
    else:
        _check(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-key consistency; raise ConfigError naming the key.

    Checks that need the dataset size (steps per epoch, feature sets the run can fill, images
    dropped per epoch) run later, in :func:`sove.train.preflight.check_run_plan`.
    """
    _check_choice(cfg.method, "method", METHODS)
    _check(cfg.peers.num_prototypes >= 1, "peers.num_prototypes", f"must be >= 1, got {cfg.peers.num_prototypes}")
    _check(0.0 <= cfg.peers.center_momentum < 1.0, "peers.center_momentum",
           f"must be in [0, 1), got {cfg.peers.center_momentum}")
    _validate_arch(cfg.model)
    _validate_data(cfg)
    _validate_loss(cfg)
    _validate_schedule(cfg)
    t = cfg.trainer
    _check_choice(t.on_nonfinite, "trainer.on_nonfinite", ON_NONFINITE)
    _check_choice(t.accelerator, "trainer.accelerator", ACCELERATORS)
    _check_choice(t.precision, "trainer.precision", PRECISIONS)
    _validate_loggers(list(t.loggers))
    _check(t.init_from is None or cfg.model.init is None, "model.init/trainer.init_from",
           "give one: model.init starts the backbones from weights (heads new), trainer.init_from the whole "
           "student and teacher from a sove checkpoint")
    for key in ("log_every", "checkpoint_every"):
        _check(t[key] >= 1, f"trainer.{key}", f"must be >= 1 (steps), got {t[key]}")
    _check(t.keep_checkpoints >= 0, "trainer.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}")
    _check(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", f"must be >= 1 or null, got {t.max_steps}")
    _check(t.seed >= 0, "trainer.seed", f"must be >= 0 (it seeds numpy's SeedSequence), got {t.seed}")
    if t.time_budget is not None:
        from sove.train.budget import parse_duration

        parse_duration(t.time_budget)
    _validate_eval(cfg.eval)


def _validate_eval(e: DictConfig) -> None:
    _check(len(e.knn_k) > 0 and all(k >= 1 for k in e.knn_k), "eval.knn_k",
           f"needs at least one k and every k must be >= 1, got {list(e.knn_k)}")
    _check(e.knn_temperature > 0, "eval.knn_temperature", f"must be > 0 (votes are exp(sim / T)), got {e.knn_temperature}")
    _check(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    _check(e.knn_every_epochs >= 0, "eval.knn_every_epochs", f"must be >= 0 (0 = off), got {e.knn_every_epochs}")
    for key in ("knn_train_subset", "knn_test_subset"):
        _check(e[key] >= 1, f"eval.{key}", f"must be >= 1 (images), got {e[key]}")


def _validate_loggers(names: list[str]) -> None:
    """``trainer.loggers``: known names, no repeats, ``csv`` included (``metrics.csv`` feeds
    ``sove plot`` and a resume)."""
    unknown = [n for n in names if n not in LOGGERS]
    _check(not unknown, "trainer.loggers", f"unknown logger {unknown[0] if unknown else ''!r}; "
           f"the loggers are {', '.join(LOGGERS)} (e.g. trainer.loggers=[csv,tensorboard,wandb])")
    _check(len(set(names)) == len(names), "trainer.loggers", f"names a logger twice: {names}")
    _check("csv" in names, "trainer.loggers", f"must include csv (metrics.csv feeds `sove plot` and --resume); "
           f"got {names}")


def _validate_data(cfg: DictConfig) -> None:
    """``data.*`` and ``mask.*``: sources, channels, crop sizes (multiples of the token stride), scales, masking."""
    d, m = cfg.data, cfg.model
    _check_choice(d.source, "data.source", SOURCES)
    _check(d.source != "python" or d.root is not None, "data.source",
           "python is set by sove.pretrain(dataset=...) / sove.resume(dataset=...) only (the images are a Python "
           "dataset); from a config or the command line use folder, shards or fashion_mnist")
    _check(d.source == "fashion_mnist" or d.root is not None, "data.root", f"is required when data.source={d.source}")
    _check_choice(d.on_error, "data.on_error", ON_ERROR)
    _check(d.num_channels in (1, 3), "data.num_channels", f"must be 1 or 3, got {d.num_channels}")
    _check_choice(d.augment_on, "data.augment_on", AUGMENT_ON)
    _check(d.max_image_side >= 0, "data.max_image_side", f"must be >= 0 (0 = no bound), got {d.max_image_side}")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}")
    _check(len(d.mean) == d.num_channels and len(d.std) == d.num_channels, "data.mean/data.std",
           f"need {d.num_channels} values (data.num_channels)")
    stride = token_stride(m)
    for key in ("global_crop_size", "local_crop_size"):
        size = d[key]
        what = (f"the Swin token stride {stride} px (model.patch_size {m.patch_size} x 2^(stages-1))"
                if is_swin(m.arch) else f"model.patch_size ({m.patch_size})")
        _check(size > 0 and size % stride == 0, f"data.{key}", f"{size} px is not divisible by {what}")
    for key in ("global_crop_scale", "local_crop_scale"):
        s = list(d[key])
        _check(len(s) == 2 and 0 < s[0] <= s[1] <= 1, f"data.{key}",
               f"must be [min, max] area fractions with 0 < min <= max <= 1, got {s}")
    _check(d.num_local_crops >= 0, "data.num_local_crops", "must be >= 0")
    mk = cfg.mask
    _check(0.0 <= mk.ratio < 1.0, "mask.ratio", f"must be in [0, 1), got {mk.ratio}")
    _check(all(v in (0, 1) for v in mk.views), "mask.views", f"global view indices are 0 and 1, got {list(mk.views)}")
    _check_choice(mk.mode, "mask.mode", MASK_MODES)
    if cfg.loss.patch_weight > 0:  # L_patch (Eq. 4) is a loss on masked tokens only
        cells = (d.global_crop_size // stride) ** 2
        _check(len(mk.views) > 0, "mask.views", "is empty: the patch loss (loss.patch_weight > 0) would see no "
               "masked token; mask a view or set loss.patch_weight=0")
        _check(round(mk.ratio * cells) > 0, "mask.ratio",
               f"{mk.ratio} masks round({mk.ratio} x {cells}) = 0 of the {cells} tokens of a global crop: the patch "
               "loss (loss.patch_weight > 0) would see no masked token; raise mask.ratio or set loss.patch_weight=0")


def _validate_loss(cfg: DictConfig) -> None:
    """``loss.*``: weights, concept settings against the feature-set sizes, temperatures."""
    lo = cfg.loss
    _check_choice(cfg.model.global_pool, "model.global_pool", GLOBAL_POOLS)
    _check_choice(lo.search_dtype, "loss.search_dtype", SEARCH_DTYPES)
    _check(lo.cls_weight >= 0 and lo.patch_weight >= 0, "loss.cls_weight/loss.patch_weight", "must be >= 0")
    _check(lo.cls_weight > 0 or lo.patch_weight > 0, "loss.cls_weight/loss.patch_weight", "cannot both be 0")
    _check(lo.chunk_size >= 1, "loss.chunk_size", f"must be >= 1, got {lo.chunk_size}")
    for name, size_key in (("cls", "cls_feature_set_size"), ("patch", "patch_feature_set_size")):
        c, n = lo[name], lo[size_key]
        _check_concepts(c, f"loss.{name}")
        if lo[f"{name}_weight"] > 0:  # a loss of weight 0 allocates no feature set
            _check(c.num_anchors < n, f"loss.{name}.num_anchors",
                   f"({c.num_anchors}) must be smaller than the feature set loss.{size_key} ({n})")
            _check_concepts(c, f"loss.{name}", n, f" (loss.{size_key})")
    _check(lo.student_temp > 0 and lo.teacher_temp > 0, "loss.student_temp/teacher_temp", "must be > 0")
    _check(lo.teacher_temp_final is None or lo.teacher_temp_final > 0, "loss.teacher_temp_final",
           f"must be > 0 or null (constant loss.teacher_temp), got {lo.teacher_temp_final}")


def _check_concepts(c: DictConfig, prefix: str, num_rows: int | None = None, suffix: str = "") -> None:
    """The concept settings' ranges (:func:`sove.method.settings.concept_problem`), naming the key."""
    problem = concept_problem(c, num_rows)
    if problem is not None:
        raise ConfigError(f"{prefix}.{problem[0]}: {problem[1]}{suffix}")


def _validate_schedule(cfg: DictConfig) -> None:
    """``optim.*`` and the teacher-temperature warm-up: every configured phase must fit in ``optim.epochs``."""
    o, lo = cfg.optim, cfg.loss
    _check(o.batch_size >= 1, "optim.batch_size", "must be >= 1")
    _check(o.accumulate_grad_batches >= 1 and o.batch_size % o.accumulate_grad_batches == 0,
           "optim.accumulate_grad_batches", f"must be >= 1 and divide optim.batch_size ({o.batch_size})")
    _check(o.epochs > 0, "optim.epochs", "must be > 0")
    for key in ("base_lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        _check(o[key] >= 0, f"optim.{key}", f"must be >= 0, got {o[key]}")
    _check(0.0 <= o.momentum_teacher <= 1.0, "optim.momentum_teacher", "must be in [0, 1]")
    _check(o.warmup_epochs == 0 or 0 < o.warmup_epochs < o.epochs, "optim.warmup_epochs",
           f"({o.warmup_epochs}) must be >= 0 and shorter than optim.epochs ({o.epochs}): the lr would never "
           "reach its peak")
    tw = lo.teacher_temp_warmup_epochs
    _check(tw >= 0, "loss.teacher_temp_warmup_epochs", f"must be >= 0, got {tw}")
    _check(tw <= o.epochs, "loss.teacher_temp_warmup_epochs",
           f"({tw}) is longer than optim.epochs ({o.epochs}): loss.teacher_temp_final would never be reached")
    _check(tw == 0 or lo.teacher_temp_final is not None, "loss.teacher_temp_warmup_epochs",
           f"({tw}) warms up to nothing: set loss.teacher_temp_final (null keeps loss.teacher_temp constant)")


def _validate_arch(m: DictConfig) -> None:
    """Backbone keys that only one family accepts (``model.depth`` ViT; ``depths``/``window_size`` Swin)."""
    _check(m.patch_size >= 1, "model.patch_size", f"must be >= 1, got {m.patch_size}")
    if is_swin(m.arch):
        _check(m.global_pool == "mean_patch", "model.global_pool",
               f"Swin ({m.arch}) has no [CLS] token; set model.global_pool=mean_patch (mean final-stage token)")
        _check(m.depth is None, "model.depth", "is for ViTs; give Swin stage depths as model.depths=[2,2,6,2]")
        _check(m.depths is None or (len(m.depths) >= 1 and all(x >= 1 for x in m.depths)), "model.depths",
               f"needs one depth >= 1 per stage, got {m.depths}")
        _check(m.window_size is None or m.window_size >= 1, "model.window_size", f"must be >= 1, got {m.window_size}")
    else:
        _check(m.depths is None, "model.depths", f"is for Swin stage depths; {m.arch} is a ViT (use model.depth)")
        _check(m.window_size is None, "model.window_size", f"is for Swin; {m.arch} is a ViT")
