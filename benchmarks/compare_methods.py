"""SOVE vs DINO vs iBOT at the same backbone, data, optimiser, schedules and wall-clock budget.

    pip install -e ".[peers]"        # lightly: the peers' objectives (DINOLoss, IBOTPatchLoss, DINOProjectionHead)
    python benchmarks/compare_methods.py --config fashion_mnist_tiny --budget-minutes 10 --out docs/compare.md
    python benchmarks/compare_methods.py --smoke data.source=folder data.root=DIR data.test_root=DIR ...  # CI

What is shared: the trainer (``sove.train.trainer.Trainer``: Fabric, multi-crop + masks, sampler,
AdamW groups, per-tensor clipping, lr / weight-decay / momentum / teacher-temperature schedules,
EMA teacher), the ViT backbone and the head MLP (``model.head_hidden_dim`` -> ``head_out_dim``).
What differs is only the objective, the config's ``method=`` (:mod:`sove.method`; each run here is
``sove pretrain method=M``):

* **SOVE** (ours): Eq. 2 on E_C concepts + Eq. 4 on E_P concepts; the head output is the embedding.
* **DINO**: lightly's ``DINOProjectionHead`` (the same MLP, ``head_out_dim`` bottleneck, then a
  weight-normalised layer to ``--num-prototypes`` = ``peers.num_prototypes`` logits) and lightly's
  ``DINOLoss`` (centering, all cross-view pairs). No masking.
* **iBOT**: the DINO CLS loss on masked global views + lightly's ``IBOTPatchLoss`` on the masked
  tokens (the same masks as SOVE, shared head), weights ``loss.cls_weight`` / ``loss.patch_weight``.

The peers use the same teacher temperature schedule, student temperature and teacher momentum
as SOVE (``fashion_mnist_tiny``: 0.04 / 0.1 / 0.99 -> 1); the DINO last layer is not frozen in the
first epoch (the budget is ~1-2 epochs).

Protocol: first each method runs a few steps in a fresh child process (its seconds per step and
peak memory, measured alone); from that step time its schedule is sized to the budget (the lr
warm-up is the same fraction of the schedule as in the config). Then the three trainers run
alternately in ``--slice-seconds`` slices, so machine drift hits all alike, until each has used its
budget or finished its schedule. After every slice a method's schedules are re-sized to the steps
its measured pace fits into the budget left (:func:`sove.train.budget.resize_to_budget`): the few calibration steps
misjudged the long-run step time by -11% to +20% on the 2-core machine, which either ended a schedule
before the budget or cut its cosine tail off; re-sized, each run uses the budget and ends annealed.
Finally the teacher backbones are evaluated with the k-NN
protocol of ``sove eval knn`` on the full train / test splits, next to raw pixels and the
untrained backbone. The step split is measured during the alternating run: ``network`` = forward
and backward of backbone + head, ``objective`` = loss forward (SOVE: concept selection included)
+ feature-set enqueue; the objective's own backward share is inside ``backward``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sove.config import load_config
from sove.errors import SoveError
from sove.eval.features import eval_splits, extract_features, pixel_features, random_init_backbone
from sove.eval.knn import knn_on_splits
from sove.train.budget import resize_to_budget
from sove.run import prepare_run_dir
from sove.train.builders import build_train_dataset
from sove.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import Timer  # noqa: E402  (per-phase wall seconds, CUDA-synchronised)

METHODS = ("sove", "dino", "ibot")
PHASES = ("data", "forward", "objective", "backward", "optimizer", "enqueue")


def make_trainer(cfg, run_dir: Path, dataset) -> Trainer:
    """The trainer of ``cfg.method`` in ``run_dir`` (created), exactly as ``sove pretrain`` trains it minus
    SOVE's purity diagnostic (it would move the next step's concept selection out of the timed objective)."""
    prepare_run_dir(cfg, overwrite=True)
    trainer = Trainer(cfg, run_dir, dataset)
    trainer.labels = None  # no concept purity
    return trainer


def method_config(args: argparse.Namespace, method: str, epochs: float | None = None, name: str | None = None):
    """The shared config with ``method=``, this method's run name and, if given, a schedule of ``epochs``."""
    base = load_config(args.config, args.overrides)
    extra = [f"method={method}", f"trainer.out_dir={args.work_dir}",
             f"trainer.name={name or method}", "trainer.progress=false",
             "trainer.checkpoint_every=1000000000", "trainer.keep_checkpoints=0", "eval.knn_every_epochs=0"]
    if getattr(args, "num_prototypes", None) is not None:
        extra.append(f"peers.num_prototypes={args.num_prototypes}")
    if epochs is not None:
        frac = base.optim.warmup_epochs / base.optim.epochs
        extra += [f"optim.epochs={epochs}", f"optim.warmup_epochs={frac * epochs}"]
    return load_config(args.config, list(args.overrides) + extra)


def persistent_mib(trainer: Trainer) -> float:
    """MiB held between steps: student, teacher, optimizer state, the method's state (feature sets, centers)."""
    tensors = list(trainer.student_module.state_dict().values()) + list(trainer.teacher.state_dict().values())
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    tensors += list(trainer.method.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _calibrate_child(args: argparse.Namespace, method: str, steps: int, queue) -> None:
    """Child process: build ``method``'s trainer, run 1 + ``steps`` steps; report s/step and memory."""
    try:
        cfg = method_config(args, method, name=f"calibrate_{method}")
        trainer = make_trainer(cfg, Path(args.work_dir) / f"calibrate_{method}", build_train_dataset(cfg))
        trainer.fit(deadline=0.0)  # warm-up step
        device = trainer.fabric.device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _rss_now_mib()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.fit(deadline=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
        queue.put({"method": method, "s_per_step": seconds, "step_peak_mib": peak,
                   "persistent_mib": persistent_mib(trainer), "batches_per_epoch": trainer.sampler.batches_per_epoch})
    except BaseException as e:  # report to the parent instead of hanging it
        queue.put({"method": method, "error": f"{type(e).__name__}: {e}"})


def calibrate(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Run :func:`_calibrate_child` in a fresh process (so its peak memory is its own); in smoke
    mode in this process (faster; its memory figures then mean nothing)."""
    if args.smoke:
        import queue as queue_mod

        local: queue_mod.Queue = queue_mod.Queue()
        _calibrate_child(args, method, args.calibration_steps, local)
        result = local.get()
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_calibrate_child, args=(args, method, args.calibration_steps, queue))
        proc.start()
        result = queue.get()
        proc.join()
    if "error" in result:
        raise SoveError(f"calibration of {method} failed: {result['error']}")
    return result


def knn_of(backbone: torch.nn.Module, train, test, cfg, device) -> dict[str, Any]:
    """k-NN of ``sove eval knn`` (full splits of ``eval_splits``, ``eval.knn_k``) on a backbone's features;
    lists of unreadable images go to ``trainer.out_dir``."""
    train_f = extract_features(backbone, train, cfg.eval.batch_size, device, "train features")
    test_f = extract_features(backbone, test, cfg.eval.batch_size, device, "test features")
    return knn_on_splits(train_f, train, test_f, test, list(cfg.eval.knn_k), cfg.eval.knn_temperature,
                         cfg.trainer.out_dir)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; returns the results dict (also written as JSON next to ``--out``)."""
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    calib = {m: calibrate(args, m) for m in args.methods}
    for m in args.methods:
        c = calib[m]
        print(f"[calibrate] {m}: {c['s_per_step']:.3f} s/step alone, step peak {c['step_peak_mib']:.0f} MiB, "
              f"persistent {c['persistent_mib']:.1f} MiB", flush=True)
    if args.calibrate_only:
        dino = calib.get("dino", {}).get("s_per_step")
        return {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "calibration": calib,
                "sove_over_dino": calib["sove"]["s_per_step"] / dino - 1 if dino and "sove" in calib else None,
                "total_minutes": (time.perf_counter() - t_start) / 60}
    budget = args.budget_minutes * 60
    trainers, timers, used = {}, {}, {}
    dataset = None
    for m in args.methods:
        c = calib[m]
        steps = args.steps if args.steps else max(1, int(budget / c["s_per_step"]))
        cfg = method_config(args, m, epochs=steps / c["batches_per_epoch"])
        dataset = dataset if dataset is not None else build_train_dataset(cfg)
        trainers[m] = make_trainer(cfg, Path(args.work_dir) / m, dataset)
        timers[m] = Timer(trainers[m].fabric.device)
        trainers[m].timer = timers[m]
        used[m] = 0.0
        print(f"[schedule] {m}: {trainers[m].total_steps} steps ({cfg.optim.epochs:.3f} epochs)", flush=True)
    done = {m: False for m in args.methods}
    while not all(done.values()):
        for m in args.methods:
            if done[m]:
                continue
            tr = trainers[m]
            start = time.perf_counter()
            # The first slice is at most a tenth of the budget (so that an overestimated step time
            # cannot end the whole schedule before the first re-sizing).
            first = min(args.slice_seconds, budget / 10) if tr.step == 0 else args.slice_seconds
            slice_end = start + min(first, budget - used[m])
            if args.steps:  # fixed number of steps (smoke mode): no time limit
                slice_end = None
            finished = tr.fit(deadline=slice_end) is not None
            used[m] += time.perf_counter() - start
            done[m] = finished or used[m] >= budget
            if not done[m] and not args.steps:
                resize_to_budget(tr, used[m], budget)
            print(f"[train] {m}: step {tr.step}/{tr.total_steps}, {used[m] / 60:.1f} of "
                  f"{args.budget_minutes} min", flush=True)
    rows = {}
    cfg = trainers[args.methods[0]].cfg
    train, test = eval_splits(cfg)
    device = trainers[args.methods[0]].fabric.device
    for m in args.methods:
        tr = trainers[m]
        knn = knn_of(tr.teacher.backbone, train, test, cfg, device)
        sec = dict(timers[m].total)
        steps = max(tr.step, 1)
        images = tr.step * cfg.optim.batch_size
        rows[m] = {
            "steps": tr.step, "scheduled_steps": tr.total_steps, "minutes": used[m] / 60,
            "img_per_s": images / used[m] if used[m] else 0.0,
            "s_per_step": used[m] / steps, "s_per_step_alone": calib[m]["s_per_step"],
            "split_s": {p: sec.get(p, 0.0) / steps for p in PHASES},
            "step_peak_mib": calib[m]["step_peak_mib"], "persistent_mib": calib[m]["persistent_mib"],
            "knn_top1": knn["top1"], "knn_best_top1": knn["best_top1"], "knn_best_k": knn["best_k"],
        }
        print(f"[eval] {m}: k-NN top-1 {knn['best_top1']:.2f} (k={knn['best_k']})", flush=True)
    pix_train, center = pixel_features(train)
    pix_test, _ = pixel_features(test, center)
    pixels = knn_on_splits(pix_train, train, pix_test, test, list(cfg.eval.knn_k), cfg.eval.knn_temperature,
                           cfg.trainer.out_dir)
    rand = knn_of(random_init_backbone(cfg), train, test, cfg, device)
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "budget_minutes": args.budget_minutes,
              "slice_seconds": args.slice_seconds, "config": args.config,
              "num_prototypes": trainers[args.methods[0]].cfg.peers.num_prototypes,
              "overrides": list(args.overrides), "threads": torch.get_num_threads(), "device": str(device),
              "methods": rows, "pixels": {"knn_top1": pixels["top1"], "knn_best_top1": pixels["best_top1"]},
              "random_init": {"knn_top1": rand["top1"], "knn_best_top1": rand["best_top1"]},
              "num_train": len(train), "num_test": len(test),
              "total_minutes": (time.perf_counter() - t_start) / 60}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The comparison table (one row per method, then the two baselines)."""
    names = {"sove": "SOVE (ours)", "dino": "DINO (lightly)", "ibot": "iBOT (lightly)"}
    lines = [
        "| method | steps (scheduled) | img/s | s/step | data | network fwd | network bwd | objective "
        "(+ enqueue) | optimizer + EMA | step peak MiB | persistent MiB | k-NN top-1 (best k) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        s = r["split_s"]
        lines.append(
            f"| {names[m]} | {r['steps']} ({r['scheduled_steps']}) | {r['img_per_s']:.1f} | {r['s_per_step']:.3f} | "
            f"{s['data']:.3f} | {s['forward']:.3f} | {s['backward']:.3f} | {s['objective']:.3f} + {s['enqueue']:.3f} | "
            f"{s['optimizer']:.3f} | {r['step_peak_mib']:.0f} | {r['persistent_mib']:.1f} | "
            f"**{r['knn_best_top1']:.2f}** (k={r['knn_best_k']}) |")
    for key, label in (("random_init", "random init (same ViT, untrained)"), ("pixels", "raw pixels")):
        best = result[key]["knn_best_top1"]
        lines.append(f"| {label} | – | – | – | – | – | – | – | – | – | – | **{best:.2f}** |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist_tiny", help="preset name or YAML (shared by all methods)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget-minutes", type=float, default=10.0, help="training wall-clock budget per method")
    p.add_argument("--slice-seconds", type=float, default=60.0, help="alternation slice")
    p.add_argument("--num-prototypes", type=int, default=None,
                   help="DINO/iBOT head output width K (default: the config's peers.num_prototypes, 4096)")
    p.add_argument("--calibration-steps", type=int, default=8,
                   help="timed steps per method in the child process (3 overestimated the step time by 7-11%%)")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only the per-method step time and memory (each alone, in a child process); no training")
    p.add_argument("--steps", type=int, default=0, help="fixed steps per method instead of a time budget")
    p.add_argument("--work-dir", default=None, help="where the three runs are written (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the markdown table here (and the JSON next to it)")
    p.add_argument("--smoke", action="store_true",
                   help="CI mode: 1 step per method, 1 calibration step (use a tiny config via overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for all methods")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.calibration_steps = 1, 1
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="sove_compare_")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    if args.calibrate_only:
        table = "\n".join(["| method | s/step (alone, mean of the timed steps) | step peak MiB | persistent MiB |",
                           "|---|---|---|---|"] + [
            f"| {m} | {c['s_per_step']:.3f} | {c['step_peak_mib']:.0f} | {c['persistent_mib']:.1f} |"
            for m, c in result["calibration"].items()])
        if result["sove_over_dino"] is not None:
            table += f"\n\nSOVE step time / DINO step time - 1 = {100 * result['sove_over_dino']:+.1f}%"
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2))
        return result
    table = markdown(result)
    print(table)
    print(f"total {result['total_minutes']:.1f} min; command: {result['command']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
