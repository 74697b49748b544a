"""Tune a small-compute recipe: SOVE settings trained for the same wall-clock budget, one at a time.

    python benchmarks/recipe_trials.py --budget-minutes 5 --work-dir /tmp/trials --out /tmp/trials/trials.md
    python benchmarks/recipe_trials.py --trials base patch4 --trial "lr 3e-3=optim.base_lr=3e-3" ...

The question a user with one machine asks is not "which setting is best per step" but "which gets
furthest in the time I have". So every trial gets the same wall-clock training budget
(``--budget-minutes``): a few calibration steps in a fresh child process measure its seconds per
step (the step cost differs between settings: patch size, crops, model size), its schedule is
sized to the budget, it trains in ``--slice-seconds`` slices after each of which its schedules are
re-sized to the steps its measured pace fits into the budget left (``sove.train.
budget.resize_to_budget``: the run uses the budget and ends annealed), and its teacher backbone is
k-NN-evaluated with the protocol of ``sove eval knn`` on the full train / test splits.
Trials run one after another -- never start two CPU jobs at once on a small machine: on 2 cores
concurrent jobs slowed each ~5x and would make the budgets meaningless.

A trial is a name and a list of ``key=value`` overrides on top of ``--config`` and the positional
overrides; the built-in ones (``TRIALS``) are the knobs of the issue "30-minute recipe" (patch
size, crops, feature-set and anchor sizes, lr, temperatures, momentum, model size). ``--trial
"NAME=key=value key=value"`` adds your own. Results are appended to ``--out`` (markdown) and its
JSON twin after every trial, so a long sweep that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import calibrate, knn_of, make_trainer, method_config  # noqa: E402

from sove.errors import SoveError  # noqa: E402
from sove.eval.features import eval_splits  # noqa: E402
from sove.train.budget import resize_to_budget  # noqa: E402
from sove.train.builders import build_train_dataset  # noqa: E402

#: name -> overrides relative to the config (the demo preset ``fashion_mnist_tiny`` by default).
TRIALS: dict[str, list[str]] = {
    "base": [],
    "patch4": ["model.patch_size=4", "data.local_crop_size=12"],
    "lr 4e-3": ["optim.base_lr=4e-3"],
    "lr 1e-3": ["optim.base_lr=1e-3"],
    "momentum 0.996": ["optim.momentum_teacher=0.996"],
    "momentum 0.98": ["optim.momentum_teacher=0.98"],
    "2 local crops": ["data.num_local_crops=2"],
    "8 local crops": ["data.num_local_crops=8"],
    "no drop-path": ["model.drop_path_rate=0"],
    "batch 64": ["optim.batch_size=64"],
    "feature sets x2": ["loss.cls_feature_set_size=8192", "loss.patch_feature_set_size=4096",
                        "loss.cls.num_anchors=1024", "loss.patch.num_anchors=256"],
    "feature sets /2": ["loss.cls_feature_set_size=2048", "loss.patch_feature_set_size=1024",
                        "loss.cls.num_anchors=256", "loss.patch.num_anchors=64"],
    "teacher temp 0.07": ["loss.teacher_temp=0.07"],
    "width 192, depth 6": ["model.embed_dim=192", "model.depth=6", "model.num_heads=3"],
}


def parse_trial(text: str) -> tuple[str, list[str]]:
    """``"NAME=key=value key=value"`` -> (NAME, [key=value, ...]).

    Raises:
        SoveError: no ``=`` after the name, or an override without ``=``.
    """
    name, sep, rest = text.partition("=")
    overrides = rest.split()
    if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides):
        raise SoveError(f"--trial {text!r}: expected \"NAME=key=value [key=value ...]\", "
                        "e.g. \"lr 3e-3=optim.base_lr=3e-3\"")
    return name.strip(), overrides


def trial_args(args: argparse.Namespace, name: str, overrides: list[str]) -> argparse.Namespace:
    """The compare_methods-style namespace of one trial (its own work folder)."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return argparse.Namespace(config=args.config, overrides=list(args.overrides) + overrides,
                              work_dir=str(Path(args.work_dir) / slug), calibration_steps=args.calibration_steps,
                              num_prototypes=None, smoke=args.smoke)


def run_trial(args: argparse.Namespace, name: str, overrides: list[str]) -> dict[str, Any]:
    """Calibrate, train for the budget (or ``args.steps``), k-NN-evaluate one trial."""
    targs = trial_args(args, name, overrides)
    Path(targs.work_dir).mkdir(parents=True, exist_ok=True)
    calib = calibrate(targs, "sove")
    budget = args.budget_minutes * 60
    steps = args.steps if args.steps else max(1, int(budget / calib["s_per_step"]))
    cfg = method_config(targs, "sove", epochs=steps / calib["batches_per_epoch"])
    trainer = make_trainer(cfg, Path(targs.work_dir) / "sove", build_train_dataset(cfg))
    start = time.perf_counter()
    if args.steps:
        trainer.fit()
    else:
        # The first slice is at most a tenth of the budget, so that a calibration that overestimated the
        # step time (a busy machine) cannot end the whole schedule before the first re-sizing.
        first = min(args.slice_seconds, budget / 10)
        while trainer.fit(deadline=min(start + budget, time.perf_counter() + first)) is None:
            first = args.slice_seconds
            used = time.perf_counter() - start
            if used >= budget:
                break
            resize_to_budget(trainer, used, budget)
    minutes = (time.perf_counter() - start) / 60
    if not args.steps and minutes < 0.9 * args.budget_minutes:
        print(f"[trial] {name}: WARNING: the schedule ended after {minutes:.1f} of {args.budget_minutes} min "
              "(the calibration overestimated the step time: was the machine busy?); re-run this trial", flush=True)
    device = trainer.fabric.device
    knn = knn_of(trainer.teacher.backbone, *eval_splits(cfg), cfg, device)
    row = {"name": name, "overrides": overrides, "s_per_step_alone": calib["s_per_step"],
           "steps": trainer.step, "scheduled_steps": trainer.total_steps,
           "epochs": trainer.step / calib["batches_per_epoch"], "minutes": minutes,
           "s_per_step": minutes * 60 / max(trainer.step, 1),
           "knn_top1": knn["top1"], "knn_best_top1": knn["best_top1"], "knn_best_k": knn["best_k"]}
    del trainer
    gc.collect()
    return row


def markdown(rows: list[dict[str, Any]], ks: list[int]) -> str:
    """One row per trial: overrides, speed, steps, epochs, k-NN top-1 per k and the best."""
    head = ("| trial | overrides | s/step | steps (scheduled) | epochs | train min | "
            + " | ".join(f"k-NN k={k}" for k in ks) + " | best |")
    lines = [head, "|" + "---|" * (7 + len(ks))]
    for r in rows:
        over = " ".join(f"`{o}`" for o in r["overrides"]) or "(config)"
        knn = " | ".join(f"{r['knn_top1'][str(k)]:.2f}" for k in ks)
        lines.append(f"| {r['name']} | {over} | {r['s_per_step']:.3f} | {r['steps']} ({r['scheduled_steps']}) | "
                     f"{r['epochs']:.2f} | {r['minutes']:.1f} | {knn} | **{r['knn_best_top1']:.2f}** |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist_tiny", help="preset name or YAML (the trials' base)")
    p.add_argument("--trials", nargs="+", default=None, metavar="NAME",
                   help=f"built-in trials to run, in order (default: all): {', '.join(TRIALS)}")
    p.add_argument("--trial", action="append", default=[], metavar="\"NAME=key=value ...\"",
                   help="an extra trial (repeatable)")
    p.add_argument("--budget-minutes", type=float, default=5.0, help="training wall-clock budget per trial")
    p.add_argument("--calibration-steps", type=int, default=8, help="timed steps per trial in the child process")
    p.add_argument("--slice-seconds", type=float, default=60.0,
                   help="the schedules are re-sized to the measured pace after every slice")
    p.add_argument("--steps", type=int, default=0, help="fixed steps per trial instead of a time budget")
    p.add_argument("--work-dir", default=None, help="where the runs are written (default: a temp folder)")
    p.add_argument("--out", default=None, help="markdown table (rewritten after every trial; JSON next to it)")
    p.add_argument("--smoke", action="store_true", help="CI mode: 1 step per trial, 1 calibration step, in-process")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.calibration_steps = 1, 1
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="sove_trials_")
    unknown = [t for t in (args.trials or []) if t not in TRIALS]
    if unknown:
        raise SoveError(f"--trials: unknown trial(s) {unknown}; built-in: {list(TRIALS)} (or add one with --trial)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    todo = [(n, TRIALS[n]) for n in (args.trials if args.trials is not None else ([] if args.trial else TRIALS))]
    todo += [parse_trial(t) for t in args.trial]
    ks = None
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, overrides in todo:
        row = run_trial(args, name, overrides)
        rows.append(row)
        ks = ks or sorted(int(k) for k in row["knn_top1"])
        print(f"[trial] {name}: {row['steps']} steps ({row['epochs']:.2f} epochs) in {row['minutes']:.1f} min, "
              f"{row['s_per_step']:.3f} s/step -> k-NN top-1 {row['knn_best_top1']:.2f} (k={row['knn_best_k']})",
              flush=True)
        if args.out:
            Path(args.out).write_text(markdown(rows, ks) + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "config": args.config,
                 "overrides": list(args.overrides), "budget_minutes": args.budget_minutes,
                 "threads": torch.get_num_threads(), "trials": rows,
                 "total_minutes": (time.perf_counter() - t0) / 60}, indent=2))
    if rows:
        print(markdown(rows, ks))
    return rows


if __name__ == "__main__":
    try:
        main()
    except SoveError as e:
        print(f"recipe_trials: error: {e}", file=sys.stderr)
        sys.exit(2)
