"""Frozen encoder with patch tokens, shared by the retrieval, video and segmentation protocols.

:func:`load_dense_encoder` wraps either a run's teacher backbone (``--run RUN``) or an exported
timm backbone (``--backbone backbone.json`` from ``sove export``; both resolved by
:func:`sove.eval.frozen.load_eval_backbone`) behind one interface: images of
any size that is a multiple of the token stride in, the global feature and the patch-token grid
out, both after the final norm (docs/method.md, "Evaluation protocols"), plus the preprocessing
the backbone was trained with.
(The supervised protocols' :class:`sove.eval.frozen.FrozenEncoder` bundles a data config instead;
these protocols bring their own folders.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.transforms.v2 import functional as TF

from sove.data.decode import decode_image
from sove.errors import SoveError
from sove.eval.frozen import command_line, load_eval_backbone, write_json
from sove.preflight import check_writable


@dataclass
class DenseEncoder:
    """A frozen backbone and its preprocessing.

    Attributes:
        forward: images, float (batch, channels, height, width), normalised, height and width
            multiples of ``patch_size`` -> (global feature (batch, dim), patch tokens
            (batch, rows, cols, dim)); rows = height / patch_size, cols = width / patch_size.
        patch_size: pixels per output token (the ViT patch size; a Swin's final-stage stride).
        image_size: the global crop size the backbone was trained at, in pixels.
        mean, std: per-channel normalisation of images scaled to [0, 1].
        channels: 1 (grayscale) or 3 (RGB).
        device: where ``forward`` runs; inputs are moved there and outputs come back on the CPU.
        identity: :func:`sove.eval.provenance.encoder_identity` of the weights (checkpoint step,
            weights hash), recorded in the result JSON; None for an encoder built by hand.
    """

    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    patch_size: int
    image_size: int
    mean: list[float]
    std: list[float]
    channels: int = 3
    device: str = "cpu"
    identity: dict[str, Any] | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (batch, dim), patches (batch, rows, cols, dim)), float32 on the CPU."""
        g, p = self.forward(images.to(self.device))
        return g.float().cpu(), p.float().cpu()

    def read(self, path: str | Path) -> torch.Tensor:
        """Decode an image file to uint8 (channels, height, width); DataError names an unreadable file."""
        return decode_image(path, self.channels)

    def prepare(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 image (channels, H, W) -> normalised float32 (channels, *size), bilinear + antialias resize.

        Raises:
            ValueError: a side of ``size`` is not a positive multiple of ``patch_size``.
        """
        if any(s <= 0 or s % self.patch_size for s in size):
            raise ValueError(f"size {size} must be positive multiples of the patch size {self.patch_size}")
        if tuple(image.shape[-2:]) != tuple(size):
            image = TF.resize(image, list(size), antialias=True)
        return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), self.mean, self.std)

    def fit(self, height: int, width: int, short_side: int) -> tuple[int, int]:
        """(H', W'): short side scaled to ``short_side``, sides rounded down to patch multiples (>= 1 patch)."""
        scale = short_side / min(height, width)
        p = self.patch_size
        return max(p, int(height * scale) // p * p), max(p, int(width * scale) // p * p)


def _grid(patches: torch.Tensor, images: torch.Tensor, stride: int) -> torch.Tensor:
    """(batch, rows * cols, dim), row-major -> (batch, rows, cols, dim) for the images' token grid."""
    rows, cols = images.shape[-2] // stride, images.shape[-1] // stride
    return patches.reshape(patches.shape[0], rows, cols, patches.shape[-1])


def load_dense_encoder(run_dir: str | Path | None = None, backbone: str | Path | None = None,
                       device: str = "cpu") -> DenseEncoder:
    """The teacher backbone of a run, or an exported backbone, as a :class:`DenseEncoder`.

    The global feature is the image representation of ``sove eval knn``: [CLS] (or the mean patch
    token with ``model.global_pool=mean_patch``, recorded in backbone.json; Swin: the mean
    final-stage token). Patch tokens are the backbone's last-layer tokens after the final norm.

    Args:
        run_dir: a directory written by ``sove pretrain`` (teacher of ``checkpoints/last.pt``), or
        backbone: a ``backbone.json`` written by ``sove export`` (or its folder).
        device: where the backbone runs (``cpu``, ``cuda``).

    Raises:
        SoveError: neither or both of run_dir/backbone given, or a missing run/file.
    """
    if (run_dir is None) == (backbone is None):
        raise SoveError("give exactly one of --run RUN_DIR or --backbone backbone.json")
    loaded = load_eval_backbone(run_dir, backbone)
    net, stride = loaded.module.to(device).eval(), loaded.token_stride

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = net(x)
        return out["global"], _grid(out["patches"], x, stride)

    return DenseEncoder(forward, stride, loaded.image_size, loaded.mean, loaded.std, loaded.channels, device,
                        loaded.identity())


def result_path(protocol: str, run_dir: str | Path | None, backbone: str | Path | None,
                out: str | Path | None) -> Path:
    """Where a protocol writes its JSON: ``out`` if given, else ``RUN/eval/<protocol>.json``, else
    ``<folder of backbone.json>/eval/<protocol>.json`` (as ``sove eval linear|lowshot``).

    Raises:
        SoveError: none of ``out``, ``run_dir``, ``backbone``; its folder is not writable (checked
            here, before any image is read).
    """
    if out is not None:
        path = Path(out)
    elif run_dir is not None:
        path = Path(run_dir) / "eval" / f"{protocol}.json"
    elif backbone is not None:
        folder = Path(backbone) if Path(backbone).is_dir() else Path(backbone).parent
        path = folder / "eval" / f"{protocol}.json"
    else:
        raise SoveError(f"no place to write the {protocol} result: give --out RESULT.json")
    check_writable(path.parent, f"the {protocol} result")
    return path


def write_result(result: dict[str, Any], path: Path, encoder: DenseEncoder, settings: dict[str, Any]) -> Path:
    """Add the command line and the provenance to ``result``, write it as indented JSON to ``path``.

    Provenance (:func:`sove.eval.provenance.stamp`): ``checkpoint_step``, ``weights_sha256``,
    ``inputs`` (``encoder.identity`` and the protocol ``settings``, data folder included) and their
    ``fingerprint``; ``sove summary`` compares them with the run's last checkpoint.
    """
    from sove.eval.provenance import stamp

    result["command"] = command_line()
    stamp(result, {"encoder": encoder.identity, "settings": settings})
    return write_json(result, path)
