"""Small-scale ablations of SOVE (paper Tab. 7, 8, 9 shapes) on the Fashion-MNIST demo config.

    python benchmarks/ablations.py --steps 234 --out docs/ablations.md      # ~1 h on a 2-core CPU
    python benchmarks/ablations.py --steps 1 --groups judges ...            # smoke

Every setting trains the same config (``--config``, default ``fashion_mnist_tiny``) for the same
number of optimizer steps (a fixed step budget, so the result does not depend on machine load;
the schedules are sized to that many steps, warm-up the same fraction as in the config) from
the same seed, then runs the k-NN protocol of ``sove eval knn`` (full train / test splits). The
default setting (CLS + MIM, 9 judges, soft labels) is trained once and shared by the groups:

* ``losses`` (Tab. 7): CLS + MIM | CLS only (``loss.patch_weight=0``) | MIM only (``loss.cls_weight=0``)
* ``judges`` (Tab. 8): CLS judges k = 1 | 3 | 9 (``loss.cls.num_judges``)
* ``labels`` (Tab. 9): soft | one-hot (``loss.cls.label_mode``)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sove.config import load_config
from sove.eval.knn import evaluate_knn
from sove.train.builders import build_train_dataset
from sove.api import pretrain

DEFAULT = "CLS + MIM, k = 9, soft"
SETTINGS: dict[str, list[str]] = {  # name -> overrides (relative to the config)
    DEFAULT: [],
    "CLS only": ["loss.patch_weight=0"],
    "MIM only": ["loss.cls_weight=0"],
    "k = 1": ["loss.cls.num_judges=1"],
    "k = 3": ["loss.cls.num_judges=3"],
    "one-hot": ["loss.cls.label_mode=onehot"],
}
GROUPS: dict[str, tuple[str, list[tuple[str, str]]]] = {  # group -> (title, [(row label, setting)])
    "losses": ("Losses (paper Tab. 7)", [("CLS + MIM", DEFAULT), ("CLS only (λ2 = 0)", "CLS only"),
                                          ("MIM only (λ1 = 0)", "MIM only")]),
    "judges": ("CLS judges per concept (paper Tab. 8)", [("k = 1", "k = 1"), ("k = 3", "k = 3"), ("k = 9", DEFAULT)]),
    "labels": ("Judge labels (paper Tab. 9)", [("soft", DEFAULT), ("one-hot", "one-hot")]),
}


def train_and_evaluate(args: argparse.Namespace, name: str, overrides: list[str]) -> dict[str, Any]:
    """Pretrain one setting for ``args.steps`` steps and k-NN-evaluate its teacher."""
    base = load_config(args.config, args.overrides)
    run_name = "ablation_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    common = list(args.overrides) + overrides + [f"trainer.out_dir={args.work_dir}", f"trainer.name={run_name}",
                                                 "trainer.progress=false", "trainer.keep_checkpoints=0"]
    per_epoch = len(build_train_dataset(load_config(args.config, common))) // base.optim.batch_size
    epochs = args.steps / per_epoch
    frac = base.optim.warmup_epochs / base.optim.epochs
    cfg = load_config(args.config, common + [f"optim.epochs={epochs}", f"optim.warmup_epochs={frac * epochs}"])
    start = time.perf_counter()
    run_dir = pretrain(cfg, overwrite=True).path
    minutes = (time.perf_counter() - start) / 60
    knn = evaluate_knn(run_dir, "trained")
    print(f"[ablation] {name}: k-NN top-1 {knn['best_top1']:.2f} (k={knn['best_k']}), {minutes:.1f} min", flush=True)
    return {"overrides": overrides, "knn_top1": knn["top1"], "best_top1": knn["best_top1"], "best_k": knn["best_k"],
            "train_minutes": minutes, "run_dir": str(run_dir)}


def markdown(results: dict[str, dict[str, Any]], groups: list[str]) -> str:
    """One small table per group: setting, overrides, k-NN top-1 at each k and the best."""
    out = []
    for g in groups:
        title, rows = GROUPS[g]
        ks = list(next(iter(results.values()))["knn_top1"])
        out += [f"**{title}**", "", "| setting | overrides | " + " | ".join(f"k-NN k={k}" for k in ks) + " | best |",
                "|---|---|" + "---|" * (len(ks) + 1)]
        for label, setting in rows:
            r = results[setting]
            cells = " | ".join(f"{v:.2f}" for v in r["knn_top1"].values())
            out.append(f"| {label} | `{' '.join(r['overrides']) or '(config)'}` | {cells} | **{r['best_top1']:.2f}** |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist_tiny")
    p.add_argument("--steps", type=int, default=234, help="optimizer steps per setting (fixed step budget)")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--work-dir", default="runs/ablations", help="where the runs are written")
    p.add_argument("--out", default=None, help="write the markdown tables here (and the JSON next to it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every setting")
    args = p.parse_args(argv)
    needed = [s for g in args.groups for _, s in GROUPS[g][1]]
    needed = list(dict.fromkeys(needed))
    start = time.perf_counter()
    results = {name: train_and_evaluate(args, name, SETTINGS[name]) for name in needed}
    table = markdown(results, args.groups)
    command = " ".join(["python benchmarks/ablations.py"] + sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")"
    total = (time.perf_counter() - start) / 60
    print(table)
    print(f"total {total:.1f} min; command: {command}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "steps": args.steps, "total_minutes": total,
                                                        "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
