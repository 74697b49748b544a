"""The ``sove`` command line: thin parsing around library functions.

    sove pretrain --config fashion_mnist_tiny [--overwrite] [key=value ...]
    sove eval knn --run runs/fashion_mnist_tiny [--random-init | --pixels] [key=value ...]
    sove pretrain --resume runs/fashion_mnist_tiny [key=value ...]
    sove export runs/fashion_mnist_tiny
    sove summary runs/fashion_mnist_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sove import __version__
from sove.errors import SoveError


def _pretrain(args: argparse.Namespace) -> None:
    from sove.config import load_config
    from sove.train.trainer import pretrain, resume

    if args.resume:
        resume(args.resume, args.overrides)
    else:
        pretrain(load_config(args.config, args.overrides), overwrite=args.overwrite)


def _export(args: argparse.Namespace) -> None:
    from sove.export import export_backbone

    weights, meta = export_backbone(args.run, args.checkpoint)
    print(f"wrote {weights} and {meta}; load with sove.export.load_backbone('{meta}')")


def _eval_knn(args: argparse.Namespace) -> None:
    from sove.eval.knn import evaluate_knn

    mode = "random_init" if args.random_init else "pixels" if args.pixels else "trained"
    result = evaluate_knn(args.run, mode, args.overrides, args.device)
    ks = ", ".join(f"k={k}: {v:.2f}" for k, v in result["top1"].items())
    print(f"k-NN top-1 ({mode}) {ks}; best {result['best_top1']:.2f}% at k={result['best_k']} "
          f"({result['num_train']} train / {result['num_test']} test)")


def _concepts(args: argparse.Namespace) -> None:
    from sove.viz.concepts import browse_concepts

    r = browse_concepts(args.run, args.num, args.checkpoint)
    purity = (f"concept purity {r['purity']:.3f} as trained; same images re-embedded (clean view): "
              f"trained teacher {r['purity_clean']:.3f}, random-init teacher {r['purity_random_init']:.3f}"
              if r["purity"] is not None else "no labels: purity not computed")
    print(f"{r['num_concepts']} concepts x {r['num_judges']} judges at step {r['step']}; {purity}; "
          f"wrote {r['png']} and {Path(args.run) / 'eval' / 'concepts.json'}")


def _plot(args: argparse.Namespace) -> None:
    from sove.viz.curves import plot_curves

    print(f"wrote {plot_curves(args.run)}")
    if args.embedding:
        from sove.eval.features import eval_split, extract_features, labels_of, load_run_config, teacher_backbone
        from sove.viz.curves import plot_embedding

        cfg = load_run_config(args.run)
        test = eval_split(cfg, "test")
        feats = extract_features(teacher_backbone(args.run, cfg), test, cfg.eval.batch_size, "cpu", "test features")
        path = plot_embedding(feats.numpy(), labels_of(test).numpy(), getattr(test.source, "classes", None),
                              Path(args.run) / "plots" / "embedding.png", f"teacher CLS features, PCA ({args.run})")
        print(f"wrote {path}")


def _embed(args: argparse.Namespace) -> None:
    from sove.eval.embed import embed

    r = embed(args.out, args.run, args.backbone, args.images, args.split, args.batch_size)
    print(f"wrote {r['npy']} {tuple(r['shape'])} and {r['csv']}")
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable file(s): " + "; ".join(r["skipped"][:5]))


def summary_table(run_dir: str | Path) -> str:
    """Markdown table of the k-NN results found in ``RUN_DIR/eval`` (trained, random init, pixels)."""
    rows = []
    for name, label in (("knn.json", "SOVE (trained teacher)"), ("knn_random_init.json", "random init (same ViT)"),
                        ("knn_pixels.json", "raw pixels")):
        path = Path(run_dir) / "eval" / name
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r["top1"].values())
                        + f" | **{r['best_top1']:.2f}** |")
            ks = list(r["top1"])
    if not rows:
        raise SoveError(f"no k-NN results in '{Path(run_dir) / 'eval'}'; run `sove eval knn --run {run_dir}` first")
    head = "| features | " + " | ".join(f"k={k}" for k in ks) + " | best top-1 |"
    return "\n".join([head, "|" + "---|" * (len(ks) + 2)] + rows)


def _summary(args: argparse.Namespace) -> None:
    print(f"k-NN top-1 (%) on the test split, {args.run}:\n{summary_table(args.run)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sove", description="SOVE self-supervised pretraining of vision transformers.")
    p.add_argument("--version", action="version", version=f"sove {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain a ViT with SOVE; writes trainer.out_dir/trainer.name/")
    pre.add_argument("--config", default="fashion_mnist_tiny", help="YAML file or packaged preset name")
    mode = pre.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    mode.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR exactly from checkpoints/last.pt")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=1")
    pre.set_defaults(func=_pretrain)

    ev = sub.add_parser("eval", help="evaluate a run's frozen teacher backbone")
    evsub = ev.add_subparsers(dest="protocol", required=True)
    knn = evsub.add_parser("knn", help="weighted k-NN (DINO protocol); writes RUN/eval/knn*.json")
    knn.add_argument("--run", required=True, help="run directory written by `sove pretrain`")
    group = knn.add_mutually_exclusive_group()
    group.add_argument("--random-init", action="store_true", help="the same architecture, untrained")
    group.add_argument("--pixels", action="store_true", help="raw pixels, mean-centred and L2-normalised")
    knn.add_argument("--device", default="cpu", help="device for feature extraction (cpu, cuda)")
    knn.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.knn_k=[10,20]")
    knn.set_defaults(func=_eval_knn)

    exp = sub.add_parser("export", help="write RUN/backbone.safetensors + backbone.json (timm-loadable)")
    exp.add_argument("run", help="run directory")
    exp.add_argument("--checkpoint", default="last.pt", help="file in RUN/checkpoints")
    exp.set_defaults(func=_export)

    con = sub.add_parser("concepts", help="draw concepts (anchor + judges + weights): RUN/plots/concepts.png + JSON")
    con.add_argument("run", help="run directory")
    con.add_argument("--num", type=int, default=16, help="concepts to draw")
    con.add_argument("--checkpoint", default="last.pt", help="file in RUN/checkpoints (e.g. step_0000500.pt)")
    con.set_defaults(func=_concepts)

    plot = sub.add_parser("plot", help="training curves (RUN/plots/curves.png), optionally the embedding map")
    plot.add_argument("run", help="run directory")
    plot.add_argument("--embedding", action="store_true", help="also a PCA map of test features (plots/embedding.png)")
    plot.set_defaults(func=_plot)

    emb = sub.add_parser("embed", help="teacher embeddings of images -> OUT.npy + OUT.csv")
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its teacher backbone)")
    src.add_argument("--backbone", help="backbone.json written by `sove export`")
    what = emb.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="folder of images (flat or one sub-folder per class)")
    what.add_argument("--split", choices=["train", "test"], help="the run's own train/test data")
    emb.add_argument("--out", required=True, help="output prefix, e.g. embeddings/test")
    emb.add_argument("--batch-size", type=int, default=256)
    emb.set_defaults(func=_embed)

    summ = sub.add_parser("summary", help="print the k-NN results of a run side by side")
    summ.add_argument("run", help="run directory")
    summ.set_defaults(func=_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sove`` console script; returns the exit status (2 on user errors)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SoveError as e:
        print(f"sove: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sove: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
