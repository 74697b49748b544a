"""Speed and memory of one SOVE training step, split by phase; prints a markdown table.

    python benchmarks/step_speed.py --config fashion_mnist_tiny --steps 10
    python benchmarks/step_speed.py --config imagenet_vit_small --steps 3 optim.batch_size=8
    python benchmarks/step_speed.py --selection-only       # paper-size concept selection (E_C 65536, K 8192, k 8)

Inputs are generated tensors (no data loading), so the numbers are the model and the method's
cost alone. On a GPU (``--device cuda``) the backbone runs under bf16 autocast and the timers
synchronise; peak memory is ``torch.cuda.max_memory_allocated``. On the CPU peak memory is the
growth of the process's resident set size (ru_maxrss) over the run.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from sove.config import load_config, token_stride
from sove.data import build_mask_generator
from sove.method import FeatureSet, cls_loss, patch_loss
from sove.models import build_networks
from sove.train.optim import EMA, clip_per_tensor, param_groups
from sove.method.sove import build_sove_loss as build_loss


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.total = device, defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.total[name] += time.perf_counter() - start


def fake_batch(cfg, b: int, device: torch.device, g: torch.Generator):
    d, p = cfg.data, token_stride(cfg.model)  # mask grid = output-token grid (Swin: final stage)
    grid = (d.global_crop_size // p, d.global_crop_size // p)
    gen = build_mask_generator(cfg.mask.mode, grid, cfg.mask.ratio, cfg.mask.fill_remainder)
    globals_ = torch.randn(2 * b, d.num_channels, d.global_crop_size, d.global_crop_size, generator=g)
    locals_ = torch.randn(d.num_local_crops * b, d.num_channels, d.local_crop_size, d.local_crop_size, generator=g)
    masks = torch.stack([gen(g) for _ in range(2 * b)])
    return globals_.to(device), (locals_.to(device) if d.num_local_crops else None), masks.to(device)


def run_steps(cfg, steps: int, device: torch.device) -> tuple[dict[str, float], float, float]:
    """Time ``steps`` training steps after one warm-up step; returns (seconds per phase per step, img/s, peak MiB)."""
    torch.manual_seed(0)
    student, teacher = (m.to(device) for m in build_networks(cfg, seed=0))
    opt = torch.optim.AdamW(param_groups(student), lr=1e-4)
    ema = EMA(student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    lo, dim = cfg.loss, cfg.model.head_out_dim
    cls_fs = FeatureSet(lo.cls_feature_set_size, dim).to(device) if lo.cls_weight > 0 else None
    patch_fs = FeatureSet(lo.patch_feature_set_size, dim, key=1).to(device) if lo.patch_weight > 0 else None
    loss_fn = build_loss(cfg)
    b = cfg.optim.batch_size
    g = torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    timer = Timer(device)
    base_rss = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocators and kernels
            timer.total.clear()
            start = time.perf_counter()
        gl, lc, masks = fake_batch(cfg, b, device, g)
        with timer("backbone forward"), amp:
            with torch.no_grad():
                t_out = teacher(gl, None, patch_select=masks)
            out = student(gl, lc, masks=masks)
        t_cls, s_cls = t_out["cls"].float().view(2, b, -1), out["cls"].float().view(-1, b, dim)
        owner = masks.nonzero()[:, 0]
        total = torch.zeros((), device=device)
        for name, settings, fs, stream, weight in (("cls", lo.cls, cls_fs, 0, lo.cls_weight),
                                                   ("patch", lo.patch, patch_fs, 1, lo.patch_weight)):
            if fs is None:
                continue
            for task in range(settings.num_tasks):
                with timer("concept selection"):
                    concepts = loss_fn.concepts(settings, fs, step, task, stream)
                with timer("loss forward"):
                    if name == "cls":
                        term = cls_loss(s_cls, t_cls, concepts, lo.student_temp, lo.teacher_temp)
                    else:
                        term = patch_loss(out["patches"].float(), t_out["patches"].float(), owner, 2 * b,
                                          concepts, lo.student_temp, lo.teacher_temp)
                total = total + weight * term / settings.num_tasks
        with timer("backward (backbone + loss)"):
            opt.zero_grad(set_to_none=True)
            total.backward()
        with timer("clip + AdamW"):
            clip_per_tensor(params, cfg.optim.clip_grad)
            opt.step()
        with timer("EMA"):
            ema.update(0.996)
        with timer("enqueue"):
            if cls_fs is not None:
                cls_fs.enqueue(t_cls[1])
            if patch_fs is not None:
                with torch.no_grad(), amp:
                    emb = teacher.head(t_out["patch_tokens"][b:, 0])
                patch_fs.enqueue(emb.float())
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib() - base_rss
    return {k: v / steps for k, v in timer.total.items()}, steps * b / elapsed, peak


def selection_only(device: torch.device, size: int = 65536, anchors: int = 8192, judges: int = 9, dim: int = 256,
                   tasks: int = 4, chunk: int = 1024) -> None:
    """Paper-size concept selection: time per step (all tasks) and peak extra memory."""
    from sove.method import draw_anchors, select_judges
    from sove.seeding import generator

    fs = FeatureSet(size, dim).to(device)
    base = rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for task in range(tasks):
        idx = draw_anchors(size, anchors, generator(0, "anchors", 0, task, 0), device)
        concepts = select_judges(fs.features, idx, num_judges=judges, chunk_size=chunk,
                                 search_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = rss_mib() - base
    secs = time.perf_counter() - start
    print(f"| concept selection | E_C {size}, K {anchors}, k {judges - 1}, d {dim}, {tasks} tasks, chunk {chunk} "
          f"| {device} | {secs:.2f} s/step | peak extra memory {peak:.0f} MiB | judges {tuple(concepts.judges.shape)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion_mnist_tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--selection-only", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.selection_only:
        selection_only(device)
        return
    cfg = load_config(args.config, args.overrides)
    phases, ips, peak = run_steps(cfg, args.steps, device)
    step = sum(phases.values())
    print(f"\n{args.config} {' '.join(args.overrides)} on {device} ({torch.get_num_threads()} threads): "
          f"{ips:.1f} img/s, {step:.3f} s/step, peak memory {peak:.0f} MiB\n")
    print("| phase | s/step | share |\n|---|---|---|")
    for name, secs in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {secs:.4f} | {100 * secs / step:.1f}% |")


if __name__ == "__main__":
    main()
