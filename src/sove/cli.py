"""The ``sove`` command line: thin parsing around library functions.

    sove pretrain --config fashion_mnist_tiny [--overwrite] [key=value ...]
    sove eval knn --run runs/fashion_mnist_tiny [--random-init | --pixels | --all] [key=value ...]
    sove eval linear --run runs/fashion_mnist_tiny [--features cls4|cls_mean] [--epochs N] [--augment]
    sove eval lowshot --run runs/fashion_mnist_tiny [--percent 1 10 | --subset-file FILE ...]
    sove eval retrieval --run RUN --data data/roxford5k      (revisited Oxford/Paris mAP)
    sove eval video --run RUN --data data/DAVIS               (DAVIS-2017 label propagation, J&F)
    sove eval segmentation --run RUN --data data/ADEChallengeData2016 [--reduce-zero-label]
    sove pretrain --resume runs/fashion_mnist_tiny [key=value ...]
    sove shard --images DIR --out SHARDS     (then data.source=shards data.root=SHARDS)
    sove export runs/fashion_mnist_tiny [--onnx]
    sove summary runs/fashion_mnist_tiny
    sove presets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sove import __version__
from sove.cli_eval import add_eval_parser
from sove.errors import SoveError

#: Preset of ``sove pretrain`` without ``--config``.
DEFAULT_PRESET = "fashion_mnist_tiny"


def _pretrain(args: argparse.Namespace) -> None:
    """The config is read and checked before torch, Lightning and timm are imported (a typo answers in
    well under a second)."""
    from sove.config import load_config

    if args.resume:
        if args.config is not None:
            raise SoveError(f"--config is not used with --resume: {args.resume} continues with its own config.yaml "
                            "(key=value overrides may change trajectory-neutral keys only)")
        own = Path(args.resume) / "config.yaml"
        if own.is_file():
            load_config(str(own), args.overrides)
        from sove.api import resume_run

        resume_run(args.resume, args.overrides)
    else:
        cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
        from sove.api import start_run

        start_run(cfg, overwrite=args.overwrite)


def _export(args: argparse.Namespace) -> None:
    from sove.export import ONNX_OPSET, export_backbone

    r = export_backbone(args.run, args.checkpoint, onnx=args.onnx)
    print(f"wrote {r['folder']} (config.json + model.safetensors) and {r['meta']}; load with "
          f"timm.create_model('local-dir:{r['folder']}', pretrained=True) or sove.export.load_backbone('{r['meta']}')")
    if args.onnx:
        diff = r["onnx_max_abs_diff"]
        check = (f"onnxruntime vs PyTorch max abs difference {diff:.2e}" if diff is not None
                 else "not checked: onnxruntime is not installed")
        print(f"wrote {r['onnx']} (opset {ONNX_OPSET}, input images, output features); {check}")


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
        from sove.eval.features import eval_split, extract_features, labels_of, readable_rows
        from sove.run import Run
        from sove.viz.curves import plot_embedding

        run = Run(args.run)
        cfg = run.config
        test = eval_split(cfg, "test")  # labels index its own class names, as the legend shows them
        feats = extract_features(run.backbone(), test, cfg.eval.batch_size, "cpu", "test features")
        keep = readable_rows(feats, test, "test", run.eval_dir)
        path = plot_embedding(feats[keep].numpy(), labels_of(test)[keep].numpy(), test.source.classes,
                              Path(args.run) / "plots" / "embedding.png", f"teacher CLS features, PCA ({args.run})")
        print(f"wrote {path}")


def _embed(args: argparse.Namespace) -> None:
    from sove.eval.embed import embed

    r = embed(args.out, args.run, args.backbone, args.images, args.split, args.batch_size, args.on_error)
    print(f"wrote {r['npy']} {tuple(r['shape'])} and {r['csv']}" + (f"; {r['report']}" if r["report"] else ""))


def _shard(args: argparse.Namespace) -> None:
    from sove.data.shards import write_shards

    r = write_shards(args.images, args.out, args.on_error, args.chunk_bytes)
    labels = f"{len(r['classes'])} classes" if r["classes"] else "no labels"
    print(f"wrote {r['num_images']} images ({labels}) in {r['num_chunks']} chunk(s) to {r['out']}; train with "
          f"data.source=shards data.root={r['out']}" + (f"; {r['report']}" if r["report"] else ""))


def presets_table(indent: str = "") -> str:
    """One line per packaged preset: its name and the description line that starts its YAML."""
    from sove.config import preset_descriptions

    rows = preset_descriptions()
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{indent}{name:<{width}}  {line}" for name, line in rows)


def _presets(args: argparse.Namespace) -> None:
    print(presets_table())


def _summary(args: argparse.Namespace) -> None:
    from sove.summary import summary_table

    print(f"k-NN top-1 (%) on the test split, {args.run}:\n{summary_table(args.run)}")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default, except where it has none (None, False, an empty list), and
    keeps the description and epilog line by line (the preset table of ``sove pretrain --help``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The parser of ``sove`` and of every sub-command (argparse makes sub-parsers of the parent's class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sove", description="SOVE self-supervised pretraining of vision transformers.")
    p.add_argument("--version", action="version", version=f"sove {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain a ViT with SOVE; writes trainer.out_dir/trainer.name/",
                         epilog=f"packaged presets (--config NAME):\n{presets_table('  ')}")
    pre.add_argument("--config", help=f"YAML file or packaged preset name (default {DEFAULT_PRESET}; "
                     "`sove presets` lists them)")
    mode = pre.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    mode.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR exactly from checkpoints/last.pt")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=1")
    pre.set_defaults(func=_pretrain)

    add_eval_parser(sub)

    exp = sub.add_parser("export", help="write RUN/export/ (timm / Hugging Face folder: config.json + "
                         "model.safetensors) and RUN/backbone.json")
    exp.add_argument("run", help="run directory")
    exp.add_argument("--checkpoint", default="last.pt", help="file in RUN/checkpoints")
    exp.add_argument("--onnx", action="store_true", help="also RUN/export/model.onnx (dynamic batch and, for a "
                     "ViT, image size), checked against PyTorch with onnxruntime")
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
    src.add_argument("--backbone", help="backbone.json written by `sove export`, or RUN/checkpoints/FILE.pt")
    what = emb.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="folder of images (flat or one sub-folder per class), or shards (sove shard)")
    what.add_argument("--split", choices=["train", "test"], help="the run's own train/test data")
    emb.add_argument("--out", required=True, help="output prefix, e.g. embeddings/test")
    emb.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    emb.add_argument("--on-error", choices=["skip", "raise"],
                     help="unreadable images: skip (listed in OUT.unreadable.txt) or raise; default: the run's "
                          "data.on_error, else skip")
    emb.set_defaults(func=_embed)

    sha = sub.add_parser("shard", help="pack an image folder into shards (LitData chunks) for data.source=shards")
    sha.add_argument("--images", required=True, help="folder of images (flat, or one sub-folder per class: labels)")
    sha.add_argument("--out", required=True, help="new folder for the shards (upload it to read from object storage)")
    sha.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                     help="unreadable files (as data.on_error): skip (counted, listed in OUT/unreadable.txt) or raise")
    sha.add_argument("--chunk-bytes", default="64MB", help="largest chunk file (e.g. 64MB, 256MB)")
    sha.set_defaults(func=_shard)

    pres = sub.add_parser("presets", help="list the packaged presets (--config NAME), one line each")
    pres.set_defaults(func=_presets)

    summ = sub.add_parser("summary", help="print the k-NN results of a run side by side")
    summ.add_argument("run", help="run directory")
    summ.set_defaults(func=_summary)
    return p


def written_run(args: argparse.Namespace) -> Path | None:
    """The sove run directory a command writes into (its output folder or a parent), or None.

    ``pretrain`` locks its run itself; ``summary`` only reads.
    """
    from sove.run_lock import run_containing

    if args.command in ("pretrain", "summary", "presets"):
        return None
    out = getattr(args, "out", None)
    target = Path(out).parent if out else getattr(args, "run", None) or getattr(args, "backbone", None)
    return run_containing(target) if target else None


def _run(args: argparse.Namespace) -> None:
    """Check ``--device``, then run the command holding the outputs lock of the run it writes into
    (training may go on meanwhile: :mod:`sove.run_lock`)."""
    import contextlib

    from sove.preflight import check_torch_device
    from sove.run_lock import OUTPUTS_LOCK_NAME, RunLock

    if getattr(args, "device", None):
        check_torch_device(args.device)
    run = written_run(args)
    with RunLock(run, OUTPUTS_LOCK_NAME) if run is not None else contextlib.nullcontext():
        args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sove`` console script; returns the exit status (2 on user errors)."""
    from sove.errors import disk_full

    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except SoveError as e:
        print(f"sove: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        full = disk_full(e)
        if full is None:
            raise
        where = f" while writing '{full.filename}'" if full.filename else ""
        print(f"sove: error: no space left on device{where}; free some space and run the command again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # sove.train.stop.TrainingInterrupted: stopped with a checkpoint
        print(f"sove: {e}" if str(e) else "sove: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
