"""Statistics and markdown tables of ``benchmarks/grid.py``, from the per-cell JSON files only.

Paired differences: for two settings A and B the seeds present in both are paired,
d_s = metric(A, s) - metric(B, s); the table gives the per-seed d_s, their mean and the 95%
confidence interval of the mean from Student's t distribution with n - 1 degrees of freedom
(``scipy.stats.t``), i.e. the paired t interval. With fewer than 2 paired seeds: "n/a (1 seed)".
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

#: The primary metric of every comparison: k-NN top-1 at a fixed k (not chosen on the test split).
PRIMARY_K = "20"
LEVEL = 0.95
NA = "n/a (1 seed)"
METHOD_NAMES = {"sove": "SOVE", "dino": "DINO", "ibot": "iBOT"}
#: ablation groups: (title, reference setting, [(row label, setting)]); each row is compared with the
#: reference, the paper's chosen setting, so the paper's sign is "reference > row" (reference − row > 0).
ABLATION_GROUPS = [
    ("Losses (paper Tab. 7; paper: CLS + MIM better than either alone)", "default",
     [("CLS + MIM", "default"), ("CLS only (λ2 = 0)", "cls_only"), ("MIM only (λ1 = 0)", "mim_only")]),
    ("CLS judges per concept (paper Tab. 8; paper's choice: 9 judges)", "default",
     [("judges 9", "default"), ("judges 3", "judges3"), ("judges 1", "judges1")]),
    ("Judge labels (paper Tab. 9; paper: soft better than one-hot)", "default",
     [("soft", "default"), ("one-hot", "onehot")]),
    ("Diagnostic change: head output 256 (the paper's width), soft vs one-hot", "wide_soft",
     [("soft, head_out_dim=256", "wide_soft"), ("one-hot, head_out_dim=256", "wide_onehot")]),
]
ABLATION_HEADER = ("| setting | overrides | seeds | k-NN per seed | k-NN mean ± sd | linear mean ± sd "
                   "| Δ k-NN [95% CI] | Δ linear [95% CI] | verdict | w_j p10 / p50 / p90 | cos p50 | purity "
                   "| pretrain min |")
DIAG_KEYS = ("judge_weight/p10", "judge_weight/p50", "judge_weight/p90", "judge_cos/p50", "concept_purity")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def paired_ci(diffs: list[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean, sd and the two-sided ``level`` paired t interval of per-seed differences.

    Returns:
        ``{"n", "mean", "sd", "lo", "hi"}``; sd / lo / hi are None when n < 2.
    """
    n = len(diffs)
    mean, sd = mean_sd(diffs) if n else (math.nan, None)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def verdict(ci: dict[str, Any]) -> str:
    """reproduced / not reproduced / not separable for a difference whose paper sign is positive."""
    if ci["lo"] is None:
        return NA
    if ci["lo"] > 0:
        return "reproduced"
    if ci["hi"] < 0:
        return "not reproduced (opposite sign)"
    return "not separable (CI contains 0)"


def load_results(results_dir: Path, grid: str) -> dict[str, dict[int, dict[str, Any]]]:
    """setting -> seed -> result of every ``<results_dir>/<grid>/<setting>__seed<S>.json``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((results_dir / grid).glob("*__seed*.json")):
        r = json.loads(path.read_text())
        out.setdefault(r["setting"], {})[int(r["seed"])] = r
    return out


def metric(r: dict[str, Any], name: str) -> float | None:
    """``knn`` (top-1 at :data:`PRIMARY_K`) or ``linear`` (top-1) of one result; None when not evaluated."""
    if name == "knn":
        return r["knn"]["top1"].get(PRIMARY_K)
    return r["linear"]["top1"] if r.get("linear") else None


def _values(cells: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
    return {s: v for s, r in sorted(cells.items()) if (v := metric(r, name)) is not None}


def _fmt_ms(values: list[float]) -> str:
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f} (1 seed)"


def _fmt_ci(ci: dict[str, Any]) -> str:
    if ci["n"] == 0:
        return "–"
    if ci["lo"] is None:
        return f"{ci['mean']:+.2f}, {NA}"
    return f"{ci['mean']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]"


def diff(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], name: str) -> tuple[dict[int, float], dict]:
    """Per-seed differences a − b of ``name`` over the seeds both have, and their :func:`paired_ci`."""
    va, vb = _values(a, name), _values(b, name)
    d = {s: va[s] - vb[s] for s in va if s in vb}
    return d, paired_ci(list(d.values()))


def _per_seed(values: dict[int, float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values.values()) or "–"


def _seeds(cells: dict[int, dict[str, Any]], expected: int) -> str:
    which = f" ({', '.join(str(s) for s in sorted(cells))})" if cells else ""
    return f"{len(cells)} of {max(expected, len(cells))}{which}"


def _machine_line(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    rows = [r for cells in results.values() for r in cells.values()]
    machines = sorted({"{cpu}, {cores} cores, torch {torch}, {device}".format(**r["machine"]) for r in rows})
    return "; ".join(machines) or "–"


#: marks a pretraining time that misses a segment the grid did not time (a lower bound)
PARTIAL = "*"
PARTIAL_NOTE = (f"{PARTIAL} pretraining resumed from a checkpoint whose earlier segment the grid did not time: "
                "a lower bound.")


def wall_complete(r: dict[str, Any]) -> bool:
    """Whether ``wall_s.pretrain`` covers the whole pretraining: the grid timed every segment (result files
    without ``pretrain_wall_complete`` predate segment timing: complete unless resumed)."""
    return bool(r.get("pretrain_wall_complete", not r.get("pretrain_resumed", False)))


def _minutes(cells: dict[int, dict[str, Any]], key: str) -> str:
    vals = [r["wall_s"][key] / 60 for r in cells.values() if r["wall_s"].get(key) is not None]
    partial = key == "pretrain" and not all(wall_complete(r) for r in cells.values())
    return f"{np.mean(vals):.1f}{PARTIAL if partial else ''}" if vals else "–"


def methods_markdown(results: dict[str, dict[int, dict[str, Any]]], expected: int) -> str:
    """The methods grid: per-method per-seed values and mean ± sd, then the paired differences."""
    lines = [f"Machine: {_machine_line(results)}. k-NN: top-1 at k = {PRIMARY_K}; mean ± sd over seeds.", "",
             "| method | seeds | k-NN per seed | k-NN mean ± sd | linear per seed | linear mean ± sd | steps per seed "
             "| pretrain min per seed | k-NN min | linear min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, name in METHOD_NAMES.items():
        cells = results.get(m, {})
        knn, lin = _values(cells, "knn"), _values(cells, "linear")
        steps = ", ".join(str(r["steps"]) for _, r in sorted(cells.items())) or "–"
        wall = ", ".join(f"{r['wall_s']['pretrain'] / 60:.1f}{'' if wall_complete(r) else PARTIAL}"
                         for _, r in sorted(cells.items())) or "–"
        lines.append(f"| {name} | {_seeds(cells, expected)} | {_per_seed(knn)} | {_fmt_ms(list(knn.values()))} | "
                     f"{_per_seed(lin)} | {_fmt_ms(list(lin.values()))} | {steps} | {wall} | "
                     f"{_minutes(cells, 'knn')} | {_minutes(cells, 'linear')} |")
    if not all(wall_complete(r) for cells in results.values() for r in cells.values()):
        lines += ["", PARTIAL_NOTE]
    lines += ["", f"Paired by seed; {LEVEL:.0%} CI of the mean difference from the t distribution, n − 1 dof.", "",
              "| difference | metric | seeds paired | per seed | mean [95% CI] |", "|---|---|---|---|---|"]
    for other in ("dino", "ibot"):
        for name, label in (("knn", f"k-NN k={PRIMARY_K}"), ("linear", "linear")):
            d, ci = diff(results.get("sove", {}), results.get(other, {}), name)
            lines.append(f"| SOVE − {METHOD_NAMES[other]} | {label} | {ci['n']} | {_per_seed(d)} | {_fmt_ci(ci)} |")
    return "\n".join(lines)


def _diag(cells: dict[int, dict[str, Any]]) -> str:
    """The last logged diagnostics point, averaged over seeds, as ``p10 / p50 / p90 | cos p50 | purity``."""
    ends = [r["diagnostics"][-1] for r in cells.values() if r.get("diagnostics")]
    avg = {k: np.mean([e[k] for e in ends if e.get(k) is not None] or [np.nan]) for k in DIAG_KEYS}
    if not ends or np.isnan(avg["judge_weight/p50"]):
        return "– | – | –"
    cos = "–" if np.isnan(avg["judge_cos/p50"]) else f"{avg['judge_cos/p50']:.3f}"
    return (f"{avg['judge_weight/p10']:.3f} / {avg['judge_weight/p50']:.3f} / {avg['judge_weight/p90']:.3f} | {cos} | "
            f"{avg['concept_purity']:.3f}")


def ablations_markdown(results: dict[str, dict[int, dict[str, Any]]], expected: int,
                       overrides: dict[str, list[str]]) -> str:
    """One table per ablation group: per-seed k-NN, mean ± sd, paired difference to the reference, a verdict,
    the concept diagnostics and the mean pretraining minutes; ``overrides``: setting -> its overrides."""
    lines = [f"Machine: {_machine_line(results)}. k-NN: top-1 at k = {PRIMARY_K}. Δ = reference − row, paired by "
             f"seed, {LEVEL:.0%} t interval (n − 1 dof); the paper's sign is Δ > 0 (its chosen setting is better). "
             "Verdict from the k-NN Δ. Diagnostics: last logged step, mean over seeds; w_j = weights of the "
             "non-anchor CLS judges (p10 / p50 / p90), cos = their cosine to the anchor (one-hot rows), purity = "
             "share of the non-anchor judges whose image has the anchor's label (task-0 CLS concepts of the "
             "logged step).", ""]
    for title, ref, rows in ABLATION_GROUPS:
        lines += [f"**{title}**", "", ABLATION_HEADER, "|---" * 13 + "|"]
        for label, setting in rows:
            cells = results.get(setting, {})
            over = overrides.get(setting, [])
            knn, lin = _values(cells, "knn"), _values(cells, "linear")
            if setting == ref:
                dk = dl = "(reference)"
                v = "–"
            else:
                d_k, ci_k = diff(results.get(ref, {}), cells, "knn")
                _, ci_l = diff(results.get(ref, {}), cells, "linear")
                dk, dl, v = _fmt_ci(ci_k), _fmt_ci(ci_l), verdict(ci_k) if ci_k["n"] else "–"
                if ci_k["n"]:  # descriptive, next to the interval: in how many seeds the paper's sign holds
                    v += f"; Δ > 0 in {sum(x > 0 for x in d_k.values())} of {ci_k['n']} paired seeds"
            lines.append(f"| {label} | `{' '.join(over) or '(recipe)'}` | {_seeds(cells, expected)} | "
                         f"{_per_seed(knn)} | "
                         f"{_fmt_ms(list(knn.values()))} | {_fmt_ms(list(lin.values()))} | {dk} | {dl} | {v} | "
                         f"{_diag(cells)} | {_minutes(cells, 'pretrain')} |")
        lines.append("")
    if not all(wall_complete(r) for cells in results.values() for r in cells.values()):
        lines += [PARTIAL_NOTE, ""]
    return "\n".join(lines + trajectory_markdown(results)).rstrip()


def _trajectory(cells: dict[int, dict[str, Any]], key: str) -> str:
    """``key`` at each logged diagnostics point (same positions for every seed), mean over seeds."""
    runs = [r["diagnostics"] for r in cells.values() if r.get("diagnostics")]
    points = min((len(d) for d in runs), default=0)
    vals = [[d[i].get(key) for d in runs] for i in range(points)]
    return " / ".join("–" if None in v else f"{np.mean(v):.3f}" for v in vals) or "–"


def trajectory_markdown(results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The concept diagnostics over training (0, 25, 50, 75, 100 % of the logged steps), mean over seeds,
    for every setting that logged them."""
    lines = ["**Concept diagnostics over training** (logged steps at 0 / 25 / 50 / 75 / 100 %, mean over seeds; "
             "w_j = median weight of the non-anchor CLS judges, cos = their median cosine to the anchor)", "",
             "| setting | w_j p50 | cos p50 (one-hot) | concept purity |", "|---|---|---|---|"]
    for setting, cells in results.items():
        if any(r.get("diagnostics") for r in cells.values()):
            lines.append(f"| {setting} | {_trajectory(cells, 'judge_weight/p50')} | "
                         f"{_trajectory(cells, 'judge_cos/p50')} | {_trajectory(cells, 'concept_purity')} |")
    return lines


def replace_between_markers(text: str, name: str, body: str, path: Path) -> str:
    """``text`` with what lies between ``<!-- grid:NAME -->`` and ``<!-- /grid:NAME -->`` replaced by ``body``.

    Raises:
        ValueError: the markers are missing (naming ``path`` and the marker).
    """
    pattern = re.compile(rf"(<!-- grid:{name} -->\n)(?:.*?\n)?(<!-- /grid:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path}: no '<!-- grid:{name} -->' ... '<!-- /grid:{name} -->' markers; add them where "
                         "the table belongs")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, count=1)
