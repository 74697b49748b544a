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


def _eval_knn(args: argparse.Namespace) -> None:
    from sove.eval.knn import KNN_MODES, evaluate_knn_modes

    modes = (list(KNN_MODES) if args.all else
             ["random_init" if args.random_init else "pixels" if args.pixels else "trained"])
    if args.run is None and args.backbone is None:
        raise SoveError("sove eval knn: give --run RUN_DIR and/or --backbone backbone.json|RUN/checkpoints/FILE.pt")
    for mode, result in evaluate_knn_modes(args.run, modes, args.overrides, args.device, args.backbone).items():
        ks = ", ".join(f"k={k}: {v:.2f}" for k, v in result["top1"].items())
        timing = f" in {result['seconds'] / 60:.1f} min" if args.all else ""
        print(f"k-NN top-1 ({mode}) {ks}; best {result['best_top1']:.2f}% at k={result['best_k']} "
              f"({result['num_train']} train / {result['num_test']} test){timing}")


def _eval_linear(args: argparse.Namespace) -> None:
    from sove.eval.linear import evaluate_linear

    grid = {"lrs": args.lrs, "epochs": args.epochs}
    r = evaluate_linear(args.run, args.backbone, args.features, batch_size=args.batch_size,
                        val_fraction=args.val_fraction, augment=args.augment, standardize=not args.no_standardize,
                        seed=args.seed, cache=not args.no_cache, overrides=args.overrides, device=args.device,
                        **{k: v for k, v in grid.items() if v is not None})
    print(f"linear probe ({r['features']}, {r['feature_dim']}-d) test top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
          f"at lr {r['best_lr']:g} (val top-1 {r['val_top1']:.2f}% on {r['num_val']} held-out; "
          f"{r['num_train']} train / {r['num_test']} test, {r['epochs']} epochs)")


def _eval_lowshot(args: argparse.Namespace) -> None:
    from sove.eval.lowshot import evaluate_lowshot

    r = evaluate_lowshot(args.run, args.backbone, args.percent, args.subset_file or (), args.seed,
                         not args.no_cache, args.overrides, args.device)
    parts = [f"{name if s['subset_file'] else name + '%'} ({s['num_labelled']} labelled): k-NN "
             f"{s['knn_best_top1']:.2f}% (k={s['knn_best_k']}), logreg {s['logreg_top1']:.2f}%"
             for name, s in r["subsets"].items()]
    print(f"low-shot test top-1 ({r['num_test']} test): " + "; ".join(parts))


def _eval_retrieval(args: argparse.Namespace) -> None:
    from sove.eval.retrieval import evaluate_retrieval

    r = evaluate_retrieval(args.data, args.run, args.backbone, args.name, args.out, args.image_size,
                           query_crop=args.query_crop, device=args.device)
    m, h = r["medium"], r["hard"]
    print(f"retrieval {r['dataset']} ({r['num_queries']} queries, crop {r['query_crop']}; {r['num_database']} "
          f"images): mAP Medium "
          f"{m['mAP']:.2f} / Hard {h['mAP']:.2f}; mP@10 Medium {m['mP@10']:.2f} / Hard {h['mP@10']:.2f}")


def _eval_video(args: argparse.Namespace) -> None:
    from sove.eval.video import evaluate_video

    r = evaluate_video(args.data, args.run, args.backbone, args.split, args.out, args.masks_dir, args.image_size,
                       args.context, args.radius, args.topk, args.temperature, args.resolution, args.device)
    scores = (f"J&F {r['JF_mean']:.2f} (J {r['J_mean']:.2f}, F {r['F_mean']:.2f})" if r["JF_mean"] is not None
              else "no annotated frames to score")
    print(f"DAVIS {r['split']} label propagation ({r['num_sequences']} sequences, {r['num_objects']} objects): "
          f"{scores}; masks in {r['masks_dir']}")


def _eval_segmentation(args: argparse.Namespace) -> None:
    from sove.eval.segmentation import evaluate_segmentation

    r = evaluate_segmentation(args.data, args.run, args.backbone, args.out, args.image_size, args.epochs, args.lr,
                              args.batch_size, args.num_classes, args.reduce_zero_label, device=args.device,
                              seed=args.seed)
    print(f"linear segmentation ({r['num_classes']} classes, {r['num_train']} train / {r['num_val']} val images): "
          f"mIoU {r['mIoU']:.2f}, mAcc {r['mAcc']:.2f}")


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

    ev = sub.add_parser("eval", help="evaluate a run's frozen teacher backbone")
    evsub = ev.add_subparsers(dest="protocol", required=True)
    knn = evsub.add_parser("knn", help="weighted k-NN (DINO protocol); writes RUN/eval/knn*.json")
    knn.add_argument("--run", help="run directory written by `sove pretrain` (teacher backbone, data config, "
                     "output in RUN/eval)")
    knn.add_argument("--backbone", help="backbone.json from `sove export` or RUN/checkpoints/FILE.pt (data: --run's "
                     "config, else defaults + data.* overrides; output next to it without --run)")
    group = knn.add_mutually_exclusive_group()
    group.add_argument("--random-init", action="store_true", help="the same architecture, untrained")
    group.add_argument("--pixels", action="store_true", help="raw pixels, mean-centred and L2-normalised")
    group.add_argument("--all", action="store_true",
                       help="trained, random init and pixels in one pass (the images are read once)")
    knn.add_argument("--device", default="cpu", help="device for feature extraction (cpu, cuda)")
    knn.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.knn_k=[10,20]")
    knn.set_defaults(func=_eval_knn)

    def frozen_source(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--run", help="run directory (teacher backbone, data config, output in RUN/eval)")
        parser.add_argument("--backbone", help="backbone.json from `sove export` or RUN/checkpoints/FILE.pt (data: "
                            "--run's config, else defaults + data.* overrides; output next to it without --run)")
        parser.add_argument("--seed", type=int, default=0, help="subset / split seed")
        parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache files")
        parser.add_argument("--device", default="cpu", help="device for feature extraction (cpu, cuda)")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")

    lin = evsub.add_parser("linear", help="linear probe, lr grid trained together (Tab. 1); writes eval/linear.json")
    frozen_source(lin)
    lin.add_argument("--features", default="cls4", choices=["cls4", "cls_mean", "global"],
                     help="cls4: CLS of the last 4 blocks (ViT-S); cls_mean: CLS + mean patch (ViT-B/L); "
                          "global: the k-NN feature (Swin)")
    lin.add_argument("--lrs", type=float, nargs="+",
                     help="base learning rates (per 256 samples), all trained in one pass (default 1e-4 ... 1)")
    lin.add_argument("--epochs", type=int, help="epochs (default 50; paper scale: 100)")
    lin.add_argument("--batch-size", type=int, default=1024, help="feature rows per optimizer step")
    lin.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of train for choosing the lr")
    lin.add_argument("--augment", action="store_true",
                     help="random-resized-crop + flip, re-extracted every epoch (slow)")
    lin.add_argument("--no-standardize", action="store_true", help="do not standardise features with train statistics")
    lin.set_defaults(func=_eval_linear)

    low = evsub.add_parser("lowshot", help="k-NN + logistic regression on 1%%/10%% labelled subsets (Tab. A.1)")
    frozen_source(low)
    low.add_argument("--percent", type=float, nargs="+", default=[1.0, 10.0], help="labelled share of each class")
    low.add_argument("--subset-file", nargs="+", help="SimCLR-style lists of labelled images (replace --percent)")
    low.set_defaults(func=_eval_lowshot)

    def dense_source(parser: argparse.ArgumentParser, data_help: str) -> None:
        src = parser.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", help="run directory (its teacher backbone; result in RUN/eval)")
        src.add_argument("--backbone", help="backbone.json from `sove export` or RUN/checkpoints/FILE.pt (result in "
                         "eval/ next to it)")
        parser.add_argument("--data", required=True, help=data_help)
        parser.add_argument("--out", help="result JSON (default: RUN/eval/<protocol>.json)")
        parser.add_argument("--device", default="cpu", help="device of the backbone (cpu, cuda)")

    ret = evsub.add_parser("retrieval", help="revisited Oxford/Paris mAP, Medium and Hard (Tab. 5); "
                           "writes eval/retrieval_<name>.json")
    dense_source(ret, "dataset folder with jpg/ and gnd_<name>.pkl")
    ret.add_argument("--name", help="dataset name, e.g. roxford5k (default: the only gnd_*.pkl in --data)")
    ret.add_argument("--image-size", type=int, help="longer image side at scale 1, px (default: training crop size)")
    ret.add_argument("--query-crop", choices=["bbox", "none"], default="bbox",
                     help="bbox: crop queries to their gnd box (revisited protocol, default); none: whole "
                          "query images (DINO's retrieval script)")
    ret.set_defaults(func=_eval_retrieval)

    vid = evsub.add_parser("video", help="DAVIS-2017 label propagation, J&F (Tab. 4); writes eval/video.json + PNGs")
    dense_source(vid, "DAVIS-2017 folder (JPEGImages/, Annotations/, ImageSets/2017/)")
    vid.add_argument("--split", default="val", help="sequence list ImageSets/2017/<split>.txt")
    vid.add_argument("--resolution", default="480p", help="resolution folder under JPEGImages/ and Annotations/")
    vid.add_argument("--masks-dir", help="predicted indexed PNGs (default: video_masks/ next to the result JSON)")
    vid.add_argument("--image-size", type=int, default=480, help="short side of the frames fed to the backbone, px")
    vid.add_argument("--context", type=int, default=7, help="previous frames in the context (plus the first)")
    vid.add_argument("--radius", type=int, default=12, help="spatial window half-size, patches")
    vid.add_argument("--topk", type=int, default=5, help="neighbours kept per patch")
    vid.add_argument("--temperature", type=float, default=0.1, help="affinity temperature")
    vid.set_defaults(func=_eval_video)

    seg = evsub.add_parser("segmentation", help="linear layer on frozen patch features, mIoU/mAcc (Tab. A.2); "
                           "writes eval/segmentation.json")
    dense_source(seg, "folder with images/{training,validation} and annotations/{training,validation}")
    seg.add_argument("--image-size", type=int, help="square input side, px (default: training crop size)")
    seg.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    seg.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the linear layer")
    seg.add_argument("--batch-size", type=int, default=16, help="images per step")
    seg.add_argument("--num-classes", type=int, help="default: largest training class index + 1")
    seg.add_argument("--reduce-zero-label", action="store_true", help="ADE20k: ignore label 0, shift classes down")
    seg.add_argument("--seed", type=int, default=0, help="seed of the linear layer and the image order")
    seg.set_defaults(func=_eval_segmentation)

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
    except KeyboardInterrupt:
        print("sove: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
