"""``sove eval``: the frozen-feature protocols' sub-commands (parsing and the printed result lines);
the protocols themselves are in :mod:`sove.eval` (docs/evaluation.md)."""

from __future__ import annotations

import argparse

from sove.errors import SoveError


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
        capped = [k for k in result["top1"] if int(k) > result["num_train"]]
        if capped:  # knn_classify caps k at N_train: those k all vote with every train image
            print(f"note: k={', '.join(capped)} > {result['num_train']} train images: "
                  f"{'these use' if len(capped) > 1 else 'it uses'} all {result['num_train']} train images as neighbours")


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


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``sove eval knn|linear|lowshot|retrieval|video|segmentation`` to the ``sove`` sub-commands ``sub``."""
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
