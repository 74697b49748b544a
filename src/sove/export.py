"""Export a run's teacher backbone as a plain timm checkpoint (safetensors + JSON config).

``sove export RUN_DIR`` writes ``RUN_DIR/backbone.safetensors`` and ``RUN_DIR/backbone.json``;
timm then loads it offline with strict keys::

    import json, timm
    cfg = json.load(open("runs/x/backbone.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file="runs/x/backbone.safetensors", num_classes=0),
                              **cfg["model_kwargs"])

or simply ``sove.export.load_backbone("runs/x/backbone.json")``; ``global_features(model, meta, x)``
gives the image representation ``sove eval`` uses ([CLS], or the mean patch token; for Swin the
mean final-stage token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save

from sove.errors import SoveError
from sove.preflight import check_writable


def export_backbone(run_dir: str | Path, checkpoint: str = "last.pt") -> tuple[Path, Path]:
    """Write the teacher backbone of ``run_dir/checkpoints/<checkpoint>`` for timm.

    Returns:
        (path of ``backbone.safetensors``, path of ``backbone.json``).

    Raises:
        SoveError: not a run directory, missing checkpoint, key mismatch, run directory not writable;
            DiskFullError: no space for a file (each is written atomically: an earlier export stays intact).
    """
    from sove.eval.features import load_run_config, teacher_backbone
    from sove.eval.provenance import checkpoint_step
    from sove.models import timm_name
    from sove.train.checkpoint import atomic_write

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    check_writable(run_dir, "the exported backbone")
    backbone = teacher_backbone(run_dir, cfg, checkpoint)
    model = backbone.timm_model
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    out = run_dir / "backbone.safetensors"
    data = save(weights, metadata={"format": "pt", "producer": "sove"})
    atomic_write(out, lambda f: f.write(data))
    meta: dict[str, Any] = {
        "architecture": timm_name(cfg.model.arch),
        "model_kwargs": backbone.timm_kwargs(),
        "global_pool": backbone.global_pool,
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "weights": out.name, "source": str(run_dir / "checkpoints" / checkpoint),
        "step": checkpoint_step(run_dir / "checkpoints" / checkpoint),
        "features": FEATURES[(type(backbone).__name__, backbone.global_pool)],
    }
    meta_path = run_dir / "backbone.json"
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return out, meta_path


#: How the image representation is read off ``forward_features`` (written into backbone.json).
FEATURES = {
    ("MaskedViT", "cls"): "CLS token after the final norm: model.forward_features(x)[:, 0]",
    ("MaskedViT", "mean_patch"): "mean patch token after the final norm: "
                                 "model.forward_features(x)[:, model.num_prefix_tokens:].mean(1)",
    ("MaskedSwin", "mean_patch"): "mean final-stage token after the final norm: "
                                  "model.forward_features(x).mean((1, 2))",
}


def global_features(model: torch.nn.Module, meta: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """The image representation ``sove eval`` uses, from a model made by :func:`load_backbone`.

    Args:
        model: the timm model of an exported backbone.
        meta: its ``backbone.json`` (``global_pool``: ``cls`` or ``mean_patch``; files written before
            that key existed are ``cls``).
        images: float tensor of shape (batch, channels, height, width), normalised.

    Returns:
        Tensor of shape (batch, embed_dim): [CLS], or the mean patch token (``mean_patch``; for a
        Swin, whose ``forward_features`` is (batch, rows, cols, embed_dim), the mean final-stage token).
    """
    tokens = model.forward_features(images)
    if tokens.ndim == 4:  # Swin: channels-last final-stage grid
        return tokens.mean(dim=(1, 2))
    if meta.get("global_pool", "cls") == "mean_patch":
        return tokens[:, model.num_prefix_tokens:].mean(dim=1)
    return tokens[:, 0]


def load_backbone(path: str | Path) -> torch.nn.Module:
    """Load an exported backbone with timm (strict keys, offline) from its ``backbone.json``.

    Args:
        path: the JSON written by :func:`export_backbone` (or its run directory).

    Returns:
        A timm ``VisionTransformer`` or ``SwinTransformer`` in eval mode; :func:`global_features`
        gives the feature used by ``sove eval``.

    Raises:
        SoveError: the JSON or the weights file is missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.json"
    if not path.is_file():
        raise SoveError(f"'{path}' not found; run `sove export RUN_DIR` first")
    meta = json.loads(path.read_text())
    weights = path.parent / meta["weights"]
    if not weights.is_file():
        raise SoveError(f"weights file '{weights}' named in '{path}' not found")
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=0), **meta["model_kwargs"])
    return model.eval()
