"""Concept browser: the concepts SOVE's loss builds (anchor + judges + soft-label weights), as PNG + JSON.

The feature set E_C keeps, beside each embedding, the dataset index of the image it came from
(-1 for the random initial rows), so each judge can be shown as its image. Concepts are drawn
exactly as the loss draws them (:meth:`sove.method.SOVELoss.concepts`, CLS stream, at the
checkpoint's step), so the JSON's judges and weights equal ``select_judges``'s for those anchors.

*Concept purity* (a diagnostic, never used by the loss): over concepts whose rows all come from
labelled images, the share of neighbour judges with the anchor's label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sove.errors import SoveError
from sove.method.concepts import Concepts, concept_purity  # noqa: F401 (re-exported)
from sove.method.sove import feature_set_state
from sove.preflight import check_writable
from sove.run import Run


def run_concepts(run_dir: str | Path, cfg: DictConfig, checkpoint: str = "last.pt", task: int = 0
                 ) -> tuple[Concepts, torch.Tensor, int]:
    """The CLS concepts of task ``task`` that the loss would build at the checkpoint's step.

    Returns:
        (concepts, dataset index of every E_C row (N,), step).

    Raises:
        SoveError: the checkpoint has no E_C (a DINO / iBOT run, or ``loss.cls_weight`` was 0).
    """
    from sove.method.sove import build_sove_loss as build_loss
    from sove.train.checkpoint import load_checkpoint

    state = load_checkpoint(Run(run_dir, checkpoint).checkpoint)
    method = state.get("method", {}).get("name", "sove")
    if method != "sove":
        raise SoveError(f"{run_dir}: a method={method} run has no concepts (they are SOVE's); nothing to browse")
    fs = feature_set_state(state, "cls")
    if fs is None:
        raise SoveError(f"{run_dir}: this run has no CLS feature set (loss.cls_weight=0); nothing to browse")
    loss = build_loss(cfg)
    concepts = loss.concepts(loss.cls, fs["features"], state["step"], task, stream=0)
    return concepts, fs["indices"], int(state["step"])


def describe(concepts: Concepts, row_index: torch.Tensor, labels: torch.Tensor | None,
             num: int) -> list[dict[str, Any]]:
    """JSON-ready description of the first ``num`` concepts: judges sorted by weight (anchor first)."""
    out = []
    for c in range(min(num, concepts.num_concepts)):
        rows, weights = concepts.judge_index[c], concepts.weights[c]
        order = [0] + sorted(range(1, len(rows)), key=lambda j: -float(weights[j]))
        judges = []
        for j in order:
            idx = int(row_index[rows[j]])
            judges.append({"row": int(rows[j]), "dataset_index": idx, "weight": float(weights[j]),
                           "label": int(labels[idx]) if labels is not None and idx >= 0 else None,
                           "anchor": j == 0})
        out.append({"concept": c, "judges": judges})
    return out


def draw_grid(described: list[dict[str, Any]], images, class_names: list[str] | None, path: Path) -> None:
    """One row per concept: anchor first, then judges by weight, weight (and class) under each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(described), max(len(d["judges"]) for d in described)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows), squeeze=False)
    for r, concept in enumerate(described):
        anchor_label = concept["judges"][0]["label"]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(concept["judges"]):
                ax.axis("off")
                continue
            judge = concept["judges"][c]
            if judge["dataset_index"] >= 0:
                img = images[judge["dataset_index"]][0]
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
            text = ("anchor " if judge["anchor"] else "") + f"{judge['weight']:.2f}"
            if judge["label"] is not None and class_names:
                text += f"\n{class_names[judge['label']][:10]}"
                colour = "tab:green" if judge["label"] == anchor_label else "tab:red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
            ax.set_xlabel(text, fontsize=7)
    fig.suptitle("SOVE concepts: anchor + judges sorted by soft-label weight (green = anchor's class; "
                 "images shown uncropped)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def reembed_rows(cfg: DictConfig, teacher: torch.nn.Module, features: torch.Tensor, row_index: torch.Tensor,
                 dataset) -> torch.Tensor:
    """E_C re-filled with ``teacher``'s projected CLS of the same images, in the clean evaluation view.

    Used to compare a trained and an untrained teacher on equal terms (the stored rows are
    augmented global-view-2 crops embedded by past teachers). Rows whose dataset index is -1 keep
    their random initial vectors. Returns (N, d) float32.
    """
    from sove.eval.features import EvalImages

    teacher = teacher.eval()
    images = EvalImages(dataset, cfg.data.global_crop_size, cfg.data.mean, cfg.data.std)
    out = features.clone()
    rows = (row_index >= 0).nonzero()[:, 0]
    for start in range(0, rows.shape[0], 512):
        chunk = rows[start:start + 512]
        batch = torch.stack([images[int(row_index[r])][0] for r in chunk])
        out[chunk] = teacher(batch)["cls"].float()
    return out


def browse_concepts(run_dir: str | Path, num: int = 16, checkpoint: str = "last.pt") -> dict[str, Any]:
    """``sove concepts``: write ``plots/concepts.png`` and ``eval/concepts.json`` for a run.

    Args:
        run_dir: a run directory.
        num: concepts to draw (the first ``num`` of task 0).
        checkpoint: file in ``run_dir/checkpoints``.

    Returns:
        The JSON dict: ``step``, ``num_concepts``, ``num_judges``, ``purity`` (the concepts as the
        loss builds them from the stored E_C, all K concepts), ``purity_clean`` (the same images
        re-embedded in the clean view by the trained teacher, same anchors) and
        ``purity_random_init`` (re-embedded likewise by the untrained teacher),
        ``concepts`` (the drawn ones, see :func:`describe`), ``png``.
    """
    from sove.data import build_source
    from sove.eval.provenance import write_json
    from sove.models import build_networks
    from sove.method.sove import build_sove_loss as build_loss
    from sove.train.checkpoint import load_checkpoint, load_state_strict

    run = Run(run_dir, checkpoint)
    run_dir, cfg = run.path, run.config
    for folder, what in ((run_dir / "plots", "the concept grid"), (run.eval_dir, "concepts.json")):
        check_writable(folder, what)  # before re-embedding images
    concepts, row_index, step = run_concepts(run_dir, cfg, checkpoint)
    d = cfg.data
    source = build_source(d.source, d.root, "train", d.download, d.num_channels, d.test_root)
    labels = torch.as_tensor(source.labels, dtype=torch.long) if getattr(source, "labels", None) is not None else None
    described = describe(concepts, row_index, labels, num)
    result: dict[str, Any] = {"step": step, "num_concepts": concepts.num_concepts, "num_judges": concepts.num_judges,
                              "purity": None, "purity_clean": None, "purity_random_init": None}
    if labels is not None:
        row_labels = torch.where(row_index >= 0, labels[row_index.clamp_min(0)], torch.full_like(row_index, -1))
        result["purity"] = concept_purity(concepts, row_labels)
        state = load_checkpoint(run.checkpoint)
        trained, untrained = build_networks(cfg)[1], build_networks(cfg, seed=cfg.trainer.seed)[1]
        load_state_strict(trained, state["teacher"], f"teacher in {checkpoint}")
        loss = build_loss(cfg)
        for key, teacher in (("purity_clean", trained), ("purity_random_init", untrained)):
            rows = reembed_rows(cfg, teacher, feature_set_state(state, "cls")["features"], row_index, source)
            result[key] = concept_purity(loss.concepts(loss.cls, rows, step, 0, stream=0), row_labels)
    png = run_dir / "plots" / "concepts.png"
    png.parent.mkdir(exist_ok=True)
    draw_grid(described, source, getattr(source, "classes", None), png)
    result.update(concepts=described, png=str(png))
    write_json(result, run.eval_dir / "concepts.json")
    return result
