"""timm Swin Transformer wrapped with SOVE's student mask token (docs/method.md, "Networks"; paper preset Swin-T/14).

Swin has no [CLS] token and no absolute position embedding: the mask token replaces the output
of ``patch_embed`` (after its LayerNorm, before the first stage) and masked tokens keep their
position through the windows' relative position bias. The image representation is the mean of
the final-stage tokens after the final norm; the "patch tokens" of the patch loss are the
final-stage tokens (``patch_size * 2 ** (stages - 1)`` px each: 32 px for Swin-T, 7 x 7 of them
on a 224 px crop).

Mask grid (the iBOT convention for Swin, which SOVE's code builds on): the data pipeline draws
the mask on the *final-stage* grid (``crop_size // token_stride`` per side, see
``sove.config.token_stride``), and the backbone repeats every mask cell over the
``2 ** (stages - 1)`` x ``2 ** (stages - 1)`` patch-embedding cells below it (nearest
upsampling) before inserting the mask token. A masked final-stage token therefore sees only
mask tokens in its own receptive field of patch embeddings, and the patch loss's masks and token
order match the backbone's output exactly as for a ViT.
"""

from __future__ import annotations

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from sove.errors import ConfigError
from sove.models.backbone import timm_name


def create_swin(
    arch: str, img_size: int, patch_size: int, in_chans: int, drop_path_rate: float = 0.0,
    embed_dim: int | None = None, depths: list[int] | tuple[int, ...] | None = None,
    num_heads: int | None = None, window_size: int | None = None,
) -> SwinTransformer:
    """Create a randomly initialised timm Swin Transformer without classifier, any input size.

    ``dynamic_img_size=True`` makes timm build the shifted-window attention masks for each
    input size, so one model takes 224 px global and 96 px local crops (grids that are not a
    multiple of the window are zero-padded inside each block, as timm does).

    Args:
        arch: ``swin_tiny|swin_small|swin_base|swin_large`` or a timm ``swin_*`` (v1) model name.
        img_size: global crop size in pixels (sets each stage's reference resolution).
        patch_size: patch-embedding size in pixels (4 for the paper's Swin-T).
        in_chans: input channels.
        drop_path_rate: stochastic depth (0.1 for the student, 0 for the teacher).
        embed_dim: stage-1 width override (later stages double it).
        depths: blocks per stage override; its length sets the number of stages.
        num_heads: stage-1 heads override; stage i gets ``num_heads * 2 ** i``.
        window_size: attention window in tokens (paper Swin-T/14: 14; timm's default 7).

    Raises:
        ConfigError: unknown or non-Swin-v1 ``model.arch``, or widths/heads/depths timm rejects.
    """
    name = timm_name(arch)
    if not timm.is_model(name):
        raise ConfigError(f"model.arch: timm has no model named {name!r} (try swin_tiny, swin_small, swin_base)")
    overrides: dict = {}
    if embed_dim:
        overrides["embed_dim"] = embed_dim
    if depths:
        overrides["depths"] = tuple(depths)
    if num_heads:
        stages = len(depths) if depths else 4
        overrides["num_heads"] = tuple(num_heads * 2 ** i for i in range(stages))
    if window_size:
        overrides["window_size"] = window_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
                                  in_chans=in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=True, **overrides)
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model.embed_dim/num_heads/depths/window_size: timm cannot build {name} with "
                          f"{overrides}: {e}") from None
    if not isinstance(model, SwinTransformer):
        raise ConfigError(f"model.arch: {name!r} is a {type(model).__name__}; only timm SwinTransformer (v1) "
                          "models are supported as Swin backbones")
    return model


class MaskedSwin(nn.Module):
    """A timm Swin Transformer returning named token groups, with an optional learnable mask token.

    Same forward contract as :class:`sove.models.backbone.MaskedViT`.

    Attributes:
        swin: the timm ``SwinTransformer`` (its ``state_dict`` is a plain timm checkpoint).
        embed_dim: width of the output tokens (final stage, e.g. 768 for Swin-T).
        token_stride: pixels per output token = per mask-grid cell (``patch_size * 2 ** (stages - 1)``).
        mask_token: float parameter of shape (stage-1 width,), zeros at init; only in the student.
    """

    def __init__(self, swin: SwinTransformer, with_mask_token: bool = True, global_pool: str = "mean_patch") -> None:
        super().__init__()
        if global_pool != "mean_patch":
            raise ValueError(f"Swin has no [CLS] token: global_pool must be 'mean_patch', got {global_pool!r}")
        self.swin = swin
        self.global_pool = global_pool
        self.embed_dim: int = swin.num_features
        self.patch_size: int = swin.patch_embed.patch_size[0]
        self.upsample: int = 2 ** (len(swin.layers) - 1)  # patch-embed cells per output token, per side
        self.token_stride: int = self.patch_size * self.upsample
        self.mask_token = nn.Parameter(torch.zeros(swin.embed_dim)) if with_mask_token else None

    @property
    def timm_model(self) -> nn.Module:
        """The wrapped timm model (what ``sove export`` writes)."""
        return self.swin

    def timm_kwargs(self) -> dict:
        """``timm.create_model`` keyword arguments that rebuild :attr:`timm_model` (for export)."""
        s = self.swin
        return {"img_size": s.patch_embed.img_size[0], "patch_size": self.patch_size,
                "in_chans": s.patch_embed.proj.in_channels, "embed_dim": s.embed_dim,
                "depths": [len(stage.blocks) for stage in s.layers],
                "num_heads": [stage.blocks[0].attn.num_heads for stage in s.layers],
                # stage 1's window (clipped by timm to its grid) rebuilds every stage's window and shift
                "window_size": s.layers[0].blocks[0].attn.window_size[0], "num_classes": 0, "dynamic_img_size": True}

    def grid(self, img_size: int) -> tuple[int, int]:
        """Final-stage token grid (rows, cols) of a square ``img_size`` px crop (= the mask grid)."""
        return img_size // self.token_stride, img_size // self.token_stride

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding (with its norm), then the mask token at masked positions.

        Args:
            images: float tensor of shape (batch, channels, height, width).
            mask: optional bool tensor of shape (batch, rows * cols) on the final-stage grid
                (:meth:`grid`); True marks a masked output token. Each cell is repeated over the
                ``upsample`` x ``upsample`` patch embeddings below it.

        Returns:
            Tokens of shape (batch, rows * upsample, cols * upsample, stage-1 width), before the stages.

        Raises:
            ValueError: if a mask is given without a mask token or with the wrong shape.
        """
        x = self.swin.patch_embed(images)  # (batch, H, W, width) channels-last
        if mask is None:
            return x
        if self.mask_token is None:
            raise ValueError("this network has no mask token (teacher); call it without a mask")
        b, h, w, _ = x.shape
        f = self.upsample
        rows, cols = h // f, w // f
        if mask.shape != (b, rows * cols):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the final-stage grid ({b}, {rows * cols})")
        full = mask.view(b, rows, 1, cols, 1).expand(b, rows, f, cols, f).reshape(b, h, w, 1)  # nearest x f
        return torch.where(full, self.mask_token.to(x.dtype), x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode images; features after the final norm.

        Args:
            images: float tensor of shape (batch, channels, height, width), sides multiples of
                :attr:`token_stride`.
            mask: optional bool tensor of shape (batch, tokens) on the final-stage grid (student
                global views only).

        Returns:
            dict with ``global`` (the mean final-stage token, paper Tab. B.2 ``mean_patch``) and
            ``cls`` (the same tensor: Swin has no [CLS] token), both (batch, embed_dim), and
            ``patches``: final-stage tokens of shape (batch, rows * cols, embed_dim), row-major.
        """
        x = self.swin.norm(self.swin.layers(self.embed(images, mask)))  # (batch, rows, cols, embed_dim)
        patches = x.flatten(1, 2)
        pooled = patches.mean(dim=1)
        return {"cls": pooled, "global": pooled, "patches": patches}
