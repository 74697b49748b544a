"""The SOVE method: feature sets, concepts (anchors + judges), soft labels, the two losses.

Pure tensor code: imports only torch/numpy and ``sove.distributed``; :mod:`sove.method.settings` (the
concept settings, read by the config) imports neither. The names below are imported on first use, so
``from sove.method.settings import ...`` does not import torch.
"""

from importlib import import_module

_HOMES = {
    "Concepts": "concepts", "anchor_generator": "concepts", "draw_anchors": "concepts",
    "nearest_judges": "concepts", "select_judges": "concepts", "FeatureSet": "feature_set",
    "SOVELoss": "losses", "cls_loss": "losses", "cross_view_pairs": "losses", "patch_loss": "losses",
    "ConceptSettings": "settings",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sove.method' has no attribute {name!r}")
    return getattr(import_module(f"sove.method.{_HOMES[name]}"), name)
