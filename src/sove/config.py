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
from sove.method.settings import ConceptSettings

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """Images, crops and augmentation (docs/method.md, "Views and augmentation")."""

    # fashion_mnist | folder | shards (`sove shard` output: a folder or s3://, gs://, ...) | python (set by
    # sove.pretrain(dataset=...): data.root then describes the user's dataset)
    source: str = "fashion_mnist"
    root: Optional[str] = None  # None: search the usual Fashion-MNIST places
    test_root: Optional[str] = None  # labelled test folder (``source: folder``) or shards (``source: shards``) for evaluation
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
    cls: ConceptSettings = field(default_factory=ConceptSettings)
    patch: ConceptSettings = field(default_factory=lambda: ConceptSettings(num_anchors=512, num_judges=1, num_tasks=1))
    chunk_size: int = 1024  # anchors per k-NN chunk
    search_dtype: str = "float32"  # dtype of the judges' k-NN search: float32 | bfloat16 | float16 | auto


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
    auto_resume: bool = False  # a run directory holding a checkpoint is resumed, not refused (torchrun restarts)
    check_sync: bool = False  # DDP: assert all ranks hold identical feature sets and anchors each step
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does (debug file either way)
    num_threads: Optional[int] = None  # torch CPU threads; None = torch default
    compile: bool = False  # torch.compile the student (measured: no gain on the 2-core CPU demo)
    deterministic: bool = False  # deterministic kernels (CUDA: bit-identical repeats and resumes; slower)
    progress: bool = True  # tqdm bars on stderr (training steps, periodic k-NN features); false: none
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


#: Words YAML 1.1 reads as booleans: a dotlist value ``off`` would become ``False``.
_YAML_BOOLEANS = {"yes", "no", "on", "off", "true", "false", "y", "n"}


def _literal_strings(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` with the value of a string key quoted when YAML would read it as a boolean, so
    ``trainer.name=off`` names the run ``off`` (not ``False``)."""
    from omegaconf.nodes import StringNode

    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        parent, _, leaf = key.strip().rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        target = node._get_node(leaf) if isinstance(node, DictConfig) and leaf in node else None
        if isinstance(target, StringNode) and value.strip().lower() in _YAML_BOOLEANS:
            item = f"{key}='{value.strip()}'"
        out.append(item)
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
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(_literal_strings(cfg, overrides)))
        _explicit_length_wins(cfg, overrides)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}") from None
    if cfg.trainer.name is None:
        cfg.trainer.name = "sove"
    from sove.validation import validate  # reads is_swin / token_stride from this module

    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


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
