"""The paper recipe on one GPU: largest batch, img/s, peak memory and the step's time split; SOVE vs DINO;
the input pipeline; run-to-run determinism. Writes JSON (after every section) and a markdown report.

    python benchmarks/gpu_recipe.py --out OUT                  # ~6 min on one H200 (benchmarks/gpu_check.sh)
    python benchmarks/gpu_recipe.py --out OUT --smoke          # CPU, tiny sizes: checks the script runs

Model: ``imagenet_vit_small`` (ViT-S/16, 2 x 224 + 10 x 96 px crops, E_C 65536 / K 8192 / k 8 / 4 tasks,
E_P 8192 / K 512, bf16 autocast on CUDA) and ``method=dino`` on the same config. The steps are the
real ones (``sove.train.trainer.Trainer.training_step``: method forward, objective, backward,
per-tensor clipping, AdamW, EMA, enqueue) on one loader batch of generated 500 x 375 JPEGs, tiled to
the batch size, so the model's cost is measured without the input pipeline:

1. batch search: the candidate batch sizes in order, 2 steps each, until one runs out of GPU memory
   or leaves less than ``--headroom`` of it free at its peak;
2. at the largest batch that fits, per method: ``--steps`` steps with a synchronising phase timer (the
   time split: forward / objective, concept selection inside it / backward / optimizer = clipping +
   AdamW + EMA / enqueue) and ``--free-steps`` untimed steps (img/s of the free-running step); after
   the input sections, SOVE again with TF32 matmuls allowed and half the steps (``sove_tf32``: the
   objective runs in fp32, autocast off);
3. the input pipeline alone: steady-state images/s of the loader path, the device path and a
   DINO-style reference (``benchmarks/data_speed.py``) with one DataLoader worker per core, the first
   2 x workers batches not counted (start-up and the prefetch queue);
4. end-to-end: ``Trainer.fit`` on the JPEG folder with each path; the share of a step spent waiting
   for the next batch, the first 2 x workers steps not counted (the GPU idles then: the timer
   synchronises before each wait; for the device path the wait includes making the views on the GPU);
5. determinism: the same 3-step ViT-S/16 run (batch 32) twice, with and without
   ``trainer.deterministic``: the largest teacher-weight difference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_speed import datasets, make_jpegs  # noqa: E402

from sove.config import load_config  # noqa: E402
from sove.run import prepare_run_dir  # noqa: E402
from sove.train.trainer import Trainer  # noqa: E402

PHASES = ("forward", "objective", "concept selection", "backward", "optimizer", "enqueue")


class SyncTimer:
    """``Trainer.timer``: seconds per phase name, CUDA synchronised at both ends of each phase."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.total, self.count = device, defaultdict(float), defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[name] += time.perf_counter() - start
            self.count[name] += 1


def _shard(args: tuple[str, int, int]) -> None:
    folder, count, seed = args
    make_jpegs(Path(folder), count, seed=seed)


def jpeg_folder(root: Path, count: int, workers: int) -> Path:
    """``count`` generated 500 x 375 JPEGs (``data_speed.make_jpegs``) in ``root/partKK`` folders, made in parallel."""
    per = -(-count // workers)
    jobs = [(str(root / f"part{k:02d}"), min(per, count - k * per), k) for k in range(workers) if count > k * per]
    with Pool(len(jobs)) as pool:
        pool.map(_shard, jobs)
    return root


def overrides(args: argparse.Namespace, folder: Path, work: Path, name: str, method: str) -> list[str]:
    base = [f"data.root={folder}", f"data.num_workers={args.workers}", f"trainer.out_dir={work}",
            f"trainer.name={name}", f"method={method}", "trainer.progress=false", "trainer.log_every=1000000",
            "trainer.checkpoint_every=1000000", "trainer.loggers=[csv]", f"optim.batch_size={args.load_batch}"]
    if args.smoke:  # tiny model and feature sets: the script's plumbing on a CPU
        base += ["model.arch=vit_tiny", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
                 "model.head_hidden_dim=32", "model.head_out_dim=16", "data.global_crop_size=32",
                 "data.local_crop_size=16", "data.num_local_crops=2", "loss.cls_feature_set_size=256",
                 "loss.patch_feature_set_size=128", "loss.cls.num_anchors=32", "loss.patch.num_anchors=16",
                 "peers.num_prototypes=64", "trainer.precision=32-true"]
    return base


def tile(batch: dict[str, Any], size: int, device: torch.device) -> dict[str, Any]:
    """``batch`` repeated along the batch dimension to ``size`` rows (distinct indices), on ``device``."""
    b = batch["index"].shape[0]
    reps = -(-size // b)

    def rep(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat([x] * reps, dim=dim).narrow(dim, 0, size).to(device)

    return {"crops": [rep(c) for c in batch["crops"]], "masks": rep(batch["masks"], 1),
            "index": torch.arange(size, device=device), "label": torch.zeros(size, dtype=torch.long, device=device),
            "skipped": []}


def set_tf32(on: bool) -> bool:
    """Allow TF32 for fp32 matmuls (``fp32_precision`` where torch has it, else ``allow_tf32``); returns
    whether it was allowed before."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision == "tf32"
        matmul.fp32_precision = "tf32" if on else "ieee"
        return before
    before, matmul.allow_tf32 = matmul.allow_tf32, on
    return before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, batch: dict[str, Any], steps: int, timer: SyncTimer | None) -> float:
    """Seconds of ``steps`` training steps on ``batch`` (schedules advance as in training)."""
    trainer.timer = timer
    sync(trainer.fabric.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.training_step(batch)
        trainer.step += 1
    sync(trainer.fabric.device)
    trainer.timer = None
    return time.perf_counter() - start


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_trainer(args, folder: Path, work: Path, method: str) -> tuple[Trainer, dict[str, Any]]:
    cfg = load_config("imagenet_vit_small", overrides(args, folder, work, f"model_{method}", method))
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=True))
    sample = next(iter(trainer.loader))  # one real loader batch (moved to the device by Fabric)
    return trainer, {k: (v.cpu() if torch.is_tensor(v) else [c.cpu() for c in v] if k == "crops" else v)
                     for k, v in sample.items()}


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory (torch's allocator, cuBLAS or cuDNN)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def batch_search(args, folder: Path, work: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The candidate batches in order, 2 steps each, until one runs out of memory or leaves less than
    ``--headroom`` of the GPU's memory free at its peak (the longer runs after it must not fail)."""
    trainer, sample = model_trainer(args, folder, work, "sove")
    device = trainer.fabric.device
    total = torch.cuda.get_device_properties(device).total_memory / 2**20 if device.type == "cuda" else None
    found: dict[str, Any] = {"rows": [], "largest": None, "total_mib": total}
    results["batch_search"] = found  # rows appear as they are measured (saved if a later batch crashes)
    try:
        for size in args.batches:
            batch = None
            try:
                batch = tile(sample, size, device)
                reset_peak(device)
                run_steps(trainer, batch, 1, None)
                secs = run_steps(trainer, batch, 1, None)
                peak = peak_mib(device)
                fits = total is None or peak <= (1 - args.headroom) * total
                found["rows"].append({"batch": size, "fits": fits, "s_per_step": secs, "peak_mib": peak})
                print(f"[batch search] {size}: {secs:.3f} s/step, peak {peak} MiB, fits {fits}", flush=True)
                if not fits:
                    break
                found["largest"] = size
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                found["rows"].append({"batch": size, "fits": False, "error": str(e).splitlines()[0][:200]})
                print(f"[batch search] {size}: out of memory", flush=True)
                break
            finally:
                del batch
                trainer.optimizer.zero_grad(set_to_none=True)
                free(device)
    finally:
        trainer.close()
        del trainer
        free(device)
    return found


def method_speed(args, folder: Path, work: Path, method: str, size: int) -> dict[str, Any]:
    trainer, sample = model_trainer(args, folder, work, method)
    device = trainer.fabric.device
    try:
        batch = tile(sample, size, device)
        run_steps(trainer, batch, 2, None)  # warm-up
        reset_peak(device)
        timer = SyncTimer(device)
        timed = run_steps(trainer, batch, args.steps, timer)
        free_secs = run_steps(trainer, batch, args.free_steps, None)
        precision = trainer.fabric.strategy.precision.precision
    finally:
        trainer.close()
        del trainer
        free(device)
    phases = {k: v / args.steps for k, v in timer.total.items()}
    step = sum(v for k, v in phases.items() if k != "concept selection")  # nested in objective
    out = {"method": method, "batch": size, "steps_timed": args.steps, "steps_free": args.free_steps,
           "s_per_step_timed": timed / args.steps, "s_per_step_free": free_secs / args.free_steps,
           "img_per_s_free": size * args.free_steps / free_secs, "img_per_s_timed": size * args.steps / timed,
           "phases_s_per_step": phases, "phase_sum_s_per_step": step, "peak_mib": peak_mib(device),
           "precision": precision}
    if "concept selection" in phases:
        out["concept_selection_share"] = phases["concept selection"] / step
    print(f"[{method}] batch {size}: {out['img_per_s_free']:.0f} img/s free-running, "
          f"{out['s_per_step_free']:.3f} s/step, peak {out['peak_mib']} MiB; phases {phases}", flush=True)
    return out


def pipeline_alone(args, folder: Path, device: torch.device) -> dict[str, Any]:
    """Images/s of each input pipeline with ``--workers`` DataLoader workers (no model), in steady
    state: the first 2 x workers batches (start-up, the prefetch queue filling) are not counted."""
    from torch.utils.data import DataLoader

    from data_speed import collate_reference
    from sove.data import collate_views

    sets = datasets(["data.source=folder", f"data.root={folder}", "data.num_channels=3"])
    collate = {"loader": collate_views, "reference": collate_reference, "device": sets["device"].collate}
    skip, out = 2 * args.workers, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers hold the cores
    try:
        for name in ("reference", "loader", "device"):
            loader = DataLoader(sets[name], batch_size=args.pipeline_batch, shuffle=True, collate_fn=collate[name],
                                num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)
            stamps = []
            for batch in loader:
                if name == "device":
                    sets["device"].augment_batch(batch, device)
                sync(device)
                stamps.append(time.perf_counter())
            counted = len(stamps) - 1 - skip
            if counted < args.workers:
                raise ValueError(f"--jpegs / --pipeline-batch give {len(stamps)} batches; need > {skip + args.workers}")
            out[name] = counted * args.pipeline_batch / (stamps[-1] - stamps[skip])
    finally:
        torch.set_num_threads(threads)
    print(f"[pipeline alone] steady-state images/s with {args.workers} workers: {out}", flush=True)
    return {"images": len(sets["loader"]), "batch": args.pipeline_batch, "workers": args.workers,
            "batches_not_counted": skip, "img_per_s": out, "views_on": str(device)}


class DataClock(SyncTimer):
    """Synchronising timer that also records when each ``data`` phase starts (steps = differences)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.starts: list[float] = []
        self.waits: list[float] = []

    @contextmanager
    def __call__(self, name: str):
        if name != "data":
            yield
            return
        self.sync()
        start = time.perf_counter()
        self.starts.append(start)
        try:
            yield
        finally:
            self.waits.append(time.perf_counter() - start)


def end_to_end(args, folder: Path, work: Path, path: str, size: int) -> dict[str, Any]:
    cfg = load_config("imagenet_vit_small", overrides(args, folder, work, f"e2e_{path}", "sove") + [
        f"optim.batch_size={size}", f"data.augment_on={path}", f"trainer.max_steps={args.e2e_steps}"])
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=True))
    device = trainer.fabric.device
    try:
        trainer.timer = clock = DataClock(device)
        trainer.fit()
    finally:
        trainer.close()
        del trainer
        free(device)
    import numpy as np

    skip = 2 * args.workers  # start-up: the prefetch queue fills, then drains; steady state after it
    steps = np.diff(clock.starts)[skip:]
    waits = np.asarray(clock.waits[skip:skip + len(steps)])
    if len(steps) < args.workers:
        raise ValueError(f"--e2e-steps {args.e2e_steps}: need more than {skip + args.workers} steps")
    out = {"path": path, "batch": size, "steps": int(len(steps)), "steps_not_counted": skip,
           "s_per_step_median": float(np.median(steps)),
           "data_wait_s_median": float(np.median(waits)), "data_wait_share": float(waits.sum() / steps.sum()),
           "gpu_busy_share": float(1 - waits.sum() / steps.sum()),
           "img_per_s_mean_step": float(size * len(steps) / steps.sum()), "workers": args.workers}
    print(f"[end to end] {path}: {out}", flush=True)
    return out


def determinism(args, folder: Path, work: Path) -> dict[str, Any]:
    """The same short run twice, with and without ``trainer.deterministic``, at the recipe's sizes
    (ViT-S/16, 224 / 96 px crops, batch ``--det-batch``, ``--det-steps`` steps; in ``--smoke`` the tiny
    model): the largest difference between the two teachers."""
    from sove.api import pretrain
    from sove.train.checkpoint import load_checkpoint

    out = {}
    for det in (False, True):
        weights = []
        for rep in range(2):
            name = f"det{int(det)}_{rep}"
            cfg = load_config("imagenet_vit_small", overrides(args, folder, work, name, "sove") + [
                f"optim.batch_size={args.det_batch}", f"trainer.max_steps={args.det_steps}",
                f"trainer.deterministic={det}", "data.num_workers=4"])
            pretrain(cfg)
            weights.append(load_checkpoint(work / name / "checkpoints" / "last.pt")["teacher"])
        diff = max(float((weights[0][k].double() - weights[1][k].double()).abs().max()) for k in weights[0])
        out[f"deterministic={str(det).lower()}"] = {"max_abs_teacher_diff": diff, "bit_identical": diff == 0.0}
    out["batch"], out["steps"] = args.det_batch, args.det_steps
    print(f"[determinism] {out}", flush=True)
    return out


def report(results: dict[str, Any]) -> list[str]:
    env = results.get("env", {})
    lines = [f"Device: {env.get('device')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"{env.get('cpu_count')} CPU cores.", ""]
    search = results.get("batch_search")
    if search:
        lines += ["| batch | fits | s/step | peak GPU memory (MiB) |", "|---|---|---|---|"]
        for r in search["rows"]:
            lines.append(f"| {r['batch']} | {'yes' if r['fits'] else 'no (out of memory)'} | "
                         f"{r.get('s_per_step', float('nan')):.3f} | {r.get('peak_mib') or '–'} |")
        lines.append("")
    speeds = [dict(results[k], method=k) for k in ("sove", "dino", "sove_tf32")
              if isinstance(results.get(k), dict) and "batch" in results[k]]
    if speeds:
        lines += ["Phase times come from the synchronised timed steps (their sum is the timed step); img/s and "
                  "s/step from the free-running steps.", "",
                  "| method | batch | img/s (free-running) | s/step (free-running) | s/step (timed) | peak GPU memory "
                  "(GiB) | " + " | ".join(PHASES) + " |", "|---" * (6 + len(PHASES)) + "|"]
        for s in speeds:
            ph, step = s["phases_s_per_step"], s["phase_sum_s_per_step"]
            cells = [f"{1e3 * ph[p]:.1f} ms ({100 * ph[p] / step:.1f}%)" if p in ph else "–" for p in PHASES]
            peak = "–" if s["peak_mib"] is None else f"{s['peak_mib'] / 1024:.1f}"
            lines.append(f"| {s['method']} | {s['batch']} | {s['img_per_s_free']:.0f} | {s['s_per_step_free']:.3f} | "
                         f"{s['s_per_step_timed']:.3f} | {peak} | " + " | ".join(cells) + " |")
        lines.append("")
    for key in ("pipeline_alone", "end_to_end", "determinism"):
        if key in results:
            lines += [f"{key}: `{json.dumps(results[key])}`", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_recipe.json and gpu_recipe.md")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    p.add_argument("--steps", type=int, default=50, help="timed steps per method (synchronising phase timer)")
    p.add_argument("--free-steps", type=int, default=20, help="untimed steps per method (free-running img/s)")
    p.add_argument("--jpegs", type=int, default=8192)
    p.add_argument("--load-batch", type=int, default=64, help="the loader batch that is tiled to each batch size")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--headroom", type=float, default=0.1, help="batch search: GPU memory left free at the peak")
    p.add_argument("--pipeline-batch", type=int, default=128, help="pipeline alone: batch (all --jpegs images)")
    p.add_argument("--e2e-batch", type=int, default=128, help="end-to-end batch (capped at the largest that fits)")
    p.add_argument("--e2e-steps", type=int, default=96, help="end-to-end steps (the first 2 x workers not counted)")
    p.add_argument("--det-batch", type=int, default=32)
    p.add_argument("--det-steps", type=int, default=3)
    p.add_argument("--sections", nargs="+",
                   default=["search", "sove", "dino", "pipeline", "e2e", "sove_tf32", "determinism"])
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU check of the script)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {"env": {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()}}}

    def save() -> None:
        (args.out / "gpu_recipe.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_recipe.md").write_text("\n".join(report(results)) + "\n")

    def section(name: str, fn, *a) -> Any:
        start = time.perf_counter()
        try:
            results[name] = fn(*a)
        except Exception as e:  # one failing section must not lose the others' figures (or its own so far)
            traceback.print_exc()
            partial = results.get(name) if isinstance(results.get(name), dict) else {}
            results[name] = {**partial, "error": f"{type(e).__name__}: {e}"[:2000]}
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
        save()
        return results[name]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = jpeg_folder(tmp / "jpegs", args.jpegs, max(1, min(args.workers, 16)))
        results.setdefault("seconds", {})["jpegs"] = time.perf_counter() - start
        largest = args.batches[0]
        if "search" in args.sections:
            found = section("batch_search", batch_search, args, folder, tmp / "runs", results)
            largest = found.get("largest") or largest
        for method in ("sove", "dino"):
            if method in args.sections:
                section(method, method_speed, args, folder, tmp / "runs", method, largest)
        if "pipeline" in args.sections:
            section("pipeline_alone", pipeline_alone, args, folder, device)
        if "e2e" in args.sections:
            size = min(largest, args.e2e_batch)
            results["end_to_end"] = {}
            for path in ("loader", "device"):
                section("_e2e", end_to_end, args, folder, tmp / "runs", path, size)
                results["end_to_end"][path] = results.pop("_e2e")
            save()
        if "sove_tf32" in args.sections:  # the objective's fp32 products (similarities, concept
            before = set_tf32(True)         # probabilities) on TF32 tensor cores; half the steps
            section("sove_tf32", method_speed, argparse.Namespace(**{**vars(args), "steps": max(1, args.steps // 2),
                    "free_steps": max(1, args.free_steps // 2)}), folder, tmp / "runs", "sove", largest)
            set_tf32(before)
        if "determinism" in args.sections:
            section("determinism", determinism, args, folder, tmp / "runs")
    save()
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
