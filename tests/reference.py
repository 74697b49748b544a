"""Slow float64 reference of SOVE's concepts, concept probabilities and losses, for the tests.

Written from the paper and the docs, independently of ``sove.method``: SOVE paper Sec. 3, Eq. 2
(the [CLS] loss over cross-view pairs) and Eq. 4 (the masked-patch loss), with the details in
docs/method.md, "Concepts: anchors and judges" (judges = the anchor plus its nearest rows of the
feature set with every anchor removed; the anchor's weight is 1 - eps, a neighbour's its cosine with
the anchor (soft) or 1 - eps (onehot); each judge spreads 1 - w over the other K - 1 concepts) and
"Concept probabilities". Brute-force neighbour search, the dense (K*J, K) label matrix, explicit
loops over view pairs and images; everything in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

D = torch.float64


def unit(*shape: int, seed: int) -> torch.Tensor:
    """float32 random unit vectors (normalised over the last dim) of ``shape``, from ``seed``."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def judge_index(features: torch.Tensor, anchors: torch.Tensor, num_judges: int) -> torch.Tensor:
    """int64 (K, J): each anchor followed by its ``num_judges - 1`` most similar rows among the
    rows that are not anchors (ties: lower row first), by brute force in float64."""
    f, excluded = features.to(D), set(anchors.tolist())
    pool = [r for r in range(f.shape[0]) if r not in excluded]
    rows = []
    for a in anchors.tolist():
        sims = sorted(((float(f[a] @ f[r]), r) for r in pool), key=lambda t: (-t[0], t[1]))
        rows.append([a] + [r for _, r in sims[: num_judges - 1]])
    return torch.tensor(rows, dtype=torch.long).view(len(rows), num_judges)


def weights(features: torch.Tensor, index: torch.Tensor, smoothing: float, label_mode: str) -> torch.Tensor:
    """float64 (K, J) judge weights: anchor 1 - eps; a neighbour its cosine with the anchor (soft)
    or 1 - eps (onehot)."""
    f = features.to(D)
    w = torch.empty(index.shape, dtype=D)
    for c in range(index.shape[0]):
        for j in range(index.shape[1]):
            own = j == 0 or label_mode == "onehot"
            w[c, j] = 1.0 - smoothing if own else f[index[c, j]] @ f[index[c, 0]]
    return w


def label_matrix(w: torch.Tensor) -> torch.Tensor:
    """float64 (K*J, K) soft labels: judge r of concept c gives w_r to c and (1 - w_r) / (K - 1) to the others."""
    k, j = w.shape
    flat = w.to(D).reshape(-1)
    y = torch.empty(k * j, k, dtype=D)
    for r in range(k * j):
        y[r, :] = (1.0 - flat[r]) / (k - 1)
        y[r, r // j] = flat[r]
    return y


def probs(judges: torch.Tensor, w: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """float64 (n, K) concept probabilities P(u) = softmax(u D^T / tau) @ Y of ``u`` (n, d) or (d,).

    ``judges``: (K, J, d) judge embeddings D, ``w``: (K, J) their weights (Eq. 2 / Eq. 4).
    """
    k, j, d = judges.shape
    return torch.softmax(u.to(D).reshape(-1, d) @ judges.to(D).reshape(k * j, d).T / tau, dim=1) @ label_matrix(w)


def cls_loss(student: torch.Tensor, teacher: torch.Tensor, judges: torch.Tensor, w: torch.Tensor,
             tau_s: float, tau_t: float) -> float:
    """Eq. 2: mean over pairs (student view i, teacher view j), i != j, of the batch mean of
    -sum_c q_c log p_c; ``student`` (V, B, d), ``teacher`` (2, B, d)."""
    pairs = []
    for i in range(student.shape[0]):
        for j in range(teacher.shape[0]):
            if i != j:
                q, p = probs(judges, w, teacher[j], tau_t), probs(judges, w, student[i], tau_s)
                pairs.append(float(-(q * p.log()).sum(1).mean()))
    return sum(pairs) / len(pairs)


def patch_loss(student: torch.Tensor, teacher: torch.Tensor, owner: torch.Tensor, num_images: int,
               judges: torch.Tensor, w: torch.Tensor, tau_s: float, tau_t: float) -> float:
    """Eq. 4: per image the sum of its masked tokens' cross-entropies / max(1, count), then the mean
    over all ``num_images`` images; ``student`` / ``teacher`` (T, d), ``owner`` (T,) image of each token."""
    ce = -(probs(judges, w, teacher, tau_t) * probs(judges, w, student, tau_s).log()).sum(1)
    per_image = [float(ce[owner == m].sum()) / max(1, int((owner == m).sum())) for m in range(num_images)]
    return sum(per_image) / num_images
