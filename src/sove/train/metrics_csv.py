"""``metrics.csv`` of a run: every logged row is on disk at once, and columns may grow.

A Lightning Fabric :class:`~lightning.fabric.loggers.Logger`, so ``fabric.log_dict`` reaches it.
Fabric's own ``CSVLogger`` is not used: it buffers rows (100 log calls by default, so a killed run
lost them), deletes an existing ``metrics.csv`` when it starts, and on a resume that logs a
different set of columns rewrote the file with a header that lacks old columns, raising
``ValueError`` and leaving only the header. Metrics are small, so this writer keeps all rows in
memory, appends each new row, and rewrites the file atomically (temporary file + rename) when a
new column appears: the union of all columns, earlier rows with empty cells.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only


class MetricsCSV(Logger):
    """Append-only CSV of logged metrics: one row per ``log_metrics`` call, columns sorted by name.

    Args:
        path: the CSV file (``RUN/metrics.csv``); a fresh run starts it anew, a resume keeps its
            rows up to the checkpoint's step (:meth:`resume_at`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self.started = False

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """Continue the existing file: keep its rows with ``step <= step`` (later ones are re-logged
        by the resumed steps) and its columns. Rows whose step does not parse are kept."""
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if _step(r) is None or _step(r) <= step]
            self._rewrite()
        self.started = True

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Write one row ``{"step": step, **metrics}`` now (rank 0)."""
        row = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self.rows) if step is None else step
        self.rows.append(row)
        if not self.started or not set(row) <= set(self.columns):
            self.columns = sorted(set(self.columns) | set(row))
            self.started = True
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Not stored here: the run's ``config.yaml`` holds the hyperparameters."""

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def _step(row: dict[str, str]) -> float | None:
    try:
        return float(row["step"])
    except (KeyError, TypeError, ValueError):
        return None
