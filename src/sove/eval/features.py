"""Frozen features for evaluation: teacher backbone, after the final norm (docs/method.md, "Evaluation protocols")."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from sove.config import load_config
from sove.data import build_source
from sove.errors import DataError, SoveError
from sove.models import MaskedViT, build_networks, build_teacher_backbone
from sove.train.checkpoint import load_checkpoint, load_state_strict


class EvalImages(Dataset):
    """Deterministic evaluation view of a source: resize + centre crop to the global crop size, normalise.

    Items are ``(float32 image (channels, size, size), int label)``.
    """

    def __init__(self, source: Dataset, size: int, mean: list[float], std: list[float]) -> None:
        self.source, self.size = source, size
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[i]
        if image.shape[-2:] != (self.size, self.size):
            image = TF.center_crop(TF.resize(image, self.size, antialias=True), [self.size, self.size])
        image = TF.to_dtype(image, torch.float32, scale=True)
        return TF.normalize(image, self.mean, self.std), int(label)


def eval_split(cfg: DictConfig, split: str) -> EvalImages:
    """The labelled ``train`` or ``test`` split of the run's data, as :class:`EvalImages`.

    Raises:
        DataError: the split has no labels (a flat folder) or no test folder is configured.
    """
    d = cfg.data
    source = build_source(d.source, d.root, split, d.download, d.num_channels, d.test_root)
    if getattr(source, "labels", None) is None:
        where = d.test_root if split == "test" else d.root
        raise DataError(f"'{where}' has no labels (images must lie in one sub-folder per class) "
                        f"for a supervised evaluation of the {split} split")
    return EvalImages(source, d.global_crop_size, d.mean, d.std)


def labels_of(dataset: EvalImages) -> torch.Tensor:
    """int64 tensor (N,) of the dataset's labels."""
    return torch.as_tensor(dataset.source.labels, dtype=torch.long)


@torch.no_grad()
def extract_features(backbone: MaskedViT, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", desc: str = "features") -> torch.Tensor:
    """Global features after the final norm ([CLS], or the mean patch token with
    ``model.global_pool=mean_patch``; Swin: the mean final-stage token), L2-normalised, in dataset order.

    Args:
        backbone: a teacher backbone (no mask token); put in eval mode here.
        dataset: items ``(float image (C, H, W), label)``.
        batch_size: images per forward.
        device: where to run the backbone.

    Returns:
        float32 tensor of shape (N, embed_dim) on the CPU, unit-norm rows.
    """
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        out.append(torch.nn.functional.normalize(backbone(images.to(device))["global"].float(), dim=1).cpu())
    return torch.cat(out)


def pixel_features(dataset: Dataset, center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw-pixel baseline: flattened normalised pixels, minus ``center`` (default: their mean), L2-normalised.

    Returns:
        (features (N, C*H*W) float32, the centre used (C*H*W,)).
    """
    loader = DataLoader(dataset, batch_size=1024, shuffle=False, num_workers=0)
    x = torch.cat([images.flatten(1) for images, _ in loader])
    center = x.mean(0) if center is None else center
    return torch.nn.functional.normalize(x - center, dim=1), center


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved ``config.yaml`` of a run directory, with optional overrides.

    Raises:
        SoveError: the directory or its config.yaml is missing.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise SoveError(f"'{run_dir}' is not a sove run directory (no config.yaml); "
                        "pass the folder that `sove pretrain` wrote")
    return load_config(str(path), overrides)


def teacher_backbone(run_dir: str | Path, cfg: DictConfig, checkpoint: str = "last.pt") -> MaskedViT:
    """The trained teacher backbone of a run (strict key check)."""
    path = Path(run_dir) / "checkpoints" / checkpoint
    state = load_checkpoint(path)["teacher"]
    backbone = build_teacher_backbone(cfg)
    prefix = "backbone."
    load_state_strict(backbone, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                      f"teacher backbone in {path}")
    return backbone


def random_init_backbone(cfg: DictConfig) -> MaskedViT:
    """The run's teacher backbone as initialised before training (same seed, same architecture)."""
    return build_networks(cfg, seed=cfg.trainer.seed)[1].backbone
