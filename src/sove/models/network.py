"""Student and teacher networks: masked ViT backbone + shared projection head (docs/method.md, "Networks")."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sove.config import is_swin
from sove.models.backbone import MaskedViT, create_vit
from sove.models.head import ProjectionHead
from sove.models.swin import MaskedSwin, create_swin
from sove.seeding import stream_seed

Backbone = MaskedViT | MaskedSwin


def build_backbone(cfg, drop_path_rate: float, with_mask_token: bool) -> Backbone:
    """The configured backbone: :class:`MaskedSwin` when ``model.arch`` starts with ``swin``, else :class:`MaskedViT`.

    Args:
        cfg: the full config (``model`` and ``data`` sections are read).
        drop_path_rate: stochastic depth (student ``model.drop_path_rate``, teacher 0).
        with_mask_token: True for the student only.

    Raises:
        ConfigError: an unknown ``model.arch`` or sizes timm rejects.
    """
    m, d = cfg.model, cfg.data
    if is_swin(m.arch):
        swin = create_swin(m.arch, d.global_crop_size, m.patch_size, d.num_channels, drop_path_rate,
                           m.embed_dim, m.depths, m.num_heads, m.window_size)
        return MaskedSwin(swin, with_mask_token=with_mask_token, global_pool=m.global_pool)
    vit = create_vit(m.arch, d.global_crop_size, m.patch_size, d.num_channels, drop_path_rate,
                     m.embed_dim, m.depth, m.num_heads)
    return MaskedViT(vit, with_mask_token=with_mask_token, global_pool=m.global_pool)


class SOVENetwork(nn.Module):
    """Backbone + projection head; one call encodes all crops of a step, grouped by resolution.

    Attributes:
        backbone: :class:`MaskedViT` or :class:`MaskedSwin` (with a mask token in the student only).
        head: :class:`ProjectionHead` applied to [CLS] and to selected patch tokens.
    """

    def __init__(self, backbone: Backbone, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None, patch_select: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the global crops (optionally masked) and the local crops.

        Args:
            global_crops: (global_views * batch, channels, H, W), view-major.
            local_crops: optional (local_views * batch, channels, h, w), view-major.
            masks: optional bool (global_views * batch, patches): positions replaced by the mask
                token (student only).
            patch_select: optional bool (global_views * batch, patches): patch tokens to project
                (e.g. the masked ones); defaults to ``masks``.

        Returns:
            dict with ``cls``: unit-norm projections of shape (views * batch, out_dim), globals
            first; ``patches``: unit-norm projections of the selected patch tokens, shape
            (selected, out_dim) in row-major (image, patch) order; ``patch_tokens``: the raw
            backbone patch tokens of the globals, shape (global_views * batch, patches, D).
        """
        g = self.backbone(global_crops, masks)
        cls = [g["global"]]
        if local_crops is not None and local_crops.shape[0] > 0:
            cls.append(self.backbone(local_crops)["global"])
        select = masks if patch_select is None else patch_select
        out = {"cls": self.head(torch.cat(cls)), "patch_tokens": g["patches"]}
        if select is not None:
            out["patches"] = self.head(g["patches"][select])
        return out


def build_networks(cfg, seed: int | None = None,
                   head: Callable[[int], nn.Module] | None = None) -> tuple[SOVENetwork, SOVENetwork]:
    """Student and teacher from the ``model``/``data`` config; teacher = student copy, no storage shared.

    The teacher has no mask token and no drop path and never needs gradients. It is built like the
    student, then loaded from the student's state (this also copies weight-normalised heads).

    Args:
        cfg: the full config (``sove.config.SOVEConfig``).
        seed: if given, the weights come from the ``network_init`` stream of this seed
            (:mod:`sove.seeding`): timm initialises from torch's global CPU RNG, so it is forked,
            seeded from the stream, and restored afterwards (the caller's global RNG is left as
            it was). None: initialised from the global RNG as it stands.
        head: ``head(embed_dim)`` -> projection head (the method's ``make_head``); default
            :class:`ProjectionHead` of ``model.head_hidden_dim`` / ``head_out_dim``.

    Returns:
        (student, teacher).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(stream_seed(seed, "network_init"))
            return build_networks(cfg, None, head)
    m = cfg.model
    if head is None:
        def head(embed_dim: int) -> nn.Module:
            return ProjectionHead(embed_dim, m.head_hidden_dim, m.head_out_dim)

    def make(drop_path: float, mask_token: bool) -> SOVENetwork:
        backbone = build_backbone(cfg, drop_path, mask_token)
        return SOVENetwork(backbone, head(backbone.embed_dim))

    student = make(m.drop_path_rate, True)
    teacher = make(0.0, False)
    state = {k: v for k, v in student.state_dict().items() if k != "backbone.mask_token"}
    teacher.load_state_dict(state, strict=True)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def build_teacher_backbone(cfg) -> Backbone:
    """An untrained teacher backbone of the configured architecture (for loading or baselines)."""
    return build_backbone(cfg, 0.0, False)
