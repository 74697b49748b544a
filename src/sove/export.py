"""Export a run's teacher backbone for timm, the Hugging Face Hub and ONNX.

``sove export RUN_DIR [--onnx]`` writes

* ``RUN_DIR/export/``: a Hugging Face-style timm model folder, ``config.json`` + ``model.safetensors``
  (timm's own ``save_for_hf``). Its ``pretrained_cfg`` carries the run's preprocessing (input size,
  mean, std, interpolation, ``crop_pct`` 1.0: resize the short side to the crop size, centre crop,
  as ``sove eval`` does) and ``num_classes`` 0, and its global pool is the run's image
  representation, so with timm alone::

      model = timm.create_model("local-dir:runs/x/export", pretrained=True).eval()
      cfg = timm.data.resolve_data_config({}, model=model)   # the run's size, mean, std
      transform = timm.data.create_transform(**cfg)
      features = model(transform(image).unsqueeze(0))         # the feature sove evaluates

  Publishing is the user's own Hub call, e.g. ``huggingface_hub.upload_folder(repo_id="me/sove-vit",
  folder_path="runs/x/export")``; the model then loads as ``timm.create_model("hf-hub:me/sove-vit",
  pretrained=True)``.
* ``RUN_DIR/export/model.onnx`` with ``--onnx``: ``images`` (batch, channels, height, width) ->
  ``features`` (batch, embed_dim), opset :data:`ONNX_OPSET`, batch dynamic, and height and width
  too for a ViT (any multiple of the patch size); a Swin keeps the crop size.
* ``RUN_DIR/backbone.json``: sove's record of the export (architecture, timm arguments, global pool,
  mean/std, step, source checkpoint), read by ``--backbone`` and :func:`load_backbone`.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig

from sove import __version__
from sove.errors import DiskFullError, SoveError, disk_full
from sove.preflight import check_writable
from sove.run import BACKBONE_JSON, EXPORT_DIR, Run, read_backbone_meta

#: ONNX opset of ``sove export --onnx`` (torch.onnx's dynamo exporter with onnxscript).
ONNX_OPSET = 18

#: How the image representation is read off the model (written into backbone.json). Exports with
#: ``timm_dir`` (this version) give it as ``model(x)``: timm's global pool is set to match.
FEATURES = {
    ("MaskedViT", "cls"): "CLS token after the final norm: model(x) = model.forward_features(x)[:, 0]",
    ("MaskedViT", "mean_patch"): "mean patch token after the final norm: model(x) = "
                                 "model.forward_features(x)[:, model.num_prefix_tokens:].mean(1)",
    ("MaskedSwin", "mean_patch"): "mean final-stage token after the final norm: model(x) = "
                                  "model.forward_features(x).mean((1, 2))",
}


def export_backbone(run_dir: str | Path, checkpoint: str = "last.pt", onnx: bool = False) -> dict[str, Any]:
    """Write the teacher backbone of ``run_dir/checkpoints/<checkpoint>`` for timm (and ONNX).

    Returns:
        dict with ``folder`` (``RUN/export``), ``meta`` (``RUN/backbone.json``) and, with ``onnx``,
        ``onnx`` (the ``.onnx`` path) and ``onnx_max_abs_diff`` (float: onnxruntime against PyTorch
        on two random images, None when onnxruntime is not installed).

    Raises:
        SoveError: not a run directory, missing checkpoint, key mismatch, run directory not
            writable, ONNX packages missing (with ``onnx``); DiskFullError: no space for a file (each
            file is written atomically: an earlier export stays intact).
    """
    from sove.models import timm_name
    from sove.train.checkpoint import atomic_write

    run = Run(run_dir, checkpoint)
    run_dir, cfg = run.path, run.config
    check_writable(run_dir, "the exported backbone")
    if onnx:
        _require_onnx_exporter()
    backbone = run.backbone()
    model = export_model(backbone, timm_name(cfg.model.arch))
    sove_meta = {"global_pool": backbone.global_pool, "features": FEATURES[(type(backbone).__name__,
                                                                           backbone.global_pool)],
                 "step": run.step, "source": str(run.checkpoint), "version": __version__}
    folder = run.export_dir
    for stale in ("model.onnx", "model.onnx.data"):  # an earlier --onnx export holds older weights
        (folder / stale).unlink(missing_ok=True)
    _save_hf_atomically(model, folder, data_config(cfg), {"pretrained_cfg": {"tag": "sove", "license": None},
                                                          "sove": sove_meta})
    meta = {"architecture": timm_name(cfg.model.arch), "model_kwargs": backbone.timm_kwargs(),
            "mean": list(cfg.data.mean), "std": list(cfg.data.std), "timm_dir": EXPORT_DIR,
            "weights": f"{EXPORT_DIR}/model.safetensors", **sove_meta}
    meta_path = run_dir / BACKBONE_JSON
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    out: dict[str, Any] = {"folder": folder, "meta": meta_path}
    if onnx:
        out["onnx"] = folder / "model.onnx"
        out["onnx_max_abs_diff"] = export_onnx(model, out["onnx"], dynamic_size=hasattr(model, "blocks"))
    return out


def _save_hf_atomically(model: torch.nn.Module, folder: Path, data_cfg: dict[str, Any],
                        model_config: dict[str, Any]) -> None:
    """timm's ``save_for_hf`` (``config.json`` + ``model.safetensors``) into a temporary folder beside
    ``folder``, then each file moved into ``folder`` with :func:`~sove.train.checkpoint.atomic_write`.

    Raises:
        DiskFullError: no space left; ``folder``'s earlier files are intact, no temporary remains.
    """
    import shutil

    from safetensors import SafetensorError
    from timm.models import save_for_hf

    from sove.train.checkpoint import atomic_write

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        try:
            save_for_hf(model, str(tmp), safe_serialization=True, data_config=data_cfg, model_config=model_config)
        except SafetensorError as e:  # the Rust writer reports ENOSPC as text
            if "No space left" not in str(e):
                raise
            raise OSError(errno.ENOSPC, str(e), str(folder / "model.safetensors")) from e
        for name in ("model.safetensors", "config.json"):
            data = (tmp / name).read_bytes()
            atomic_write(folder / name, lambda f, data=data: f.write(data))
    except OSError as e:
        if disk_full(e) is None:
            raise
        free = shutil.disk_usage(folder.parent).free / 2**20
        raise DiskFullError(f"no space left on device while exporting to '{folder}' ({free:.1f} MiB free there); "
                            "an earlier export there is intact; free some space, then run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_config(cfg: DictConfig) -> dict[str, Any]:
    """timm data config of the run's evaluation view (:class:`sove.eval.features.EvalImages`): the
    short side resized (bilinear, antialiased) to ``data.global_crop_size``, a centre crop of that
    size, ``data.mean`` / ``data.std``."""
    d = cfg.data
    return {"input_size": (d.num_channels, d.global_crop_size, d.global_crop_size), "mean": tuple(d.mean),
            "std": tuple(d.std), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def export_model(backbone: torch.nn.Module, architecture: str) -> torch.nn.Module:
    """A fresh timm model of ``backbone`` holding its weights (strict), whose ``model(x)`` is the
    representation sove evaluates: global pool ``token`` for [CLS]; ``avg`` over the normed patch
    tokens (``fc_norm=False``) for ``mean_patch`` (a Swin's ``avg`` is its mean final-stage token)."""
    from sove.train.checkpoint import load_state_strict

    kwargs = backbone.timm_kwargs()
    if hasattr(backbone.timm_model, "blocks"):  # ViT
        pool = {"global_pool": "token"} if backbone.global_pool == "cls" else {"global_pool": "avg", "fc_norm": False}
        kwargs.update(pool)
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    load_state_strict(model, backbone.timm_model.state_dict(), "exported backbone")
    return model.eval()


def _require_onnx_exporter() -> None:
    import importlib.util

    missing = [p for p in ("onnx", "onnxscript") if importlib.util.find_spec(p) is None]
    if missing:
        raise SoveError(f"--onnx needs the {' and '.join(missing)} package(s); pip install 'sove[onnx]'")


def export_onnx(model: torch.nn.Module, path: str | Path, dynamic_size: bool = True) -> float | None:
    """Write ``model`` (``images`` -> ``features``) as ONNX (opset :data:`ONNX_OPSET`) and check it.

    Args:
        model: a model from :func:`export_model` (eval mode).
        path: the ``.onnx`` file; weights are stored inside it (external data beyond 1.5 GiB).
        dynamic_size: also dynamic height and width (a ViT: multiples of the patch size; its
            position embeddings are resampled inside the graph as in PyTorch).

    Returns:
        Max absolute difference of onnxruntime's features from PyTorch's on two random images of
        the model's input size (float32), or None when onnxruntime is not installed.
    """
    import importlib.util

    channels, height, width = timm.data.resolve_data_config({}, model=model)["input_size"]
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["features"],
                      opset_version=ONNX_OPSET, dynamo=True, dynamic_shapes={"x": dims},
                      external_data=size > 1.5 * 2**30, verbose=False)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    return onnx_max_abs_diff(model, path, x)


def onnx_max_abs_diff(model: torch.nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Max absolute difference of the ONNX file's outputs (onnxruntime, CPU) from ``model(images)``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).numpy()
    return float(abs(got - expected).max())


def global_features(model: torch.nn.Module, meta: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """The image representation ``sove eval`` uses, from a model made by :func:`load_backbone`.

    Args:
        model: the timm model of an exported backbone.
        meta: its ``backbone.json`` (``global_pool``: ``cls`` or ``mean_patch``; files written before
            that key existed are ``cls``).
        images: float tensor of shape (batch, channels, height, width), normalised.

    Returns:
        Tensor of shape (batch, embed_dim): [CLS], or the mean patch token (``mean_patch``; for a
        Swin, whose ``forward_features`` is (batch, rows, cols, embed_dim), the mean final-stage
        token). For exports with ``timm_dir`` this equals ``model(images)``.
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
        path: the JSON written by :func:`export_backbone` (or its run directory). Its ``timm_dir``
            folder is loaded as ``timm.create_model("local-dir:...")``; exports written before that
            folder existed (``backbone.safetensors`` beside the JSON) from their weights file.

    Returns:
        A timm ``VisionTransformer`` or ``SwinTransformer`` in eval mode; :func:`global_features`
        gives the feature used by ``sove eval``.

    Raises:
        SoveError: the JSON or the weights file is missing, or the JSON is not a backbone.json.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE_JSON
    if not path.is_file():
        raise SoveError(f"'{path}' not found; run `sove export RUN_DIR` first")
    meta = read_backbone_meta(path)
    weights = path.parent / meta["weights"]
    if not weights.is_file():
        raise SoveError(f"weights file '{weights}' named in '{path}' not found")
    if "timm_dir" in meta:
        return timm.create_model(f"local-dir:{(path.parent / meta['timm_dir']).resolve()}", pretrained=True).eval()
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=0), **meta["model_kwargs"])
    return model.eval()
