"""sove: self-supervised pretraining of vision transformers with SOVE (Self-Organizing Visual Embeddings)."""

__version__ = "0.1.0"


def load_backbone(path):
    """Load an exported backbone (``sove export``) as a timm model; see :func:`sove.export.load_backbone`."""
    from sove.export import load_backbone as _load

    return _load(path)
