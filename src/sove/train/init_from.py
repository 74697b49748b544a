"""A new run that starts from existing weights (not a resume), one code path for two keys:

* ``trainer.init_from=CKPT``: student and teacher whole (backbones, projection heads, the mask
  token) from a checkpoint of another sove run;
* ``model.init=SOURCE``: both backbones from ``timm:NAME``, a sove export, a sove run or checkpoint
  (its teacher), or a timm / DINO checkpoint (:mod:`sove.models.pretrained`); the projection heads
  and the mask token start new. Continued pretraining of a timm ViT on one's own images.

The weights must fit this run's model. The one difference that is adapted is the patch grid: a
ViT trained at another resolution (``data.global_crop_size`` / ``model.patch_size``) has
position embeddings for another grid; they are resampled with timm's
``resample_abs_pos_embed`` (bicubic, prefix tokens kept as they are), as timm does when it
loads a checkpoint at a new image size. Any other mismatch is an error naming the file and the
parameter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from timm.layers import resample_abs_pos_embed

from sove.errors import SoveError, warn
from sove.models import build_networks
from sove.models.pretrained import backbone_weights
from sove.train import checkpoint as ckpt

Head = Callable[[int], torch.nn.Module]  # embed_dim -> projection head (a method's make_head)
Networks = tuple[torch.nn.Module, torch.nn.Module]  # (student, teacher)


def initial_networks(cfg: DictConfig, head: Head | None = None) -> Networks | None:
    """(student, teacher) of a new run from ``trainer.init_from`` or ``model.init``; None when neither
    is set (the trainer builds fresh networks). ``head``: the method's ``make_head``."""
    if cfg.trainer.init_from:
        return init_networks(cfg, cfg.trainer.init_from, head)
    if cfg.model.init:
        return init_backbones(cfg, cfg.model.init, head)
    return None


def init_backbones(cfg: DictConfig, source: str, head: Head | None = None) -> Networks:
    """Student and teacher of ``cfg`` (seeded by ``trainer.seed``) whose backbones hold the weights of
    ``source`` (``model.init``); heads and mask token as built.

    Prints one line naming the source, the tensors loaded and those left out; warns when the source
    records a normalisation other than ``data.mean`` / ``data.std``.

    Raises:
        SoveError: see :func:`sove.models.pretrained.backbone_weights`; a parameter missing, unexpected
            or of another shape than the backbone's (other than the position-embedding grid), naming
            the source and the parameter.
    """
    student, teacher = build_networks(cfg, seed=cfg.trainer.seed, head=head)
    weights = backbone_weights(source)
    what = f"model.init: {weights.origin}"
    state = fit_pos_embed(student.backbone.timm_model, weights.state, what)
    for net in (student, teacher):
        ckpt.load_state_strict(net.backbone.timm_model, state, what)
    if rank_zero_only.rank == 0:
        skipped = f"; left out {len(weights.left_out)} (heads, mask token)" if weights.left_out else ""
        print(f"{what}: loaded {len(state)} backbone tensors into the student and the teacher{skipped}; the "
              "projection heads start new")
        d = cfg.data
        if weights.mean is not None and (tuple(weights.mean), tuple(weights.std)) != (tuple(d.mean), tuple(d.std)):
            warn(f"{what} was trained with mean {list(weights.mean)} and std {list(weights.std)}, data.mean / "
                 f"data.std are {list(d.mean)} / {list(d.std)}: set data.mean={list(weights.mean)} "
                 f"data.std={list(weights.std)} to feed it inputs normalised as it expects")
    return student, teacher


def init_networks(cfg: DictConfig, path: str | Path, head: Head | None = None) -> Networks:
    """Student and teacher of ``cfg`` (seeded by ``trainer.seed``) holding the weights of checkpoint ``path``.

    Raises:
        SoveError: the file is missing or unreadable, holds no student/teacher weights, or a
            parameter's shape differs other than by the position-embedding grid (names the
            file and the parameter).
    """
    student, teacher = build_networks(cfg, seed=cfg.trainer.seed, head=head)
    state = ckpt.load_checkpoint(path)
    for name, net in (("student", student), ("teacher", teacher)):
        if not isinstance(state.get(name), dict):
            raise SoveError(f"trainer.init_from: '{path}' holds no {name} weights; give a checkpoint written by "
                            "`sove pretrain` (RUN/checkpoints/last.pt)")
        what = f"trainer.init_from: {name} in {path}"
        ckpt.load_state_strict(net, fit_pos_embed(net, ckpt.strip_prefixes(state[name]), what), what)
    return student, teacher


def fit_pos_embed(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` with every ViT ``pos_embed`` of another square patch grid resampled to ``net``'s grid.

    Args:
        net: the network to load into; a ``pos_embed`` key names its timm ViT's parameter
            (shape (1, prefix + rows * cols, embed_dim)).
        state: the checkpoint's state dict, wrapper prefixes stripped.
        what: names the weights in the printed note.

    Returns:
        A new dict; entries that need no resampling (or cannot be: other width, non-square grid)
        are the given tensors, left for the shape check of :func:`~sove.train.checkpoint.load_state_strict`.
    """
    out = dict(state)
    for key, param in net.state_dict().items():
        old = out.get(key)
        if not key.endswith("pos_embed") or old is None or old.shape == param.shape or old.shape[-1] != param.shape[-1]:
            continue
        vit = net.get_submodule(key.rpartition(".")[0])
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        side = math.isqrt(old.shape[1] - prefix)
        if side * side != old.shape[1] - prefix:
            continue
        grid = list(vit.patch_embed.grid_size)
        out[key] = resample_abs_pos_embed(old, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)
        if rank_zero_only.rank == 0:
            print(f"{what}: resampled {key} from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid "
                  "(timm resample_abs_pos_embed, bicubic)")
    return out
