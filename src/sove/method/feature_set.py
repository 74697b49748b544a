"""FIFO feature sets E_C and E_P of past teacher embeddings (SOVE paper, Sec. 3; docs/method.md, "Feature sets")."""

from __future__ import annotations

import torch
from torch import nn

from sove.distributed import all_gather_cat
from sove.seeding import generator


class FeatureSet(nn.Module):
    """Ring buffer of unit-norm teacher embeddings: the pool that anchors and judges are drawn from.

    SOVE keeps two of them: E_C (projected teacher [CLS] embeddings, paper Eq. 2) and E_P
    (projected teacher patch embeddings, paper Eq. 4). Rows are overwritten first-in first-out;
    the write pointer wraps around, and the buffer size need not be a multiple of the batch.
    Everything is a persistent buffer, so ``state_dict()`` carries it into checkpoints.

    Attributes:
        features: float32 tensor of shape (size, dim); rows are L2-normalised.
        ptr: int64 scalar tensor, the next row to write.
        indices: int64 tensor of shape (size,), the dataset index each row came from
            (-1 for the random initial rows or when the caller gives none).
        version: int, the change counter: +1 at every :meth:`enqueue` and every ``load_state_dict``
            (a per-process count, not saved; :meth:`sove.method.losses.SOVELoss.concepts` keys its
            cache on it).

    Example:
        >>> fs = FeatureSet(size=8, dim=4, seed=0)
        >>> fs.enqueue(torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
        >>> int(fs.ptr)
        3
    """

    features: torch.Tensor
    ptr: torch.Tensor
    indices: torch.Tensor

    def __init__(self, size: int, dim: int, seed: int = 0, key: int = 0) -> None:
        """Create a feature set filled with seeded random unit vectors (identical on all ranks).

        Args:
            size: number of rows N (E_C: 65536, E_P: 8192 at ImageNet scale).
            dim: embedding dimension d (the projection head's output size).
            seed: the run's seed; the rows come from its ``feature_set_init`` stream (:mod:`sove.seeding`).
            key: which set, the stream's key (SOVE: 0 for E_C, 1 for E_P).

        Raises:
            ValueError: if ``size`` or ``dim`` is not positive.
        """
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"feature set size ({size}) and dim ({dim}) must be positive")
        g = generator(seed, "feature_set_init", key)
        init = nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1)
        self.register_buffer("features", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.version = 0

    @property
    def size(self) -> int:
        """Number of rows N."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self.features.shape[1]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Write a batch of embeddings over the oldest rows, gathering all ranks first.

        Under DDP the batch of every rank is all-gathered in rank order, so every rank holds an
        identical buffer. Call it *after* the loss of the step (the current batch must never
        judge itself).

        Args:
            embeddings: tensor of shape (batch, dim), unit norm, any float dtype (stored as fp32).
            indices: optional int64 tensor of shape (batch,), the dataset index of each row.

        Raises:
            ValueError: if the shapes do not match the feature set.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"enqueue expects embeddings of shape (batch, {self.dim}), got {tuple(embeddings.shape)}"
            )
        if indices is None:
            indices = torch.full((embeddings.shape[0],), -1, dtype=torch.long, device=embeddings.device)
        if indices.shape != embeddings.shape[:1]:
            raise ValueError(f"indices shape {tuple(indices.shape)} does not match batch {embeddings.shape[0]}")
        emb = all_gather_cat(embeddings.detach().float().contiguous())
        idx = all_gather_cat(indices.to(embeddings.device, torch.long).contiguous())
        n = emb.shape[0]
        if n >= self.size:  # a batch larger than the buffer keeps its newest rows
            emb, idx, n = emb[-self.size :], idx[-self.size :], self.size
        rows = (int(self.ptr) + torch.arange(n, device=self.features.device)) % self.size
        self.features[rows] = emb.to(self.features.device)
        self.indices[rows] = idx.to(self.indices.device)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.version += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """``nn.Module`` hook of ``load_state_dict``: rows are copied in place, so count a change."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.version += 1

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
