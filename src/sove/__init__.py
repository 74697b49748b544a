"""sove: self-supervised pretraining of vision transformers with SOVE (Self-Organizing Visual Embeddings).

``sove.pretrain``, ``sove.resume`` and ``sove.Run`` (docs/python_api.md) are imported on first use, so
``import sove`` stays cheap (no torch).
"""

__version__ = "0.1.0"

__all__ = ["Run", "load_backbone", "pretrain", "resume"]


def load_backbone(path):
    """Load an exported backbone (``sove export``, :meth:`sove.Run.export`) as a timm model from its
    ``backbone.json`` or run directory (a :class:`sove.Run` too); see :func:`sove.export.load_backbone`."""
    from sove.export import load_backbone as _load

    return _load(path)


def __getattr__(name):
    if name in ("pretrain", "resume"):
        from sove import api

        return getattr(api, name)
    if name == "Run":
        from sove.run import Run

        return Run
    raise AttributeError(f"module 'sove' has no attribute {name!r}")
