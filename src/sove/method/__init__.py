"""Self-supervised methods on one trainer: SOVE (ours) and its peers DINO and iBOT.

:class:`~sove.method.base.Method` is what the trainer sees; :data:`METHODS` (:mod:`sove.method.registry`)
maps the config's ``method=`` to a class. The SOVE pieces (feature sets, concepts, losses) are pure
tensor code. :mod:`sove.method.settings` (the concept settings, read by the config) imports no torch;
the names below are imported on first use, so ``from sove.method.settings import ...`` stays torch-free.
"""

from importlib import import_module

_HOMES = {
    "Concepts": "concepts", "draw_anchors": "concepts",
    "nearest_judges": "concepts", "select_judges": "concepts", "FeatureSet": "feature_set",
    "SOVELoss": "losses", "cls_loss": "losses", "cross_view_pairs": "losses", "patch_loss": "losses",
    "ConceptSettings": "settings", "Method": "base", "StepContext": "base", "micro_views": "base",
    "SOVE": "sove", "DINO": "peers", "IBOT": "peers",
    "METHODS": "registry", "build_method": "registry", "checkpoint_method": "registry",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sove.method' has no attribute {name!r}")
    return getattr(import_module(f"sove.method.{_HOMES[name]}"), name)
