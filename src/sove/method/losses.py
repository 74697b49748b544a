"""SOVE's two losses: non-parametric [CLS] cluster assignment (Eq. 2) and non-parametric MIM (Eq. 4).

Teacher targets are P_{tau_t}(teacher embedding), student predictions P_{tau_s}(student
embedding), both from the same concepts; no centering, sharpening or Sinkhorn (docs/method.md, "Concept probabilities").
Everything here runs in fp32 with autocast disabled.
"""

from __future__ import annotations

import contextlib
from dataclasses import astuple
from typing import Callable, ContextManager

import torch
from torch import nn

from sove.method.concepts import Concepts, draw_anchors, select_judges
from sove.method.feature_set import FeatureSet
from sove.method.settings import ConceptSettings
from sove.seeding import generator


def cross_view_pairs(num_student_views: int, num_teacher_views: int) -> list[tuple[int, int]]:
    """All (student view i, teacher view j) pairs with i != j (Eq. 2).

    Student views are ordered [global 1, global 2, local 1, ...]; teacher views are the
    ``num_teacher_views`` globals, so a student global is never paired with its own view.
    With 2 globals and V_l locals there are 2 (2 + V_l) - 2 pairs.
    """
    return [(i, j) for i in range(num_student_views) for j in range(num_teacher_views) if i != j]


def cls_loss(
    student_cls: torch.Tensor, teacher_cls: torch.Tensor, concepts: Concepts,
    student_temp: float, teacher_temp: float, student_similarity: torch.Tensor | None = None,
    teacher_similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_CLS (Eq. 2): cross-entropy H(P_t(teacher view j), P_s(student view i)) over pairs i != j.

    Args:
        student_cls: shape (student_views, batch, dim), unit-norm projected student [CLS]
            embeddings; views ordered [masked global 1, masked global 2, locals...].
        teacher_cls: shape (teacher_views, batch, dim), unit-norm projected teacher [CLS] of the
            clean global views (no gradient flows into it).
        concepts: CLS concepts of this task.
        student_temp: tau_s.
        teacher_temp: tau_t.
        student_similarity / teacher_similarity: optional (views * batch, N) similarities of the
            flattened embeddings to every feature-set row (see :meth:`Concepts.probs_from_similarity`);
            the same value, computed once per step for all tasks.

    Returns:
        fp32 scalar: mean over the batch and over the 2 V - 2 view pairs, equal weight.
    """
    vs, b, d = student_cls.shape
    vt = teacher_cls.shape[0]
    with torch.no_grad():
        q = (concepts.probs(teacher_cls.reshape(vt * b, d), teacher_temp) if teacher_similarity is None
             else concepts.probs_from_similarity(teacher_similarity, teacher_temp)).view(vt, b, -1)
    log_p = concepts.log_probs(student_cls.reshape(vs * b, d), student_temp, student_similarity).view(vs, b, -1)
    pairs = cross_view_pairs(vs, vt)
    # Sum over pairs without a Python loop: every student view meets every teacher view,
    # minus the i == j terms of the student globals.
    total = -(q.sum(0, keepdim=True) * log_p).sum()
    shared = min(vs, vt)
    total = total + (q[:shared] * log_p[:shared]).sum()
    return total / (b * len(pairs))


def patch_loss(
    student_patches: torch.Tensor, teacher_patches: torch.Tensor, owner: torch.Tensor,
    num_images: int, concepts: Concepts, student_temp: float, teacher_temp: float,
    student_similarity: torch.Tensor | None = None, teacher_similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_patch (Eq. 4): per masked token H(P_t(teacher patch), P_s(student patch)).

    Per image (one global view of one sample) the token losses are summed and divided by
    max(1, number of masked tokens); the result is averaged over all ``num_images`` images,
    which equals the batch mean averaged over the 2 global views (images with no masked
    token count as 0).

    Args:
        student_patches: shape (masked_tokens, dim), unit-norm projected student patch
            embeddings at the masked positions of the masked global views.
        teacher_patches: shape (masked_tokens, dim), the teacher's clean embeddings at the same
            positions (no gradient).
        owner: int64 shape (masked_tokens,), image index in [0, num_images) of each token
            (``view * batch + sample``).
        num_images: number of images (2 * batch).
        concepts: patch concepts of this task.
        student_temp: tau_s.
        teacher_temp: tau_t.
        student_similarity / teacher_similarity: optional (masked_tokens, N) similarities to every
            feature-set row (see :meth:`Concepts.probs_from_similarity`).

    Returns:
        fp32 scalar (0 when no token is masked, still attached to the graph).
    """
    if student_patches.shape[0] == 0:
        return student_patches.float().sum() * 0.0
    with torch.no_grad():
        q = (concepts.probs(teacher_patches, teacher_temp) if teacher_similarity is None
             else concepts.probs_from_similarity(teacher_similarity, teacher_temp))
    log_p = concepts.log_probs(student_patches, student_temp, student_similarity)
    token_ce = -(q * log_p).sum(-1)  # (masked_tokens,)
    per_image = torch.zeros(num_images, device=token_ce.device).index_add_(0, owner, token_ce)
    counts = torch.bincount(owner, minlength=num_images).clamp_min(1)
    return (per_image / counts).mean()


def no_phase(name: str) -> ContextManager:
    """The default :attr:`SOVELoss.phase`: times nothing."""
    return contextlib.nullcontext()


class SOVELoss(nn.Module):
    """SOVE objective L = lambda1 L_CLS (Eq. 2) + lambda2 L_patch (Eq. 4), averaged over tasks.

    For each task a fresh set of anchors is drawn from the ``anchors`` stream of the seed at keys
    (step, task, loss) (:mod:`sove.seeding`), so every rank picks the same concepts. Returns named terms so the
    trainer can log them and name the culprit of a non-finite loss.

    Example:
        >>> loss_fn = SOVELoss(ConceptSettings(num_anchors=16, num_judges=3, num_tasks=2),
        ...                    ConceptSettings(num_anchors=8, num_judges=1, num_tasks=1))
    """

    def __init__(
        self, cls: ConceptSettings, patch: ConceptSettings, cls_weight: float = 1.0,
        patch_weight: float = 1.0, student_temp: float = 0.1, seed: int = 0, chunk_size: int = 1024,
        search_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cls, self.patch = cls, patch
        self.cls_weight, self.patch_weight = cls_weight, patch_weight
        self.student_temp, self.seed = student_temp, seed
        self.chunk_size, self.search_dtype = chunk_size, search_dtype
        self._anchors: dict[tuple[int, int], torch.Tensor] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, Concepts]] = {}
        #: ``phase(name)`` -> context manager timing the judge search (``"concept selection"``, nested
        #: in the trainer's ``objective`` phase); set per step by the method, a no-op by default.
        self.phase: Callable[[str], ContextManager] = no_phase

    def last_anchors(self) -> torch.Tensor:
        """Anchor indices drawn at the last step, all tasks concatenated (int64, for diagnostics)."""
        return torch.cat([self._anchors[k] for k in sorted(self._anchors)]) if self._anchors else torch.zeros(0)

    def concepts(self, settings: ConceptSettings, features: FeatureSet | torch.Tensor, step: int, task: int,
                 stream: int) -> Concepts:
        """The concepts of one task at one step (deterministic in seed, step, task, stream).

        ``features`` is a :class:`FeatureSet` (its ``features`` rows, cached by its change counter
        ``version``) or a bare (N, d) tensor (never cached); ``stream`` is 0 for the CLS loss, 1 for
        the patch loss (the last key of the ``anchors`` stream). Cached while the feature set is
        unchanged (same ``version``, same rows' memory, shape and strides; every concept setting), so
        the micro-batches of gradient accumulation share one judge search per task. The cache holds
        the tensor, so its memory cannot be reused by another one while cached.
        """
        version = features.version if isinstance(features, FeatureSet) else None
        features = features.features if isinstance(features, FeatureSet) else features
        key = (step, task, stream, astuple(settings), features.data_ptr(), tuple(features.shape), features.stride(),
               features.device, version)
        if version is not None and key in self._cache:
            return self._cache[key][1]
        if any(k[0] != step for k in self._cache):
            self._cache.clear()
        g = generator(self.seed, "anchors", step, task, stream)
        anchors = draw_anchors(features.shape[0], settings.num_anchors, g, features.device)
        self._anchors[(stream, task)] = anchors
        concepts = select_judges(
            features, anchors, num_judges=settings.num_judges, smoothing=settings.smoothing,
            label_mode=settings.label_mode, keep_fraction=settings.anchor_keep_fraction,
            generator=g, chunk_size=self.chunk_size, search_dtype=self.search_dtype,
        )
        if version is not None:
            self._cache[key] = (features, concepts)
        return concepts

    def temperatures(self, name: str, teacher_temp: float) -> tuple[float, float]:
        """(tau_s, tau_t) the ``name`` loss (``"cls"`` or ``"patch"``) uses: its own ``student_temp`` /
        ``teacher_temp`` when set, else the shared student temperature and ``teacher_temp`` (the
        step's scheduled value)."""
        settings = self.cls if name == "cls" else self.patch
        return settings.student_temp or self.student_temp, settings.teacher_temp or teacher_temp

    @staticmethod
    def similarities(settings: ConceptSettings, features: torch.Tensor, student: torch.Tensor,
                     teacher: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(student, teacher) similarities to every feature-set row, shapes (n_s, N) / (n_t, N), when
        the judges of all tasks outnumber the rows (num_tasks * K * J > N): then one product per
        step, gathered per task, is cheaper than one per task. Otherwise (None, None)."""
        if settings.num_tasks * settings.num_anchors * settings.num_judges <= features.shape[0]:
            return None, None
        with torch.autocast(device_type=features.device.type, enabled=False):
            rows = features.float().T  # (dim, N)
            s = student.reshape(-1, student.shape[-1]).float() @ rows
            with torch.no_grad():
                t = teacher.reshape(-1, teacher.shape[-1]).float() @ rows
        return s, t

    def forward(
        self, *, student_cls: torch.Tensor, teacher_cls: torch.Tensor,
        student_patches: torch.Tensor, teacher_patches: torch.Tensor, patch_owner: torch.Tensor,
        num_images: int, cls_feature_set: FeatureSet | None, patch_feature_set: FeatureSet | None,
        step: int, teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss of one step.

        Args:
            student_cls: (student_views, batch, dim) projected unit-norm student [CLS].
            teacher_cls: (2, batch, dim) projected unit-norm teacher [CLS] of the clean globals.
            student_patches / teacher_patches: (masked_tokens, dim), see :func:`patch_loss`.
            patch_owner: (masked_tokens,) image index ``view * batch + sample``.
            num_images: 2 * batch.
            cls_feature_set / patch_feature_set: E_C / E_P (None when that loss weight is 0).
            step: optimizer step, seeds the anchor draws.
            teacher_temp: tau_t of this step (scheduled).

        Returns:
            dict with fp32 scalars "loss" (weighted total), "cls" and "patch" (unweighted; absent
            when the weight is 0).
        """
        out: dict[str, torch.Tensor] = {}
        total = student_cls.new_zeros((), dtype=torch.float32)
        for name, settings, weight, fs, stream in (
            ("cls", self.cls, self.cls_weight, cls_feature_set, 0),
            ("patch", self.patch, self.patch_weight, patch_feature_set, 1),
        ):
            if weight == 0:
                continue
            if fs is None:
                raise ValueError(f"the {name} loss has weight {weight} but no feature set was passed")
            tau_s, tau_t = self.temperatures(name, teacher_temp)
            student, teacher = (student_cls, teacher_cls) if name == "cls" else (student_patches, teacher_patches)
            sims = self.similarities(settings, fs.features, student, teacher)
            terms = []
            for task in range(settings.num_tasks):
                with self.phase("concept selection"):
                    concepts = self.concepts(settings, fs, step, task, stream)
                if name == "cls":
                    terms.append(cls_loss(student_cls, teacher_cls, concepts, tau_s, tau_t, *sims))
                else:
                    terms.append(patch_loss(student_patches, teacher_patches, patch_owner,
                                            num_images, concepts, tau_s, tau_t, *sims))
            out[name] = torch.stack(terms).mean()
            total = total + weight * out[name]
        out["loss"] = total
        return out
