"""Training curves and the embedding map of a run (matplotlib, PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sove.errors import SoveError
from sove.preflight import check_writable

#: (column of metrics.csv, panel title); panels without data are left out.
PANELS = [
    (("loss/loss", "loss/cls", "loss/patch"), "loss terms"),
    (("lr",), "learning rate"),
    (("teacher_temp",), "teacher temperature"),
    (("momentum",), "teacher momentum"),
    (("concept_purity",), "concept purity (diagnostic)"),
    (("knn_top1",), "k-NN top-1 (%)"),
]


def read_metrics(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Columns of ``metrics.csv`` as (steps, values) pairs, skipping empty cells.

    Raises:
        SoveError: no metrics.csv in the run directory.
    """
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise SoveError(f"no metrics.csv in '{run_dir}'; is it a run directory of `sove pretrain`?")
    rows = list(csv.DictReader(open(path)))
    out = {}
    for key in rows[0].keys() if rows else []:
        pairs = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pairs and key != "step":
            steps, values = zip(*pairs)
            out[key] = (np.array(steps), np.array(values))
    return out


def plot_curves(run_dir: str | Path) -> Path:
    """``sove plot RUN``: loss terms, lr, teacher temperature, momentum, purity, k-NN -> ``plots/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    check_writable(Path(run_dir) / "plots", "plots")
    panels = [(keys, title) for keys, title in PANELS if any(k in metrics for k in keys)]
    if not panels:
        raise SoveError(f"metrics.csv in '{run_dir}' has no logged values yet")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (keys, title) in zip(axes[0], panels):
        for key in keys:
            if key in metrics:
                ax.plot(*metrics[key], label=key.split("/")[-1], lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "curves.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_embedding(features: np.ndarray, labels: np.ndarray, class_names: list[str] | None, path: Path,
                   title: str) -> Path:
    """2-D PCA map (scikit-learn) of features (N, D) coloured by label; writes ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(features)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c in np.unique(labels):
        sel = labels == c
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.5, label=name)
    ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
