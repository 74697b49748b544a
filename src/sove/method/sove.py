"""SOVE as a :class:`~sove.method.base.Method`: the projection head, E_C / E_P and the loss of Eq. 2 + Eq. 4.

One step (docs/method.md, "Order of a step")::

    teacher(clean globals)            -> t_cls (2, B, d), projected patches
    student(masked globals + locals)  -> s_cls (V, B, d), projected masked patches
    loss = l1 * L_CLS(Eq. 2) + l2 * L_patch(Eq. 4)      (concepts from E_C / E_P, no grad)
    after the optimizer step: enqueue E_C, E_P (all-gathered)
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sove.method.base import Method, StepContext, micro_views
from sove.method.concepts import concept_purity, judge_weight_stats
from sove.method.feature_set import FeatureSet
from sove.method.losses import SOVELoss, no_phase
from sove.models.head import ProjectionHead
from sove.seeding import generator


def resolve_search_dtype(cfg: DictConfig) -> torch.dtype:
    """``loss.search_dtype`` as a torch dtype; ``auto`` = bfloat16 when training on CUDA, float32
    elsewhere (docs/method.md, "Precision, memory and reproducibility")."""
    name = cfg.loss.search_dtype
    if name == "auto":
        cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
        name = "bfloat16" if cuda else "float32"
    return getattr(torch, name)


def build_sove_loss(cfg: DictConfig) -> SOVELoss:
    """:class:`SOVELoss` from ``cfg.loss`` (anchors seeded by ``trainer.seed``); ``loss.cls`` /
    ``loss.patch`` are :class:`~sove.method.settings.ConceptSettings` nodes of the schema."""
    lo = cfg.loss
    return SOVELoss(OmegaConf.to_object(lo.cls), OmegaConf.to_object(lo.patch), lo.cls_weight, lo.patch_weight,
                    lo.student_temp, cfg.trainer.seed, lo.chunk_size, resolve_search_dtype(cfg))


def feature_set_state(state: dict[str, Any], name: str) -> dict[str, torch.Tensor] | None:
    """The ``features`` / ``ptr`` / ``indices`` of E_C (``name="cls"``) or E_P (``"patch"``) in a
    checkpoint of a SOVE run (this format or the one before methods), or None when it has none."""
    legacy = state.get(f"{name}_feature_set")
    if legacy is not None or "method" not in state:
        return legacy
    prefix = f"{name}_fs."
    rows = {k[len(prefix):]: v for k, v in state["method"]["state"].items() if k.startswith(prefix)}
    return rows or None


class SOVE(Method):
    """SOVE (paper Sec. 3): concepts of anchors + judges from the feature sets E_C / E_P.

    Submodules: ``cls_fs`` / ``patch_fs`` (:class:`FeatureSet`, None when that loss weight is 0)
    and ``loss_fn`` (:class:`SOVELoss`). After each optimizer step E_C receives the teacher's
    view-2 [CLS] embeddings and E_P one view-2 patch embedding per image (position drawn from the
    ``patch_positions`` stream (:mod:`sove.seeding`) for the whole global batch), both from the
    step's own teacher forward.
    """

    name = "sove"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        lo, dim, seed = cfg.loss, cfg.model.head_out_dim, cfg.trainer.seed
        self.cls_fs = FeatureSet(lo.cls_feature_set_size, dim, seed, key=0) if lo.cls_weight > 0 else None
        self.patch_fs = FeatureSet(lo.patch_feature_set_size, dim, seed, key=1) if lo.patch_weight > 0 else None
        self.loss_fn = build_sove_loss(cfg)
        self.step = 0
        self.positions: torch.Tensor | None = None
        self.pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.stats: dict[str, torch.Tensor] = {}

    def make_head(self, embed_dim: int) -> nn.Module:
        """:class:`ProjectionHead` D -> ``model.head_hidden_dim`` -> ``model.head_out_dim`` (unit norm)."""
        m = self.cfg.model
        return ProjectionHead(embed_dim, m.head_hidden_dim, m.head_out_dim)

    def begin_step(self, ctx: StepContext, batch: dict[str, Any]) -> None:
        """E_P positions: one view-2 patch per image, drawn for the whole global batch from the
        ``patch_positions`` stream at key ``step`` and sliced for this rank (= a single process's choice)."""
        b, num_patches = batch["index"].shape[0], batch["masks"].shape[-1]
        g = generator(self.cfg.trainer.seed, "patch_positions", ctx.step)
        drawn = torch.randint(num_patches, (ctx.world_size * b,), generator=g)
        self.positions = drawn[ctx.rank * b:(ctx.rank + 1) * b]
        self.step, self.pending, self.stats = ctx.step, ([], []), {}

    def forward_step(self, student: nn.Module, teacher: nn.Module, batch: dict[str, Any], micro: slice,
                     ctx: StepContext) -> dict[str, torch.Tensor]:
        """Forward and loss of one micro-batch; keeps the teacher's view-2 CLS rows (b, d) and E_P rows
        (b, d), the view-2 patch tokens at this step's positions projected by the teacher head of
        this forward (before the step's update), like the CLS rows (paper Sec. 3)."""
        v = micro_views(batch, micro, list(self.cfg.mask.views))
        b, flat = v.b, v.masks.flatten(0, 1)  # (2b, L)
        owner = flat.nonzero()[:, 0]  # image index of each masked token, row-major order
        # Patch projections are needed only for the patch loss (lambda2 = 0: none computed).
        select = flat if self.patch_fs is not None else torch.zeros_like(flat)
        with ctx.phase("forward"):
            with torch.no_grad(), ctx.autocast():
                t_out = teacher(v.global_crops, masks=None, patch_select=select)
                if self.patch_fs is not None:  # E_P rows: one view-2 token per image, this head
                    rows = torch.arange(b, device=v.global_crops.device)
                    chosen = t_out["patch_tokens"][b:][rows, self.positions[micro].to(v.global_crops.device)]
                    self.pending[1].append(teacher.head(chosen).float())  # (b, d)
            out = student(v.global_crops, v.local_crops, masks=flat, patch_select=select)
        t_cls = t_out["cls"].float().view(2, b, -1)
        s_cls = out["cls"].float().view(-1, b, out["cls"].shape[-1])
        self.loss_fn.phase = ctx.phase  # times the judge search inside the objective
        try:
            with ctx.phase("objective"):
                terms = self.loss_fn(
                    student_cls=s_cls, teacher_cls=t_cls, student_patches=out["patches"].float(),
                    teacher_patches=t_out["patches"].float(), patch_owner=owner, num_images=2 * b,
                    cls_feature_set=self.cls_fs, patch_feature_set=self.patch_fs, step=ctx.step,
                    teacher_temp=ctx.teacher_temp,
                )
        finally:  # the trainer's bound method kept here would tie the trainer into a reference cycle
            self.loss_fn.phase = no_phase
        self.pending[0].append(t_cls[1])
        self.stats = {"teacher_cls": t_cls.detach(), "student_cls": s_cls.detach()}
        return terms

    @torch.no_grad()
    def after_optimizer_step(self, index: torch.Tensor) -> None:
        """E_C <- the step's teacher view-2 CLS embeddings (B, d); E_P <- its projected view-2 patch
        embeddings (B, d); both all-gathered in rank order (:meth:`FeatureSet.enqueue`)."""
        if self.cls_fs is not None:
            self.cls_fs.enqueue(torch.cat(self.pending[0]), index)
        if self.patch_fs is not None:
            self.patch_fs.enqueue(torch.cat(self.pending[1]), index)
        self.pending = ([], [])

    def report_stats(self) -> dict[str, torch.Tensor]:
        return self.stats

    def term_temperatures(self, bad: list[str], teacher_temp: float) -> dict[str, dict[str, float]]:
        """The temperatures each culprit term really used: its own ``loss.<term>.*_temp`` override or the
        shared value (every active term when the culprit is the total loss or a gradient)."""
        lo = self.cfg.loss
        active = [n for n in ("cls", "patch") if lo[f"{n}_weight"] > 0]
        out = {}
        for name in [n for n in active if n in bad] or active:
            tau_s, tau_t = self.loss_fn.temperatures(name, teacher_temp)
            out[name] = {"student_temp": float(tau_s), "teacher_temp": float(tau_t)}
        return out

    def sync_state(self) -> dict[str, torch.Tensor]:
        """Anchors of the last step, E_C / E_P rows and pointers."""
        state = {"anchors": self.loss_fn.last_anchors()}
        for name, fs in (("E_C", self.cls_fs), ("E_P", self.patch_fs)):
            if fs is not None:
                state[name], state[name + " pointer"] = fs.features, fs.ptr.view(1).double()
        return state

    def metrics(self, labels: torch.Tensor | None, step: int) -> dict[str, float]:
        """Diagnostics of the next step's task-0 CLS concepts (labels are never used by the loss); computed
        when the dataset has labels, E_C exists and ``loss.cls.num_judges`` >= 2:

        * ``concept_purity``: share of neighbour judges whose image has the anchor's label;
        * ``judge_weight/{mean,p10,p50,p90}``: the weights w_j of the non-anchor judges, as the loss uses
          them (soft: cos(judge, anchor); onehot: the constant 1 - ``smoothing``);
        * ``judge_cos/{mean,p10,p50,p90}`` (onehot only): cos(judge, anchor), the weights soft labels
          would have given (Tab. 9's difference).

        The concepts are cached by the loss, so the next step reuses them: no extra search."""
        if labels is None or self.cls_fs is None or self.cfg.loss.cls.num_judges < 2:
            return {}
        concepts = self.loss_fn.concepts(self.loss_fn.cls, self.cls_fs, step, 0, stream=0)
        out = {f"judge_weight/{k}": v for k, v in judge_weight_stats(concepts.weights[:, 1:]).items()}
        if self.cfg.loss.cls.label_mode == "onehot":
            cos = (concepts.judges[:, 1:] * concepts.judges[:, :1]).sum(-1)
            out.update({f"judge_cos/{k}": v for k, v in judge_weight_stats(cos).items()})
        idx = self.cls_fs.indices
        row_labels = torch.where(idx >= 0, labels.to(idx.device)[idx.clamp_min(0)], torch.full_like(idx, -1))
        purity = concept_purity(concepts, row_labels)
        return out if purity is None else {"concept_purity": purity, **out}
