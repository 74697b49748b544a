"""timm Vision Transformer wrapped with SOVE's student mask token (docs/method.md, "Networks").

The wrapper reuses timm's own modules (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``,
``norm``) and only inserts the mask token between the patch embedding and the position
embedding, so masked tokens keep their position. ``dynamic_img_size=True`` lets one model take
global and local crops of different sizes.
"""

from __future__ import annotations

from functools import lru_cache

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sove.choices import GLOBAL_POOLS
from sove.errors import ConfigError


#: Short names accepted by ``model.arch``; any other name is passed to ``timm.create_model``.
ARCH_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swin_large": "swin_large_patch4_window7_224",
}


def timm_name(arch: str) -> str:
    """The timm model name for ``model.arch`` (aliases resolved)."""
    return ARCH_ALIASES.get(arch, arch)


def create_vit(
    arch: str, img_size: int, patch_size: int, in_chans: int, drop_path_rate: float = 0.0,
    embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
) -> nn.Module:
    """Create a randomly initialised timm ViT without classifier, with ``dynamic_img_size``.

    Args:
        arch: ``vit_tiny|vit_small|vit_base|vit_large`` or a timm ViT model name.
        img_size: global crop size in pixels (position embeddings are made for this grid and
            resampled for other crop sizes).
        patch_size: patch size in pixels; must divide every crop size.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        drop_path_rate: stochastic depth (0.1 for the student, 0 for the teacher).
        embed_dim, depth, num_heads: optional overrides of the preset's width/depth/heads.

    Raises:
        ConfigError: if timm does not know ``arch`` (names the key ``model.arch``).
    """
    overrides = {k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v}
    name = timm_name(arch)
    if not timm.is_model(name):
        raise ConfigError(f"model.arch: timm has no model named {name!r} (try vit_tiny, vit_small, vit_base, vit_large)")
    return timm.create_model(
        name, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=True, **overrides,
    )


class MaskedViT(nn.Module):
    """A timm ViT returning named token groups, with an optional learnable mask token.

    Attributes:
        vit: the timm ``VisionTransformer`` (its ``state_dict`` is a plain timm checkpoint).
        mask_token: float parameter of shape (embed_dim,), zeros at init; only in the student.
    """

    def __init__(self, vit: nn.Module, with_mask_token: bool = True, global_pool: str = "cls") -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        self.vit = vit
        self.global_pool = global_pool
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.token_stride: int = self.patch_size  # pixels per output token = per mask-grid cell
        self.mask_token = nn.Parameter(torch.zeros(self.embed_dim)) if with_mask_token else None

    @property
    def timm_model(self) -> nn.Module:
        """The wrapped timm model (what ``sove export`` writes)."""
        return self.vit

    def timm_kwargs(self) -> dict:
        """``timm.create_model`` keyword arguments that rebuild :attr:`timm_model` (for export)."""
        vit = self.vit
        return {"img_size": vit.patch_embed.img_size[0], "patch_size": self.patch_size,
                "in_chans": vit.patch_embed.proj.in_channels, "embed_dim": vit.embed_dim,
                "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
                "num_classes": 0, "dynamic_img_size": True}

    def grid(self, img_size: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of a square crop of ``img_size`` pixels (= the mask grid)."""
        return img_size // self.patch_size, img_size // self.patch_size

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, position embedding, prefix tokens.

        Args:
            images: float tensor of shape (batch, channels, height, width).
            mask: optional bool tensor of shape (batch, rows * cols); True marks a masked patch.

        Returns:
            Tokens of shape (batch, prefix + rows * cols, embed_dim), before the blocks.

        Raises:
            ValueError: if a mask is given without a mask token or with the wrong shape.
        """
        x = self.vit.patch_embed(images)  # (batch, rows, cols, embed_dim) with dynamic_img_size
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this network has no mask token (teacher); call it without a mask")
            b, h, w, d = x.shape
            if mask.shape != (b, h * w):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the patch grid ({b}, {h * w})")
            x = torch.where(mask.view(b, h, w, 1), self.mask_token.to(x.dtype), x)
        x = self.position_embed(x)
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def position_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed`` of patch tokens (batch, rows, cols, embed_dim) -> (batch, tokens, embed_dim).

        With deterministic algorithms on (``trainer.deterministic``) a position embedding resampled to
        another grid (the local crops) is the product with a cached resampling matrix
        (:func:`resample_matrix`: the same values as timm's antialiased bicubic ``F.interpolate`` up to
        float rounding), because the CUDA backward of that resize adds with atomics in a varying order.
        """
        vit = self.vit
        grid = tuple(x.shape[1:3])
        if (not torch.are_deterministic_algorithms_enabled() or not vit.dynamic_img_size or vit.pos_embed is None
                or grid == tuple(vit.patch_embed.grid_size)):
            return vit._pos_embed(x)
        b, c = x.shape[0], x.shape[-1]
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = vit.pos_embed
        weights = resample_matrix(tuple(vit.patch_embed.grid_size), grid, str(pos.device))  # (new, old) fp32
        pos = torch.cat([pos[:, :prefix], (weights @ pos[0, prefix:].float()).to(pos.dtype)[None]], dim=1)
        tokens = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        x = x.reshape(b, -1, c)
        x = torch.cat(tokens + [x + pos], dim=1) if vit.no_embed_class else torch.cat(tokens + [x], dim=1) + pos
        return vit.pos_drop(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode images; features after the final norm.

        Args:
            images: float tensor of shape (batch, channels, height, width).
            mask: optional bool tensor of shape (batch, patches) (student global views only).

        Returns:
            dict with ``cls`` (the [CLS] token) and ``global`` (the image representation used by the
            CLS loss and by evaluation: the [CLS] token, or the mean patch token when
            ``global_pool="mean_patch"``, paper Tab. B.2), both (batch, embed_dim), and ``patches``
            of shape (batch, patches, embed_dim).
        """
        x = self.vit.norm(self.vit.blocks(self.embed(images, mask)))
        prefix = self.vit.num_prefix_tokens
        patches = x[:, prefix:]
        pooled = x[:, 0] if self.global_pool == "cls" else patches.mean(dim=1)
        return {"cls": x[:, 0], "global": pooled, "patches": patches}


@lru_cache(maxsize=32)
def resample_matrix(old: tuple[int, int], new: tuple[int, int], device: str) -> torch.Tensor:
    """The linear map of timm's position-embedding resample (``resample_abs_pos_embed``: bicubic,
    antialiased) from an ``old`` (rows, cols) grid to a ``new`` one: float32 (new_rows * new_cols,
    old_rows * old_cols) on ``device``, row-major cells. Interpolation is linear, so ``W @ pos`` equals
    ``F.interpolate`` of ``pos`` up to rounding, and its backward is a matrix product (deterministic)."""
    basis = torch.eye(old[0] * old[1]).view(-1, 1, *old)
    out = F.interpolate(basis, size=new, mode="bicubic", antialias=True)  # (old cells, 1, *new)
    return out.view(old[0] * old[1], new[0] * new[1]).T.contiguous().to(device)
