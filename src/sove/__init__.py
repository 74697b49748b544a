"""sove: self-supervised pretraining of vision transformers with SOVE (Self-Organizing Visual Embeddings)."""

__version__ = "0.1.0"
