"""Backbone weights to start from (``model.init``), as a timm state dict.

Sources:

* ``timm:NAME``: ``timm.create_model(NAME, pretrained=True, num_classes=0)``, i.e. the weights in
  the user's Hugging Face cache (timm downloads them there when online; sove itself downloads
  nothing); e.g. ``timm:vit_small_patch16_224.augreg_in21k``.
* a sove export: ``RUN/export`` (or any timm / Hugging Face folder with ``model.safetensors``),
  or its ``backbone.json``;
* a sove run directory (its ``checkpoints/last.pt``) or checkpoint: the teacher's backbone;
* a timm, DINO or other ViT checkpoint: ``.safetensors`` or a ``torch.save`` file holding a state
  dict, optionally under ``teacher`` (DINO / sove: the teacher is taken), ``state_dict``, ``model``
  or ``module``.

Key prefixes of wrappers and heads' owners (``module.``, ``_orig_mod.``, ``_forward_module.``,
``backbone.``, ``vit.``, ``swin.``: :data:`sove.state_keys.BACKBONE_PREFIXES`) are stripped; projection
heads, classifiers (``head.*``) and mask tokens are left out (listed in :class:`BackboneWeights`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sove.errors import SoveError
from sove.state_keys import BACKBONE_PREFIXES, strip_key_prefixes

#: Nested state dicts looked for in a checkpoint, in this order (DINO and sove: the teacher).
NESTED = ("teacher", "state_dict", "model", "module")


@dataclass
class BackboneWeights:
    """A backbone state dict with timm's key names and where it came from.

    Attributes:
        state: parameter and buffer tensors, timm keys (``cls_token``, ``blocks.0.attn.qkv.weight``, ...).
        origin: the file (or ``timm:NAME``) read, for messages.
        left_out: keys of the source that are not backbone weights (heads, classifiers, mask tokens).
        mean, std: the normalisation the weights were trained with, when the source records it
            (timm's ``pretrained_cfg``); None otherwise.
    """

    state: dict[str, torch.Tensor]
    origin: str
    left_out: list[str] = field(default_factory=list)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def backbone_weights(source: str) -> BackboneWeights:
    """Read the weights ``model.init`` names (see the module docstring).

    Raises:
        SoveError: unknown timm model or weights timm cannot find offline; a missing path; a folder
            without weights; an unreadable file; no tensors in it.
    """
    if source.startswith("timm:"):
        return _timm_weights(source[len("timm:"):])
    path = _weights_file(Path(source).expanduser())
    stats: dict[str, Any] = {}
    config = path.parent / "config.json"
    if path.name == "model.safetensors" and config.is_file():  # a timm / Hugging Face folder
        cfg = json.loads(config.read_text()).get("pretrained_cfg", {})
        stats = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = _torch_load(path)
    return _backbone_state(state, str(path), **stats)


def _weights_file(path: Path) -> Path:
    """The weights file of a folder (timm / Hugging Face folder, sove run) or a ``backbone.json``."""
    if not path.exists():
        raise SoveError(f"model.init: '{path}' not found; give timm:NAME, a sove export (RUN/export or "
                        "backbone.json), a sove run or checkpoint, or a timm/DINO checkpoint file")
    if path.is_dir():
        for inside in ("model.safetensors", "backbone.json", "checkpoints/last.pt"):
            if (path / inside).is_file():
                return _weights_file(path / inside)
        raise SoveError(f"model.init: '{path}' holds no model.safetensors, backbone.json or checkpoints/last.pt")
    if path.suffix == ".json":
        from sove.run import read_backbone_meta

        meta = read_backbone_meta(path)
        return _weights_file(path.parent / meta["weights"])
    return path


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (DINO's full checkpoints also hold an argparse Namespace)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise SoveError(f"model.init: '{path}' could not be loaded as a checkpoint: {str(e).splitlines()[0]}") from None


def _timm_weights(name: str) -> BackboneWeights:
    import timm

    if not timm.is_model(name):
        raise SoveError(f"model.init=timm:{name}: timm has no model named {name!r}")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as e:
        raise SoveError(f"model.init=timm:{name}: timm could not load its pretrained weights "
                        f"({str(e).splitlines()[0]}); sove downloads nothing: put them in the Hugging Face cache "
                        f"(timm.create_model('{name}', pretrained=True) once, online) or give a weights file: "
                        "model.init=PATH") from None
    cfg = model.pretrained_cfg
    return _backbone_state(model.state_dict(), f"timm:{name}", mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _backbone_state(obj: Any, origin: str, **stats: Any) -> BackboneWeights:
    """The backbone tensors of a loaded checkpoint: nested dict chosen, prefixes stripped, heads left out."""
    for key in NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise SoveError(f"model.init: '{origin}' holds no state dict (tensors by parameter name)")
    state, left_out = {}, []
    for key, value in tensors.items():
        short = strip_key_prefixes(key, BACKBONE_PREFIXES)
        if short.startswith("head.") or short in ("mask_token", "masked_embed"):
            left_out.append(key)
        else:
            state[short] = value
    return BackboneWeights(state, origin, left_out, **stats)

