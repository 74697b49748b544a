"""Seeded grids: SOVE vs DINO vs iBOT at equal wall clock, and the Tab. 7/8/9 ablations.

    python benchmarks/grid.py run --grid methods --seeds 0 1 2 --budget 20min     # 9 cells
    python benchmarks/grid.py run --grid ablations --seeds 0 1 --steps 1170       # 16 cells
    python benchmarks/grid.py run --grid ablations --only onehot --seeds 0        # one setting
    python benchmarks/grid.py tables            # docs/benchmarks.md + docs/ablations.md from the JSON files

Every cell (setting, seed) is ``sove pretrain`` of ``fashion_mnist_tiny`` with the demo's recipe
(``make demo``: ``data.num_local_crops=2``), the setting's overrides and ``trainer.seed=S`` (init,
data order, augmentation, anchors), then ``sove eval knn`` and ``sove eval linear`` of its teacher,
each a child process through the CLI. The result goes to ``benchmarks/results/<grid>/<setting>__seed<S>.json``
(written atomically), which makes the grid resumable over sessions:

* a cell whose JSON exists is skipped;
* a run directory with ``checkpoints/last.pt`` but no ``grid_pretrain.json`` (written when
  ``sove pretrain`` exits 0) was interrupted: ``sove pretrain --resume`` continues it exactly;
* a finished run without the JSON only reruns its evaluations;
* Ctrl-C (SIGINT) or SIGTERM stops the grid: the running ``sove pretrain`` receives it (it runs in its own
  session, so the grid passes the signal on and waits), stops after the current step with a checkpoint,
  and the grid exits with 128 + the signal number; the same command resumes. A second Ctrl-C stops the
  child at once (losing the steps since its last checkpoint), a third kills it. Closing the terminal
  passes SIGTERM on, but the child's later output then fails: run long grids under ``nohup`` or tmux.
  The pretraining minutes of a cell sum its segments (``RUN/grid_segments.json``); a cell resumed from
  a run the grid did not time is marked as a lower bound in the tables.

Budgets: ``methods`` runs each cell for ``--budget`` of wall clock (``trainer.time_budget``: the
schedules are sized to the pace each run measures, so every method gets the same time; default
20 min, at least the demo's pretraining budget, which is 20 min minus the evaluation estimate and
45 s); ``ablations`` trains every setting for ``--steps`` optimizer steps (default 1170 = the demo
schedule's 2.5 epochs at 468 steps per epoch; schedules sized to that many steps), so the result
does not depend on machine load. The linear probe runs ``--linear-epochs`` (default 50, the
protocol's default) on cached ``cls4`` features.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid_tables  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "fashion_mnist_tiny"
RECIPE = ["data.num_local_crops=2"]  # the Makefile's DEMO_RECIPE
GRIDS: dict[str, dict[str, list[str]]] = {
    "methods": {"sove": ["method=sove"], "dino": ["method=dino"], "ibot": ["method=ibot"]},
    "ablations": {
        "default": [],
        "cls_only": ["loss.patch_weight=0"], "mim_only": ["loss.cls_weight=0"],
        "judges3": ["loss.cls.num_judges=3"], "judges1": ["loss.cls.num_judges=1"],
        "onehot": ["loss.cls.label_mode=onehot"],
        "wide_soft": ["model.head_out_dim=256"],
        "wide_onehot": ["model.head_out_dim=256", "loss.cls.label_mode=onehot"],
    },
}
DEFAULT_SEEDS = {"methods": [0, 1, 2], "ablations": [0, 1]}
DOCS = {"methods": ROOT / "docs" / "benchmarks.md", "ablations": ROOT / "docs" / "ablations.md"}
DONE = "grid_pretrain.json"
SEGMENTS = "grid_segments.json"
DIAG_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version, threads and the training device of this process's machine."""
    import torch

    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device}


def schedule_overrides(args: argparse.Namespace, base: list[str]) -> list[str]:
    """``trainer.time_budget=B`` (``--budget``) or a schedule of ``--steps`` optimizer steps (epochs from the
    train split's batches per epoch, lr warm-up the config's fraction of the schedule)."""
    if args.steps is None:
        return [f"trainer.time_budget={args.budget}"]
    from sove.config import load_config
    from sove.train.builders import build_train_dataset

    cfg = load_config(args.config, base)
    per_epoch = len(build_train_dataset(cfg)) // cfg.optim.batch_size
    epochs = args.steps / per_epoch
    warmup = cfg.optim.warmup_epochs / cfg.optim.epochs * epochs
    return [f"optim.epochs={epochs!r}", f"optim.warmup_epochs={warmup!r}"]


def sove_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sove", *args]


#: signals the grid passes on to the running child: SIGINT / SIGTERM as they are (``sove pretrain`` stops
#: after the current step with a checkpoint; a second SIGINT stops it at once), SIGHUP (the terminal closed)
#: as SIGTERM. The third signal kills the child's process group (a child stuck where it cannot react).
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
KILL_AFTER = 3


class Stopped(SystemExit):
    """The grid was stopped by a signal while a child ran; exit status 128 + signum."""


def run_child(cmd: list[str]) -> tuple[int, int | None]:
    """Run ``cmd`` to its end; returns its exit status and the first signal the grid received meanwhile (or None).

    The child runs in its own session, so Ctrl-C in the terminal reaches the grid only, and the grid passes
    every SIGINT / SIGTERM / SIGHUP on to the child (:data:`FORWARDED`; one that arrives while the child
    starts is passed on once it exists) and waits for it; the :data:`KILL_AFTER`-th signal kills the child's
    process group. (With ``subprocess.run`` a Ctrl-C killed the child 0.25 s later with SIGKILL: ``sove
    pretrain`` had no time to write its stop checkpoint, and the steps since the last periodic one were
    lost.) A signal the grid ignores (``nohup``, ``cmd &`` in a script) stays ignored.
    """
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if proc is not None and proc.poll() is None:
            if len(received) >= KILL_AFTER:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(FORWARDED[signum])

    previous = {}
    for sig in FORWARDED:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, forward)
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        if received:  # arrived before the child existed
            proc.send_signal(FORWARDED[received[0]])
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc, (received[0] if received else None)


def timed(cmd: list[str], log: list[str]) -> float:
    """Run ``cmd`` (output passed through), append its command line to ``log``; its wall seconds.

    Raises:
        Stopped: the grid received a signal meanwhile (passed on to the command, which was waited for).
        SystemExit: the command failed (its exit status and command line are printed).
    """
    seconds, rc, sig = timed_status(cmd, log)
    check(rc, sig, log[-1])
    return seconds


def timed_status(cmd: list[str], log: list[str]) -> tuple[float, int, int | None]:
    """:func:`timed` without the checks: wall seconds, exit status, signal received (see :func:`run_child`)."""
    log.append(shlex.join(["sove"] + cmd[3:]))
    print(f"[grid] $ {log[-1]}", flush=True)
    start = time.perf_counter()
    rc, sig = run_child(cmd)
    return time.perf_counter() - start, rc, sig


def check(rc: int, sig: int | None, command: str) -> None:
    """Raise :class:`Stopped` when a signal stopped the grid, SystemExit when the command failed."""
    if sig is not None:
        print(f"[grid] stopped by {signal.Signals(sig).name} (exit status of the command: {rc}); finished cells "
              "are kept and an interrupted pretraining keeps its checkpoint: run the same grid command again to "
              "resume", file=sys.stderr, flush=True)
        raise Stopped(128 + sig)
    if rc != 0:
        raise SystemExit(f"[grid] failed with exit status {rc}: {command}")


def record_segment(run_dir: Path, seconds: float, rc: int, command: str, resume: bool) -> list[dict[str, Any]]:
    """Append one pretraining segment (wall seconds, exit status, command, whether it resumed) to
    ``RUN/grid_segments.json`` (started anew by a fresh run) and return them all: a cell interrupted and
    resumed is timed in full."""
    path = run_dir / SEGMENTS
    segments = json.loads(path.read_text()) if resume and path.is_file() else []
    segments.append({"wall_s": seconds, "exit_status": rc, "command": command, "resume": resume})
    if run_dir.is_dir():
        write_json(path, segments)
    return segments


def diagnostics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with SOVE's concept diagnostics at :data:`DIAG_POINTS` of training
    (step, concept_purity, judge_weight/*, judge_cos/*, loss/loss); empty for DINO / iBOT."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("judge_weight/mean") or r.get("concept_purity")]
    keys = ("step", "loss/loss") + tuple(k for k in (rows[0] if rows else {}) if k.startswith(("judge_", "concept_")))
    picked = sorted({round(f * (len(rows) - 1)) for f in DIAG_POINTS}) if rows else []
    return [{k: float(rows[i][k]) for k in keys if rows[i].get(k)} for i in picked]


def pretrain_summary(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``grid_pretrain.json`` keeps of a finished pretraining's segments (:func:`record_segment`):
    the summed wall seconds, whether it was resumed, its first command, the per-segment seconds and whether
    they cover the whole run (not when the first timed segment is a resume: the grid did not time the
    segment before it)."""
    complete = not segments[0]["resume"]
    return {"wall_s": sum(s["wall_s"] for s in segments), "resumed": len(segments) > 1 or not complete,
            "command": segments[0]["command"], "segments": [s["wall_s"] for s in segments],
            "wall_complete": complete}


def pretrain_command(args: argparse.Namespace, setting: str, seed: int, run_dir: Path) -> list[str] | None:
    """The cell's ``sove pretrain`` command: None when it finished earlier (``grid_pretrain.json``),
    ``--resume RUN`` when it has a checkpoint (interrupted), else a fresh run (``--overwrite``: a run
    directory without a checkpoint holds nothing to keep)."""
    if (run_dir / DONE).is_file():
        return None
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return sove_cmd("pretrain", "--resume", str(run_dir))
    base = list(args.recipe) + GRIDS[args.grid][setting] + list(args.overrides)
    return sove_cmd("pretrain", "--config", args.config, "--overwrite", *base, *schedule_overrides(args, base),
                    f"trainer.seed={seed}", f"trainer.out_dir={run_dir.parent}", f"trainer.name={run_dir.name}",
                    "trainer.progress=false")


def run_cell(args: argparse.Namespace, setting: str, seed: int) -> dict[str, Any]:
    """Pretrain (or resume) one cell and evaluate it; returns the result (not yet written)."""
    name = f"{setting}__seed{seed}"
    run_dir = Path(args.work_dir) / args.grid / name
    commands: list[str] = []
    cmd = pretrain_command(args, setting, seed, run_dir)
    if cmd is None:
        pre = json.loads((run_dir / DONE).read_text())
        print(f"[grid] {args.grid}/{name}: pretraining finished earlier, evaluations only", flush=True)
    else:
        seconds, rc, sig = timed_status(cmd, commands)
        segments = record_segment(run_dir, seconds, rc, commands[-1], resume="--resume" in cmd)
        if rc == 0:  # finished, even when a signal came during its last step
            pre = pretrain_summary(segments)
            (run_dir / DONE).write_text(json.dumps(pre, indent=2))
        check(rc, sig, commands[-1])
    device = ["--device", "cuda"] if machine()["device"] != "cpu" else []
    knn_s = timed(sove_cmd("eval", "knn", "--run", str(run_dir), *device), commands)
    lin_s = timed(sove_cmd("eval", "linear", "--run", str(run_dir), "--epochs", str(args.linear_epochs), *device),
                  commands)
    from sove.run import CHECKPOINT_DIR, checkpoint_step

    knn = json.loads((run_dir / "eval" / "knn.json").read_text())
    lin = json.loads((run_dir / "eval" / "linear.json").read_text())
    return {
        "grid": args.grid, "setting": setting, "seed": seed, "config": args.config, "recipe": list(args.recipe),
        "overrides": GRIDS[args.grid][setting], "extra_overrides": list(args.overrides), "budget": args.budget,
        "steps_asked": args.steps,
        "pretrain_command": pre["command"], "pretrain_resumed": pre["resumed"], "commands": commands,
        "pretrain_segments_s": pre.get("segments", [pre["wall_s"]]),
        "pretrain_wall_complete": pre.get("wall_complete", not pre["resumed"]),
        "machine": machine(), "run_dir": str(run_dir),
        "wall_s": {"pretrain": pre["wall_s"], "knn": knn_s, "linear": lin_s},
        "steps": checkpoint_step(run_dir / CHECKPOINT_DIR / "last.pt"),
        "knn": {"top1": knn["top1"], "best_k": knn["best_k"], "best_top1": knn["best_top1"]},
        "linear": {"top1": lin["top1"], "best_lr": lin["best_lr"], "epochs": lin["epochs"]},
        "diagnostics": diagnostics(run_dir),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_grid(args: argparse.Namespace, cell: Callable[[argparse.Namespace, str, int], dict[str, Any]] = run_cell
             ) -> list[Path]:
    """Every (setting, seed) of ``args.grid`` (``--only`` settings) whose JSON is missing; returns the JSON paths."""
    settings = args.only or list(GRIDS[args.grid])
    unknown = [s for s in settings if s not in GRIDS[args.grid]]
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {unknown} of grid {args.grid}; "
                         f"choose from {list(GRIDS[args.grid])}")
    paths = []
    for seed in args.seeds:
        for setting in settings:
            path = Path(args.results) / args.grid / f"{setting}__seed{seed}.json"
            paths.append(path)
            if path.is_file():
                print(f"[grid] {args.grid}/{path.stem}: done ({path}), skipped", flush=True)
                continue
            start = time.perf_counter()
            write_json(path, cell(args, setting, seed))
            print(f"[grid] {args.grid}/{path.stem}: written {path} ({(time.perf_counter() - start) / 60:.1f} min)",
                  flush=True)
    return paths


def tables(results: Path, docs: dict[str, Path]) -> None:
    """Regenerate the tables between the ``<!-- grid:NAME -->`` markers of each doc from the JSON files."""
    for grid, doc in docs.items():
        found = grid_tables.load_results(results, grid)
        if grid == "methods":
            body = grid_tables.methods_markdown(found, len(DEFAULT_SEEDS[grid]))
        else:
            body = grid_tables.ablations_markdown(found, len(DEFAULT_SEEDS[grid]), GRIDS[grid])
        n = sum(len(c) for c in found.values())
        header = f"Generated by `python benchmarks/grid.py tables` from {n} file(s) in `benchmarks/results/{grid}/`."
        doc.write_text(grid_tables.replace_between_markers(doc.read_text(), grid, header + "\n\n" + body, doc))
        print(f"[grid] {doc}: {grid} table from {n} result file(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate the missing cells of a grid")
    r.add_argument("--grid", required=True, choices=list(GRIDS))
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="default: methods 0 1 2, ablations 0 1")
    r.add_argument("--budget", default=None, help="wall clock per pretraining (methods default 20min)")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps per pretraining (ablations default 1170)")
    r.add_argument("--only", nargs="+", default=None, metavar="SETTING", help="only these settings of the grid")
    r.add_argument("--work-dir", default="runs/grid", help="run directories (<work-dir>/<grid>/<setting>__seed<S>)")
    r.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="result JSON root")
    r.add_argument("--config", default=CONFIG)
    r.add_argument("--linear-epochs", type=int, default=50)
    r.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every cell (smoke tests)")
    t = sub.add_parser("tables", help="regenerate the doc tables from the result JSON files")
    t.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.command == "run":
        if args.budget is not None and args.steps is not None:
            p.error("--budget and --steps exclude each other")
        if args.budget is None and args.steps is None:
            args.budget, args.steps = ("20min", None) if args.grid == "methods" else (None, 1170)
        args.seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.grid]
        args.recipe = RECIPE if args.config == CONFIG else []
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        run_grid(args)
    else:
        tables(Path(args.results), DOCS)


if __name__ == "__main__":
    main()
