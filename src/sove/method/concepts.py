"""Concepts made of an anchor and its judges, their soft labels and concept probabilities.

SOVE paper, Sec. 3 and Eq. 2 (CLS) / Eq. 4 (patches); the details it leaves open are in
docs/method.md, "Concepts: anchors and judges". A *concept* is an anchor row of a feature set
plus its ``num_judges - 1`` nearest neighbours (spherical k-NN over the feature set with all
anchors removed). Every judge ``j`` votes for its own concept with weight ``w_j`` and spreads
``1 - w_j`` uniformly over the other ``K - 1`` concepts. For a unit embedding ``u``::

    pi = softmax_j(<u, D_j> / tau)          over all K * J judges jointly
    P(u)_c = sum_{j in c} pi_j w_j + sum_{j not in c} pi_j (1 - w_j) / (K - 1)

computed in the structured form ``P(u)_c = sum_{j in c} pi_j (w_j - o_j) + sum_j pi_j o_j`` with
``o_j = (1 - w_j) / (K - 1)``; the dense (K*J, K) label matrix is never built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sove.method.settings import ConceptSettings, concept_problem

#: Probabilities are clamped to this value before the logarithm (only reached when soft
#: weights are negative, i.e. a judge is anti-aligned with its anchor).
MIN_PROB = 1e-12


def draw_anchors(
    num_rows: int, num_anchors: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Draw ``num_anchors`` distinct row indices of a feature set uniformly without replacement.

    Args:
        num_rows: feature-set size N.
        num_anchors: number of anchors K, 2 <= K <= N.
        generator: explicit CPU generator (the ``anchors`` stream of :mod:`sove.seeding`).
        device: device of the returned indices.

    Returns:
        int64 tensor of shape (K,).

    Raises:
        ValueError: if K is out of range (:func:`sove.method.settings.concept_problem`).
    """
    _raise_problem(ConceptSettings(num_anchors=num_anchors, num_judges=1), num_rows)
    return torch.randperm(num_rows, generator=generator)[:num_anchors].to(device)


@dataclass
class Concepts:
    """The judges of K concepts and their soft labels; ``probs`` gives P(u) (Eq. 2 / Eq. 4).

    Attributes:
        judges: float32 tensor of shape (concepts, judges_per_concept, dim); ``judges[:, 0]`` is
            the anchor of each concept.
        weights: float32 tensor of shape (concepts, judges_per_concept), the weight w_j of each
            judge for its own concept.
        judge_index: int64 tensor of shape (concepts, judges_per_concept), the feature-set row of
            each judge (``judge_index[:, 0]`` are the anchors).
    """

    judges: torch.Tensor
    weights: torch.Tensor
    judge_index: torch.Tensor

    @property
    def num_concepts(self) -> int:
        """Number of concepts K (after the keep fraction)."""
        return self.judges.shape[0]

    @property
    def num_judges(self) -> int:
        """Judges per concept, anchor included."""
        return self.judges.shape[1]

    def off_weights(self) -> torch.Tensor:
        """o_j = (1 - w_j) / (K - 1): the mass a judge gives each other concept, shape (K, J)."""
        return (1.0 - self.weights) / (self.num_concepts - 1)

    def probs(self, u: torch.Tensor, temperature: float) -> torch.Tensor:
        """Concept probabilities P_tau(u) in structured form (docs/method.md, "Concept probabilities"), in fp32.

        Args:
            u: tensor of shape (n, dim), unit-norm embeddings (any float dtype; cast to fp32,
                autocast disabled).
            temperature: softmax temperature tau > 0 (tau_t for teacher targets, tau_s for
                student predictions).

        Returns:
            float32 tensor of shape (n, concepts); each row sums to 1.
        """
        with torch.autocast(device_type=u.device.type, enabled=False):
            k, j, d = self.judges.shape
            return self._mix(u.float() @ self.judges.reshape(k * j, d).T, temperature)

    def probs_from_similarity(self, similarity: torch.Tensor, temperature: float) -> torch.Tensor:
        """P_tau(u) from precomputed similarities to every feature-set row (same value as :meth:`probs`).

        When the judges of all tasks outnumber the feature-set rows (num_tasks * K * J > N, e.g.
        the paper's 4 x 8192 x 9 judges over 65536 rows), ``u @ features.T`` computed once per step
        and gathered per task costs less than one ``u @ judges.T`` per task; the gradient flows
        through the gather into ``similarity``.

        Args:
            similarity: float tensor of shape (n, N), ``u @ features.T`` for the feature set whose
                rows ``judge_index`` points into (unit-norm u).
            temperature: softmax temperature tau > 0.

        Returns:
            float32 tensor of shape (n, concepts); each row sums to 1.
        """
        with torch.autocast(device_type=similarity.device.type, enabled=False):
            logits = similarity.float().index_select(1, self.judge_index.reshape(-1))  # (n, K*J)
            return self._mix(logits, temperature)

    def _mix(self, similarity: torch.Tensor, temperature: float) -> torch.Tensor:
        """Structured-form P from judge similarities (n, K*J), fp32: softmax over judges, then labels."""
        k, j = self.weights.shape
        pi = (similarity / temperature).softmax(dim=-1)
        off = self.off_weights()  # (K, J)
        own = (pi.view(-1, k, j) * (self.weights - off)).sum(-1)  # (n, K)
        return own + pi @ off.reshape(k * j, 1)

    def log_probs(self, u: torch.Tensor, temperature: float, similarity: torch.Tensor | None = None) -> torch.Tensor:
        """log P_tau(u), shape (n, concepts), float32; probabilities clamped at ``MIN_PROB``.

        With ``similarity`` (n, N) given, computed by :meth:`probs_from_similarity` (``u`` unused).
        """
        p = self.probs(u, temperature) if similarity is None else self.probs_from_similarity(similarity, temperature)
        return p.clamp_min(MIN_PROB).log()


def _raise_problem(settings: ConceptSettings, num_rows: int) -> None:
    """ValueError ``"<argument> (<value>) <what is wrong>"`` for the first out-of-range setting."""
    problem = concept_problem(settings, num_rows)
    if problem is not None:
        raise ValueError(" ".join(problem))


@torch.no_grad()
def nearest_judges(
    features: torch.Tensor, anchor_idx: torch.Tensor, num_neighbours: int, chunk_size: int = 1024,
    search_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Top-k cosine neighbours of each anchor over the feature set with every anchor removed.

    Chunked: peak extra memory O(chunk_size * N), never (K, N) (docs/method.md, "Concepts: anchors and judges").

    Args:
        features: float tensor of shape (N, dim), unit-norm rows.
        anchor_idx: int64 tensor of shape (K,), distinct rows of ``features``.
        num_neighbours: k >= 1.
        chunk_size: anchors searched per chunk.
        search_dtype: dtype of the similarity search (e.g. torch.bfloat16 on GPU); None = fp32.

    Returns:
        int64 tensor of shape (K, k): feature-set rows, most similar first; never an anchor.
    """
    search = features.to(search_dtype) if search_dtype is not None else features.float()
    is_anchor = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    is_anchor[anchor_idx] = True
    out = torch.empty(anchor_idx.shape[0], num_neighbours, dtype=torch.long, device=features.device)
    with torch.autocast(device_type=features.device.type, enabled=False):  # search_dtype decides, not autocast
        for start in range(0, anchor_idx.shape[0], chunk_size):
            rows = anchor_idx[start : start + chunk_size]
            sim = search[rows] @ search.T  # (chunk, N)
            sim.masked_fill_(is_anchor, float("-inf"))
            out[start : start + rows.shape[0]] = sim.topk(num_neighbours, dim=1).indices
    return out


@torch.no_grad()
def select_judges(
    features: torch.Tensor,
    anchor_idx: torch.Tensor,
    num_judges: int = 9,
    smoothing: float = 0.1,
    label_mode: str = "soft",
    keep_fraction: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    search_dtype: torch.dtype | None = None,
) -> Concepts:
    """Build concepts from explicit anchors: judges by spherical k-NN, then their soft labels.

    ``select_judges(features, anchor_idx, num_judges=9, smoothing=0.1, label_mode="soft",
    keep_fraction=1.0, generator=None, chunk_size=1024, search_dtype=None) -> Concepts``;
    then ``concepts.probs(u, temperature)`` gives P(u). Eq. 2 / Eq. 4; docs/method.md, "Concepts: anchors and judges":

    1. the pool is the feature set minus *all* K anchors (an anchor never judges itself or
       another concept); the ``num_judges - 1`` nearest neighbours by cosine are its judges;
    2. ``keep_fraction`` < 1 then keeps a random subset of the concepts (the authors' code keeps
       half; a discarded anchor never becomes a judge);
    3. weights: anchor ``1 - smoothing``; neighbour ``cos(judge, anchor)`` recomputed in fp32
       (``label_mode="soft"``, not clamped) or ``1 - smoothing`` (``"onehot"``, Tab. 9).

    A row that neighbours several anchors is a separate judge in each concept.

    Args:
        features: tensor of shape (N, dim), unit-norm rows (a ``FeatureSet.features`` buffer).
        anchor_idx: int64 tensor of shape (K,), distinct row indices (see :func:`draw_anchors`).
        num_judges: judges per concept including the anchor (k + 1); 1 skips the k-NN.
        smoothing: epsilon, the mass an anchor gives the other concepts.
        label_mode: "soft" or "onehot".
        keep_fraction: fraction of concepts kept after the k-NN, in (0, 1].
        generator: CPU generator for the keep-fraction draw (required when keep_fraction < 1).
        chunk_size: anchors per similarity chunk.
        search_dtype: dtype of the k-NN search only; weights are always fp32.

    Returns:
        :class:`Concepts` with K' = max(2, round(K * keep_fraction)) concepts.

    Raises:
        ValueError: on out-of-range arguments, with the offending value.
    """
    n_rows, num_anchors = features.shape[0], anchor_idx.shape[0]
    _raise_problem(ConceptSettings(num_anchors, num_judges, label_mode, smoothing, keep_fraction), n_rows)
    anchor_idx = anchor_idx.to(features.device, torch.long)
    if num_judges > 1:
        nbrs = nearest_judges(features, anchor_idx, num_judges - 1, chunk_size, search_dtype)
        judge_index = torch.cat([anchor_idx[:, None], nbrs], dim=1)  # (K, J)
    else:
        judge_index = anchor_idx[:, None]
    if keep_fraction < 1.0:
        if generator is None:
            raise ValueError("select_judges needs a generator when keep_fraction < 1")
        num_keep = max(2, round(num_anchors * keep_fraction))
        keep = torch.randperm(num_anchors, generator=generator)[:num_keep].sort().values
        judge_index = judge_index[keep.to(judge_index.device)]
    judges = features[judge_index].float()  # (K', J, dim)
    if label_mode == "soft":
        weights = (judges * judges[:, :1]).sum(-1)  # cos(judge, anchor) in fp32
        weights[:, 0] = 1.0 - smoothing
    else:
        weights = torch.full(judge_index.shape, 1.0 - smoothing, device=features.device)
    return Concepts(judges=judges, weights=weights, judge_index=judge_index)


def concept_purity(concepts: Concepts, row_labels: torch.Tensor) -> float | None:
    """Share of neighbour judges (anchor excluded) whose label equals their anchor's.

    Args:
        concepts: concepts with ``judge_index`` of shape (K, J), J >= 2.
        row_labels: int64 (N,), the label of each feature-set row (-1 = unknown: random initial
            row or unlabelled image).

    Returns:
        Purity in [0, 1] over concepts whose rows are all labelled; None when there is none.
    """
    if concepts.num_judges < 2:
        return None
    labels = row_labels[concepts.judge_index]  # (K, J)
    known = (labels >= 0).all(dim=1)
    if not bool(known.any()):
        return None
    same = labels[known, 1:] == labels[known, :1]
    return float(same.float().mean())


def judge_weight_stats(values: torch.Tensor) -> dict[str, float]:
    """Mean and 10th / 50th / 90th percentiles of judge weights (a diagnostic of how soft the labels are).

    Args:
        values: float tensor of any shape, e.g. ``concepts.weights[:, 1:]`` (K, J - 1): the weight
            w_j of every non-anchor judge for its own concept. Must not be empty.

    Returns:
        ``{"mean", "p10", "p50", "p90"}`` as Python floats; percentiles by linear interpolation
        (``torch.quantile``, numpy's default).
    """
    flat = values.detach().reshape(-1).float().cpu()
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": float(flat.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}
