"""The top-level ``pretrain`` / ``resume`` (what ``sove pretrain`` runs): the training loop of
:mod:`sove.train.trainer` with the evaluation callbacks attached and the curves drawn at the end.

The layers point down (data / models / method -> train -> eval / viz -> cli): this module, above
train, eval and viz, is where they meet, so the trainer never imports evaluation or plotting code.
"""

from __future__ import annotations

from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sove.eval.periodic import PeriodicKNN
from sove.train import trainer


def pretrain(cfg: DictConfig, overwrite: bool = False) -> Path:
    """:func:`sove.train.trainer.pretrain` with the periodic k-NN (``eval.knn_every_epochs``) attached;
    draws ``RUN/plots/curves.png`` at the end (rank 0). Returns the run directory.

    Raises:
        SoveError: see :func:`sove.train.trainer.pretrain`.
    """
    return _curves(trainer.pretrain(cfg, overwrite, callbacks=[PeriodicKNN()]))


def resume(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """:func:`sove.train.trainer.resume` with the periodic k-NN attached; draws the curves at the end.

    Raises:
        SoveError: see :func:`sove.train.trainer.resume`.
    """
    return _curves(trainer.resume(run_dir, overrides, callbacks=[PeriodicKNN()]))


def _curves(run_dir: Path) -> Path:
    if rank_zero_only.rank == 0:
        from sove.viz.curves import plot_curves

        print(f"training curves: {plot_curves(run_dir)}", flush=True)
    return run_dir
