"""Configuration: dataclass schema (defaults: docs/method.md) ⊕ preset YAML ⊕ ``key=value`` overrides.

``load_config("configs/fashion_mnist_tiny.yaml", ["optim.epochs=2"])`` returns a validated,
read-only OmegaConf object. Unknown keys, wrong types and inconsistent values raise
:class:`~sove.errors.ConfigError` naming the key, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sove.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """Images, crops and augmentation (docs/method.md, "Views and augmentation")."""

    source: str = "fashion_mnist"  # fashion_mnist | folder
    root: Optional[str] = None  # None: search the usual Fashion-MNIST places
    test_root: Optional[str] = None  # labelled test folder for ``source: folder`` evaluation
    download: bool = False  # torchvision download of Fashion-MNIST when online
    num_channels: int = 3
    num_workers: int = 0  # 0 = data in the main process (fastest on 2 cores)
    augment_on: str = "auto"  # loader (workers make the views) | device (workers decode; views batched on the device) | auto
    max_image_side: int = 512  # device path: decoded images are downscaled to this longer side (0 = no bound)
    prefetch_factor: int = 2  # batches each worker keeps ready (num_workers > 0)
    on_error: str = "skip"  # unreadable image: skip (pretraining: next readable one; eval/embed: left out) | raise
    global_crop_size: int = 224
    local_crop_size: int = 96
    num_local_crops: int = 10
    global_crop_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    color_jitter: float = 0.8
    grayscale: float = 0.2
    blur: bool = True
    solarize: float = 0.2
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class MaskConfig:
    """Student masking of the global views (docs/method.md, "Masking"; Fig. B.1)."""

    mode: str = "blockwise"  # blockwise | random
    ratio: float = 0.3
    fill_remainder: bool = False  # blockwise: top up to exactly round(ratio * patches); false = BEiT/iBOT
    views: list[int] = field(default_factory=lambda: [0, 1])  # which global views the student sees masked


@dataclass
class ModelConfig:
    """Backbone and projection head (docs/method.md, "Networks")."""

    arch: str = "vit_small"  # vit_tiny|vit_small|vit_base|vit_large|swin_tiny|swin_small|swin_base or a timm name
    patch_size: int = 16
    embed_dim: Optional[int] = None  # overrides of the preset's width/depth/heads (Swin: stage-1 width and heads)
    depth: Optional[int] = None  # ViT only
    num_heads: Optional[int] = None  # Swin: heads of stage 1, doubled at every later stage
    depths: Optional[list[int]] = None  # Swin only: blocks per stage (its length = number of stages)
    window_size: Optional[int] = None  # Swin only: attention window in tokens (None: timm's 7; paper Swin-T/14: 14)
    drop_path_rate: float = 0.1  # student only
    global_pool: str = "cls"  # cls | mean_patch: image representation for the CLS loss and evaluation (Tab. B.2)
    head_hidden_dim: int = 2048
    head_out_dim: int = 256
    init: Optional[str] = None  # backbone weights to start from: timm:NAME, an export, a timm/DINO/sove checkpoint


@dataclass
class ConceptConfig:
    """Concepts of one loss (docs/method.md, "Concepts: anchors and judges"; Tab. 8, 9, B.1, B.3, B.4)."""

    num_anchors: int = 8192
    num_judges: int = 9  # anchor + k nearest neighbours
    label_mode: str = "soft"  # soft | onehot
    smoothing: float = 0.1
    anchor_keep_fraction: float = 1.0  # 0.5 = the authors' code
    num_tasks: int = 4
    student_temp: Optional[float] = None  # None: loss.student_temp
    teacher_temp: Optional[float] = None  # None: the scheduled CLS teacher temperature


@dataclass
class LossConfig:
    """Loss weights, temperatures and feature-set sizes (docs/method.md, "Feature sets", "Temperatures")."""

    cls_weight: float = 1.0
    patch_weight: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: Optional[float] = None  # None: constant teacher_temp
    teacher_temp_warmup_epochs: float = 0.0
    cls_feature_set_size: int = 65536
    patch_feature_set_size: int = 8192
    cls: ConceptConfig = field(default_factory=ConceptConfig)
    patch: ConceptConfig = field(default_factory=lambda: ConceptConfig(num_anchors=512, num_judges=1, num_tasks=1))
    chunk_size: int = 1024  # anchors per k-NN chunk


@dataclass
class PeersConfig:
    """DINO / iBOT only (``method=dino|ibot``; docs/method.md, "Methods"): lightly's head and centering."""

    num_prototypes: int = 4096  # K, the width of the head's weight-normalised last layer
    center_momentum: float = 0.9  # teacher-logit center: m * center + (1 - m) * step mean


@dataclass
class OptimConfig:
    """AdamW and schedules (docs/method.md, "Optimisation and schedules")."""

    epochs: float = 800
    batch_size: int = 64  # per process and optimizer step
    accumulate_grad_batches: int = 1  # split each batch into this many micro-batches (memory), same gradient
    base_lr: float = 5e-4  # lr = base_lr * global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per parameter tensor; 0 disables
    momentum_teacher: float = 0.996
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainerConfig:
    """Devices, precision, logging and checkpoints."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    seed: int = 0
    out_dir: str = "runs"
    name: Optional[str] = None  # None: the preset's file name
    max_steps: Optional[int] = None  # stop early (tests, smoke runs)
    time_budget: Optional[str] = None  # e.g. 30min, 2h, 90s, seconds: schedules sized to the measured pace
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 0  # also keep the N newest step-numbered checkpoints
    init_from: Optional[str] = None  # student + teacher (heads too) from a sove checkpoint (not a resume)
    check_sync: bool = False  # DDP: assert all ranks hold identical feature sets and anchors each step
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does (debug file either way)
    num_threads: Optional[int] = None  # torch CPU threads; None = torch default
    compile: bool = False  # torch.compile the student (measured: no gain on the 2-core CPU demo)
    progress: bool = True
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # + wandb, mlflow (extras)


@dataclass
class EvalConfig:
    """Frozen-feature evaluation (docs/method.md, "Evaluation protocols")."""

    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    batch_size: int = 256
    knn_every_epochs: int = 0  # periodic k-NN during pretraining (0 = off); needs labelled train/test data
    knn_train_subset: int = 10000  # periodic k-NN: N train images as the bank, class-balanced, seeded ...
    knn_test_subset: int = 2000  # ... and N test images as queries (same images at every evaluation)


@dataclass
class SOVEConfig:
    """The whole configuration; see ``docs/configs.md``."""

    method: str = "sove"  # sove | dino | ibot: the objective (sove.method.METHODS)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_preset(path_or_name: str) -> Path:
    """A config file path, or the name of a packaged preset (``fashion_mnist_tiny``)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    packaged = PRESET_DIR / (p.name if p.suffix else p.name + ".yaml")
    if packaged.is_file():
        return packaged
    names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{path_or_name}' not found (packaged presets: {names})")


def preset_descriptions() -> list[tuple[str, str]]:
    """``(name, description)`` of every packaged preset, sorted by name; the description is the
    first line of the YAML, a comment (empty when the file does not start with one)."""
    out = []
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        out.append((path.stem, first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""))
    return out


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Merge defaults ⊕ preset YAML ⊕ dotlist overrides, then validate.

    Args:
        preset: YAML path or packaged preset name; None = the schema defaults (paper ViT-S/16).
        overrides: ``key=value`` strings, e.g. ``["loss.cls.num_judges=5"]``.

    Returns:
        A read-only DictConfig; ``trainer.name`` filled in from the preset's file name.

    An ``optim.epochs=N`` override (given explicitly, i.e. in ``overrides``, not in a preset or YAML
    file) turns off a ``trainer.time_budget`` of the preset: the run gets the fixed schedule asked for;
    unless ``trainer.time_budget`` is an override too (then ``optim.epochs`` only gives the warm-up
    fractions, docs/configs.md "Time budget").

    Raises:
        ConfigError: unknown key, wrong type, malformed override, or invalid value.
    """
    cfg = OmegaConf.structured(SOVEConfig)
    try:
        if preset is not None:
            path = resolve_preset(preset)
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
            if cfg.trainer.name is None:
                cfg.trainer.name = path.stem
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        _explicit_length_wins(cfg, overrides)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}") from None
    if cfg.trainer.name is None:
        cfg.trainer.name = "sove"
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


#: The values of the string keys checked here by membership (the others list theirs in their message).
CHOICES = {
    "method": ("sove", "dino", "ibot"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"),
    "trainer.loggers": ("csv", "tensorboard", "wandb", "mlflow"),
}


def _explicit_length_wins(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> None:
    """An ``optim.epochs`` override without a ``trainer.time_budget`` override sets ``trainer.time_budget`` to
    null: the fixed schedule asked for (docs/configs.md, "Time budget")."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "optim.epochs" in keys and "trainer.time_budget" not in keys:
        cfg.trainer.time_budget = None


#: Stages of a timm Swin Transformer (v1) when ``model.depths`` is not set.
SWIN_STAGES = 4


def is_swin(arch: str) -> bool:
    """True when ``model.arch`` names a Swin Transformer (``swin_tiny`` or a timm ``swin_*`` name)."""
    return arch.startswith("swin")


def token_stride(model: DictConfig) -> int:
    """Pixels per output token of the backbone: the side of one cell of the patch-loss / mask grid.

    ViT: ``model.patch_size``. Swin: ``patch_size * 2 ** (stages - 1)`` (the final stage's tokens;
    32 px for Swin-T with patch 4). Crop sizes must be multiples of it.
    """
    if not is_swin(model.arch):
        return int(model.patch_size)
    stages = len(model.depths) if model.depths else SWIN_STAGES
    return int(model.patch_size) * 2 ** (stages - 1)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-key consistency; raise ConfigError naming the key.

    Checks that need the dataset size (steps per epoch, feature sets the run can fill, images
    dropped per epoch) run later, in :func:`sove.train.preflight.check_run_plan`.
    """
    _check(cfg.method in CHOICES["method"], "method",
           f"must be one of {', '.join(CHOICES['method'])}; got {cfg.method!r}")
    _check(cfg.peers.num_prototypes >= 1, "peers.num_prototypes", f"must be >= 1, got {cfg.peers.num_prototypes}")
    _check(0.0 <= cfg.peers.center_momentum < 1.0, "peers.center_momentum",
           f"must be in [0, 1), got {cfg.peers.center_momentum}")
    _validate_arch(cfg.model)
    _validate_data(cfg)
    _validate_loss(cfg)
    _validate_schedule(cfg)
    t = cfg.trainer
    _check(t.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", f"must be stop or skip, got {t.on_nonfinite!r}")
    for key in ("accelerator", "precision"):
        _check(t[key] in CHOICES[f"trainer.{key}"], f"trainer.{key}",
               f"must be one of {', '.join(CHOICES[f'trainer.{key}'])}; got {t[key]!r}")
    _validate_loggers(list(t.loggers))
    _check(t.init_from is None or cfg.model.init is None, "model.init/trainer.init_from",
           "give one: model.init starts the backbones from weights (heads new), trainer.init_from the whole "
           "student and teacher from a sove checkpoint")
    for key in ("log_every", "checkpoint_every"):
        _check(t[key] >= 1, f"trainer.{key}", f"must be >= 1 (steps), got {t[key]}")
    _check(t.keep_checkpoints >= 0, "trainer.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}")
    _check(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", f"must be >= 1 or null, got {t.max_steps}")
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
    valid = CHOICES["trainer.loggers"]
    unknown = [n for n in names if n not in valid]
    _check(not unknown, "trainer.loggers", f"unknown logger {unknown[0] if unknown else ''!r}; "
           f"the loggers are {', '.join(valid)} (e.g. trainer.loggers=[csv,tensorboard,wandb])")
    _check(len(set(names)) == len(names), "trainer.loggers", f"names a logger twice: {names}")
    _check("csv" in names, "trainer.loggers", f"must include csv (metrics.csv feeds `sove plot` and --resume); "
           f"got {names}")


def _validate_data(cfg: DictConfig) -> None:
    """``data.*`` and ``mask.*``: sources, channels, crop sizes (multiples of the token stride), scales, masking."""
    d, m = cfg.data, cfg.model
    _check(d.source in ("fashion_mnist", "folder"), "data.source", f"must be fashion_mnist or folder, got {d.source!r}")
    _check(d.source != "folder" or d.root is not None, "data.root", "is required when data.source=folder")
    _check(d.on_error in ("skip", "raise"), "data.on_error", f"must be skip or raise, got {d.on_error!r}")
    _check(d.num_channels in (1, 3), "data.num_channels", f"must be 1 or 3, got {d.num_channels}")
    _check(d.augment_on in ("auto", "loader", "device"), "data.augment_on",
           f"must be auto, loader or device, got {d.augment_on!r}")
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
    _check(mk.mode in ("blockwise", "random"), "mask.mode", f"must be blockwise or random, got {mk.mode!r}")
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
    _check(cfg.model.global_pool in ("cls", "mean_patch"), "model.global_pool",
           f"must be cls or mean_patch, got {cfg.model.global_pool!r}")
    _check(lo.cls_weight >= 0 and lo.patch_weight >= 0, "loss.cls_weight/loss.patch_weight", "must be >= 0")
    _check(lo.cls_weight > 0 or lo.patch_weight > 0, "loss.cls_weight/loss.patch_weight", "cannot both be 0")
    _check(lo.chunk_size >= 1, "loss.chunk_size", f"must be >= 1, got {lo.chunk_size}")
    for name, size_key in (("cls", "cls_feature_set_size"), ("patch", "patch_feature_set_size")):
        c, n = lo[name], lo[size_key]
        weight = lo[f"{name}_weight"]
        p = f"loss.{name}"
        _check(c.num_judges >= 1, f"{p}.num_judges", f"must be >= 1 (the anchor itself), got {c.num_judges}")
        _check(c.num_anchors >= 2, f"{p}.num_anchors", f"must be >= 2, got {c.num_anchors}")
        _check(c.num_tasks >= 1, f"{p}.num_tasks", f"must be >= 1, got {c.num_tasks}")
        _check(c.label_mode in ("soft", "onehot"), f"{p}.label_mode", f"must be soft or onehot, got {c.label_mode!r}")
        _check(0.0 <= c.smoothing < 1.0, f"{p}.smoothing", f"must be in [0, 1), got {c.smoothing}")
        _check(0.0 < c.anchor_keep_fraction <= 1.0, f"{p}.anchor_keep_fraction", "must be in (0, 1]")
        for t in ("student_temp", "teacher_temp"):
            _check(c[t] is None or c[t] > 0, f"{p}.{t}", f"must be > 0 or null (use loss.{t}), got {c[t]}")
        if weight > 0:
            _check(c.num_anchors < n, f"{p}.num_anchors",
                   f"({c.num_anchors}) must be smaller than the feature set loss.{size_key} ({n})")
            _check(c.num_anchors + c.num_judges - 1 <= n, f"{p}.num_judges",
                   f"({c.num_judges}) too large: the pool left after removing {c.num_anchors} anchors "
                   f"from loss.{size_key} ({n}) has {n - c.num_anchors} rows")
    _check(lo.student_temp > 0 and lo.teacher_temp > 0, "loss.student_temp/teacher_temp", "must be > 0")
    _check(lo.teacher_temp_final is None or lo.teacher_temp_final > 0, "loss.teacher_temp_final",
           f"must be > 0 or null (constant loss.teacher_temp), got {lo.teacher_temp_final}")


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
