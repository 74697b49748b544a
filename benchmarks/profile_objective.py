"""Where SOVE's objective spends its time: ``torch.profiler`` around the loss forward, by operator.

    python benchmarks/profile_objective.py --config fashion_mnist_tiny --warmup 20 --steps 20

Trains the config with the real data pipeline and profiles only ``SOVELoss.forward`` (concept
selection, similarities, concept probabilities, both losses; not the backbone, not the backward)
on the last ``--steps`` of ``--warmup + --steps`` steps, then prints self CPU/GPU time per operator
averaged per step (markdown). The profiler adds its own overhead, so the per-call total is an upper
bound of the objective's share in ``benchmarks/compare_methods.py``'s ``objective`` column.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import make_trainer, method_config  # noqa: E402

from sove.train.builders import build_train_dataset  # noqa: E402


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``warmup + steps`` steps; return the mean seconds per profiled loss call and ms per operator."""
    cfg = method_config(argparse.Namespace(config=args.config, overrides=args.overrides, work_dir=args.work_dir),
                        "sove", epochs=None)
    trainer = make_trainer(cfg, Path(args.work_dir) / "sove", build_train_dataset(cfg))
    forward = trainer.method.loss_fn.forward
    per_op: collections.Counter = collections.Counter()
    seconds, calls = 0.0, 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.fabric.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def profiled(**kw):
        nonlocal seconds, calls
        if trainer.step < args.warmup:
            return forward(**kw)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            out = forward(**kw)
            if trainer.fabric.device.type == "cuda":
                torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        calls += 1
        for event in prof.key_averages():
            per_op[event.key] += event.self_cpu_time_total + getattr(event, "self_device_time_total", 0)
        return out

    trainer.method.loss_fn.forward = profiled
    for _ in range(args.warmup + args.steps):
        if trainer.fit(deadline=0.0) is not None:  # the schedule ended (tiny configs)
            break
    calls = max(calls, 1)
    return {"seconds_per_call": seconds / calls, "calls": calls,
            "ms_per_step": {k: v / calls / 1e3 for k, v in per_op.most_common()}}


def markdown(result: dict[str, Any], top: int) -> str:
    """The ``top`` operators by time (ms per profiled step, share of the total), the others as "rest"."""
    total = sum(result["ms_per_step"].values()) or 1.0
    lines = ["| operator | ms per step | share |", "|---|---|---|"]
    items = list(result["ms_per_step"].items())
    for name, ms in items[:top]:
        lines.append(f"| `{name}` | {ms:.2f} | {100 * ms / total:.1f}% |")
    rest = sum(ms for _, ms in items[top:])
    lines.append(f"| rest | {rest:.2f} | {100 * rest / total:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist_tiny")
    p.add_argument("--warmup", type=int, default=20, help="unprofiled steps first")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--top", type=int, default=8, help="operators listed (the others summed as 'rest')")
    p.add_argument("--work-dir", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="sove_profile_")
    result = profile(args)
    print(f"SOVELoss.forward: {result['seconds_per_call']:.4f} s per call (profiled, {result['calls']} calls)")
    print(markdown(result, args.top))
    return result


if __name__ == "__main__":
    main()
