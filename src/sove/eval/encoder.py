"""The one loader of evaluation: a frozen backbone from ``--run RUN`` or ``--backbone EXPORT_OR_CHECKPOINT``.

Every protocol (``sove eval knn|linear|lowshot|retrieval|video|segmentation``, ``sove embed``) loads its
backbone with :func:`load_frozen` and gets one :class:`FrozenBackbone`: the module, the preprocessing it
was trained with, the config whose ``data.*`` keys describe the labelled splits, where results go and the
provenance recorded in every result (checkpoint step, weights SHA-256). Features are taken after the
final norm, never from a projection head (docs/method.md, "Evaluation protocols").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchvision.transforms.v2 import functional as TF

from sove.data.decode import decode_image
from sove.errors import SoveError
from sove.preflight import check_writable
from sove.run import BACKBONE_JSON, CHECKPOINT_DIR, EVAL_DIR, Run


@dataclass
class FrozenBackbone:
    """A frozen backbone loaded for evaluation, its preprocessing and provenance.

    Attributes:
        module: eval-mode backbone whose forward gives ``global`` (batch, dim) and ``patches``
            (batch, rows * cols, dim) after the final norm (``MaskedViT`` also ``cls``); a
            :class:`~sove.models.MaskedViT` / ``MaskedSwin`` without mask token when loaded.
        image_size: the global crop size the backbone was trained at, in pixels.
        token_stride: pixels per output token (the ViT patch size; a Swin's final-stage stride).
        mean, std: per-channel normalisation of images scaled to [0, 1].
        channels: 1 (grayscale) or 3 (RGB).
        device: where the module runs; :meth:`__call__` moves inputs there.
        patch_size: the patch-embedding size in pixels (default: ``token_stride``).
        global_pool: ``cls`` or ``mean_patch`` (the module's image representation).
        arch: the run config's ``model.arch``, or the timm name in backbone.json's ``architecture``.
        weights: the weights file (a checkpoint or the file named in backbone.json); None when built by hand.
        step: the training step of the weights, None if unknown.
        weights_sha256: :func:`sove.eval.provenance.weights_sha256` of the module's state dict.
        cfg: config whose ``data.*`` keys give the labelled splits and preprocessing: the run's ⊕
            overrides, else the package defaults ⊕ the export's preprocessing ⊕ overrides.
        out_dir: results and feature caches (``RUN/eval``, or ``eval/`` beside backbone.json).
        run: the run directory, when the backbone or the data came from one.
        meta: the parsed backbone.json when loaded from an export.
    """

    module: torch.nn.Module
    image_size: int
    token_stride: int
    mean: list[float]
    std: list[float]
    channels: int = 3
    device: str = "cpu"
    patch_size: int | None = None
    global_pool: str | None = None
    arch: str = ""
    weights: Path | None = None
    step: int | None = None
    weights_sha256: str | None = None
    cfg: DictConfig | None = None
    out_dir: Path | None = None
    run: Run | None = None
    meta: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any] | None:
        """:func:`sove.eval.provenance.encoder_identity` of the weights; None for a backbone built by hand."""
        from sove.eval.provenance import encoder_identity

        if self.weights is None:
            return None
        return encoder_identity(self.weights_sha256, self.step, self.arch, self.global_pool, self.weights)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (batch, dim), patch tokens (batch, rows, cols, dim)), float32 on the CPU
        (:func:`sove.eval.features.image_features`, mode ``patches``)."""
        from sove.eval.features import image_features

        g, p = image_features(self.module, images.to(self.device), "patches")
        return g.cpu(), p.cpu()

    def read(self, path: str | Path) -> torch.Tensor:
        """Decode an image file to uint8 (channels, height, width); DataError names an unreadable file."""
        return decode_image(path, self.channels)

    def prepare(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 image (channels, H, W) -> normalised float32 (channels, *size), bilinear + antialias resize.

        Raises:
            ValueError: a side of ``size`` is not a positive multiple of ``token_stride``.
        """
        if any(s <= 0 or s % self.token_stride for s in size):
            raise ValueError(f"size {size} must be positive multiples of the patch size {self.token_stride}")
        if tuple(image.shape[-2:]) != tuple(size):
            image = TF.resize(image, list(size), antialias=True)
        return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), self.mean, self.std)

    def fit(self, height: int, width: int, short_side: int) -> tuple[int, int]:
        """(H', W'): short side scaled to ``short_side``, sides rounded down to stride multiples (>= 1 token)."""
        scale = short_side / min(height, width)
        p = self.token_stride
        return max(p, int(height * scale) // p * p), max(p, int(width * scale) // p * p)


def _backbone_source(backbone: str | Path) -> tuple[str, Path]:
    """(``checkpoint`` | ``export``, path) of a ``--backbone`` argument: a ``.pt`` checkpoint inside
    ``RUN/checkpoints``, or a backbone.json (its folder accepted)."""
    path = Path(backbone)
    if path.suffix == ".pt":
        if path.parent.name != CHECKPOINT_DIR:
            raise SoveError(f"--backbone {backbone}: a checkpoint must lie in a run's {CHECKPOINT_DIR}/ folder "
                            "(its config.yaml gives the architecture and preprocessing)")
        return "checkpoint", path
    return "export", path / BACKBONE_JSON if path.is_dir() else path


def results_dir(run_dir: str | Path | None, backbone: str | Path | None) -> Path:
    """Where results and feature caches go: ``RUN/eval``; without a run, ``eval/`` in the run of a
    checkpoint or beside backbone.json.

    Raises:
        SoveError: neither given.
    """
    if run_dir is not None:
        return Path(run_dir) / EVAL_DIR
    if backbone is None:
        raise SoveError("give --run RUN_DIR (its teacher backbone and data) or --backbone "
                        "backbone.json|RUN/checkpoints/FILE.pt")
    kind, path = _backbone_source(backbone)
    return (path.parent.parent if kind == "checkpoint" else path.parent) / EVAL_DIR


def result_path(protocol: str, run_dir: str | Path | None, backbone: str | Path | None,
                out: str | Path | None) -> Path:
    """Where a protocol writes its JSON: ``out`` if given, else ``<results_dir>/<protocol>.json``
    (:func:`results_dir`).

    Raises:
        SoveError: none of ``out``, ``run_dir``, ``backbone``; its folder is not writable (checked
            here, before any image is read).
    """
    if out is None and run_dir is None and backbone is None:
        raise SoveError(f"no place to write the {protocol} result: give --out RESULT.json")
    path = Path(out) if out is not None else results_dir(run_dir, backbone) / f"{protocol}.json"
    check_writable(path.parent, f"the {protocol} result")
    return path


def _wrap(timm_model: torch.nn.Module, global_pool: str) -> torch.nn.Module:
    """The sove wrapper (no mask token) of an exported timm ViT or Swin."""
    from sove.models import MaskedSwin, MaskedViT

    if hasattr(timm_model, "blocks"):
        return MaskedViT(timm_model, with_mask_token=False, global_pool=global_pool)
    return MaskedSwin(timm_model, with_mask_token=False)


def _from_run(run: Run, device: str) -> FrozenBackbone:
    """The teacher backbone of ``run.checkpoint`` and the run's preprocessing."""
    from sove.eval.provenance import weights_sha256

    module, d = run.backbone(device), run.config.data
    return FrozenBackbone(module, d.global_crop_size, module.token_stride, list(d.mean), list(d.std),
                          d.num_channels, device, module.patch_size, getattr(module, "global_pool", None),
                          run.config.model.arch, run.checkpoint, run.step, weights_sha256(module.state_dict()),
                          run.config, run.path / EVAL_DIR, run)


def _from_export(meta_path: Path, device: str) -> FrozenBackbone:
    """An exported backbone (``sove export``) and the preprocessing recorded in its backbone.json."""
    from sove.eval.provenance import weights_sha256
    from sove.export import load_backbone
    from sove.run import read_backbone_meta

    timm_model = load_backbone(meta_path)
    meta = read_backbone_meta(meta_path)
    module = _wrap(timm_model, meta.get("global_pool", "cls")).to(device).eval()
    k = meta["model_kwargs"]
    return FrozenBackbone(module, k["img_size"], module.token_stride, list(meta["mean"]), list(meta["std"]),
                          k["in_chans"], device, k["patch_size"], getattr(module, "global_pool", None),
                          meta["architecture"], meta_path.parent / meta["weights"], meta.get("step"),
                          weights_sha256(module.state_dict()), out_dir=meta_path.parent / EVAL_DIR, meta=meta)


def load_frozen(run_dir: str | Path | None = None, backbone: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = (), device: str = "cpu",
                results: str | None = None) -> FrozenBackbone:
    """Load the frozen backbone of an evaluation (the one loader of every protocol).

    * ``run_dir`` only: the teacher of ``RUN/checkpoints/last.pt`` and the run's ``config.yaml`` ⊕
      ``overrides``; results in ``RUN/eval``.
    * ``backbone`` = ``RUN/checkpoints/FILE.pt``: that checkpoint's teacher, its run's config.
    * ``backbone`` = a backbone.json of ``sove export`` (or its folder): the exported weights and
      preprocessing. The data config is ``run_dir``'s when given (results in ``RUN/eval``), else the
      package defaults ⊕ the export's crop size, patch size, channels, mean and std ⊕ ``overrides``
      (e.g. ``data.source=folder data.root=... data.test_root=...``; results in ``eval/`` beside the JSON).

    The teacher is read from the checkpoint's ``backbone.*`` keys only (strict on those): heads,
    whose shapes differ per method, are never loaded.

    Args:
        device: where the module is put (``cpu``, ``cuda``).
        results: what is written, e.g. ``"results and feature caches"``: when given, the results
            folder is checked writable first, before any weight is read.

    Raises:
        SoveError: neither given; not a run directory; missing or unreadable checkpoint, backbone.json
            or weights file; a backbone key mismatch; the results folder not writable.
    """
    from sove.config import load_config

    out_dir = results_dir(run_dir, backbone)
    if results is not None:
        check_writable(out_dir, results)
    data_run = Run(run_dir, overrides=overrides) if run_dir is not None else None
    if backbone is None:
        return _from_run(data_run, device)
    kind, path = _backbone_source(backbone)
    if kind == "checkpoint":
        loaded = _from_run(Run(path.parent.parent, path.name, overrides), device)
    else:
        loaded = _from_export(path, device)
    if data_run is not None:
        loaded.cfg, loaded.run = data_run.config, data_run
    elif loaded.cfg is None:
        b = loaded
        prep = [f"data.global_crop_size={b.image_size}", f"data.local_crop_size={b.image_size}",
                f"model.patch_size={b.patch_size}", f"data.num_channels={b.channels}",
                f"data.mean={b.mean}", f"data.std={b.std}"]
        loaded.cfg = load_config(None, prep + list(overrides))
    loaded.out_dir = out_dir
    return loaded
