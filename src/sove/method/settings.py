"""The settings of SOVE's concepts, their valid values and ranges, defined once and without torch.

:class:`ConceptSettings` is both the schema of the config keys ``loss.cls`` / ``loss.patch``
(:mod:`sove.config`, checked when a config is loaded, before torch is imported) and the argument of
:class:`sove.method.losses.SOVELoss`; :func:`concept_problem` is the one range check, used by the
config (the message then names the key) and by :func:`sove.method.concepts.select_judges` /
:func:`~sove.method.concepts.draw_anchors` when they are called directly (``ValueError``).
docs/method.md, "Concepts: anchors and judges".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: ``label_mode``: judge weights cos(judge, anchor) (soft) or ``1 - smoothing`` for every judge (onehot, Tab. 9).
LABEL_MODES = ("soft", "onehot")

#: ``loss.search_dtype``: dtype of the judges' k-NN search (the weights are always fp32); ``auto`` is
#: bfloat16 when training on CUDA and float32 elsewhere.
SEARCH_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ConceptSettings:
    """How one loss builds its concepts, keys ``loss.cls`` / ``loss.patch`` (docs/method.md, "Concepts: anchors
    and judges"; Tab. 8, 9, B.1, B.3, B.4).

    ``teacher_temp`` / ``student_temp`` of None use the step's (scheduled) CLS temperatures.
    """

    num_anchors: int = 8192
    num_judges: int = 9  # anchor + k nearest neighbours
    label_mode: str = "soft"  # soft | onehot
    smoothing: float = 0.1
    anchor_keep_fraction: float = 1.0  # 0.5 = the authors' code
    num_tasks: int = 4
    student_temp: Optional[float] = None  # None: loss.student_temp
    teacher_temp: Optional[float] = None  # None: the scheduled CLS teacher temperature


def concept_problem(settings: ConceptSettings, num_rows: Optional[int] = None) -> Optional[tuple[str, str]]:
    """The first out-of-range setting as ``(field, message)``, or None when all are valid.

    Args:
        settings: the concept settings (any object with the fields of :class:`ConceptSettings`).
        num_rows: feature-set size N; when given, the anchors and the judges of one anchor must fit:
            ``num_anchors <= N`` and ``num_anchors + num_judges - 1 <= N`` (the judges come from the rows
            that are not anchors).

    Returns:
        e.g. ``("num_judges", "(0) must be >= 1 (the anchor itself)")``; callers prefix the field
        (``num_judges (0) ...``) or the config key (``loss.cls.num_judges: (0) ...``).
    """
    s = settings
    checks = (
        (s.num_judges >= 1, "num_judges", f"({s.num_judges}) must be >= 1 (the anchor itself)"),
        (s.num_anchors >= 2, "num_anchors", f"({s.num_anchors}) must be >= 2"),
        (s.num_tasks >= 1, "num_tasks", f"({s.num_tasks}) must be >= 1"),
        (s.label_mode in LABEL_MODES, "label_mode", f"({s.label_mode!r}) must be one of {', '.join(LABEL_MODES)}"),
        (0.0 <= s.smoothing < 1.0, "smoothing", f"({s.smoothing}) must be in [0, 1)"),
        (0.0 < s.anchor_keep_fraction <= 1.0, "anchor_keep_fraction",
         f"({s.anchor_keep_fraction}) must be in (0, 1]"),
        (s.student_temp is None or s.student_temp > 0, "student_temp",
         f"({s.student_temp}) must be > 0 or null (the shared student temperature)"),
        (s.teacher_temp is None or s.teacher_temp > 0, "teacher_temp",
         f"({s.teacher_temp}) must be > 0 or null (the scheduled teacher temperature)"),
        (num_rows is None or s.num_anchors <= num_rows, "num_anchors",
         f"({s.num_anchors}) exceeds the feature set ({num_rows} rows)"),
        (num_rows is None or s.num_anchors + s.num_judges - 1 <= num_rows, "num_judges",
         f"({s.num_judges}) too large: the pool left after removing num_anchors ({s.num_anchors}) anchors from the "
         f"feature set ({num_rows} rows) has {(num_rows or 0) - s.num_anchors} rows"),
    )
    return next(((field, message) for ok, field, message in checks if not ok), None)
