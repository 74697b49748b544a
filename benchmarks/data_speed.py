"""Input-pipeline speed (no model): the loader path, the device path and a DINO-style reference.

    python benchmarks/data_speed.py                               # ~1.5 min on an idle 2-core CPU
    python benchmarks/data_speed.py --update-docs docs/benchmarks.md
    python benchmarks/data_speed.py --device cuda                 # device path's views on a GPU
    python benchmarks/data_speed.py --sources-only --update-docs docs/benchmarks.md   # folder vs shards, ~1 min

Two workloads: (a) the demo crops (``fashion_mnist_tiny``: 2 x 28 + 4 x 14 px) on Fashion-MNIST;
(b) the paper's crops (``imagenet_vit_small``: 2 x 224 + 10 x 96 px) on generated 500 x 375
JPEGs (quality 90, noisy low-frequency content, ~ImageNet-sized files). Three pipelines, each
timed from the stored image (decode included) to stacked, normalised views:

* loader: ``data.augment_on=loader`` (``SSLDataset``: torchvision v2 tensor kernels per view);
* device: ``data.augment_on=device``; its two halves are timed apart: ``workers`` (decode, size
  bound, random draws, masks, collate: the CPU's share when the views are made on a GPU) and
  ``views`` (``DeviceMultiCrop`` on ``--device``);
* reference: DINO's ``DataAugmentationDINO`` recipe as torchvision v2 transforms on PIL images
  (PIL Gaussian blur and solarize, as DINO), per view, then ``torch.stack``.

"per core": one process, one torch thread, CPU time (``time.process_time``) per image. "total":
a DataLoader with one worker per core (the device path's views in the main process), wall-clock
images/s. Then the demo's end-to-end step time with each path (``sove.train.trainer.Trainer``,
the same phase timer as benchmarks/compare_methods.py). Prints markdown; ``--update-docs`` writes
it between the data_speed markers of a file.

``--sources-only``: images/s *read* (no augmentation) from the folder source and from its shards
(``sove shard``, ``data.source=shards``) on generated JPEGs, in the sampler's shuffled order: the
stored bytes alone and bytes + decode, per core and with one DataLoader worker per core; and the
``sove shard`` write speed. ``--update-docs`` writes it between the data_speed_sources markers.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from sove.config import load_config
from sove.data import ImageFolder, collate_views
from sove.data.multicrop import MultiCropAugmentation
from sove.run import prepare_run_dir
from sove.train.builders import build_train_dataset
from sove.train.trainer import Trainer

BEGIN, END = "<!-- data_speed:begin -->", "<!-- data_speed:end -->"
SOURCES_BEGIN, SOURCES_END = "<!-- data_speed_sources:begin -->", "<!-- data_speed_sources:end -->"


class PILGaussianBlur:
    """DINO's blur: PIL GaussianBlur, radius uniform in [0.1, 2]."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def dino_views(aug: MultiCropAugmentation) -> list[v2.Compose]:
    """One v2 pipeline per view of ``aug`` (DINO's global 1, global 2 and local recipes)."""
    pipelines = []
    for spec in aug.views:
        jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1) if aug.num_channels == 3 else v2.ColorJitter(0.4, 0.4)
        ops = [v2.RandomResizedCrop(spec.size, scale=spec.scale, interpolation=v2.InterpolationMode.BICUBIC),
               v2.RandomHorizontalFlip(), v2.RandomApply([jitter], p=aug.color_jitter)]
        ops += [v2.RandomGrayscale(aug.grayscale_p)] if aug.grayscale_p else []
        ops += [v2.RandomApply([PILGaussianBlur()], p=spec.blur_p)] if spec.blur_p else []
        ops += [v2.RandomSolarize(128, p=spec.solarize_p)] if spec.solarize_p else []
        ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(aug.mean.flatten().tolist(), aug.std.flatten().tolist())]
        pipelines.append(v2.Compose(ops))
    return pipelines


class Reference(Dataset):
    """The DINO-style reference: decode to PIL (files) or wrap the array (Fashion-MNIST), then views."""

    def __init__(self, source, aug: MultiCropAugmentation) -> None:
        self.source, self.views = source, dino_views(aug)
        self.mode = "RGB" if aug.num_channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        if hasattr(self.source, "files"):
            with Image.open(self.source.files[index]) as f:
                image = f.convert(self.mode)
        else:
            image = Image.fromarray(self.source.images[index, 0].numpy())
        return [view(image) for view in self.views]


def collate_reference(items: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(view) for view in zip(*items)]


def make_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0) -> Path:
    """``count`` noisy low-frequency RGB JPEGs (quality 90) of ``size`` (width, height) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def datasets(cfg) -> dict[str, Dataset]:
    loader = build_train_dataset(load_config(None, cfg + ["data.augment_on=loader"]))
    device = build_train_dataset(load_config(None, cfg + ["data.augment_on=device"]))
    return {"loader": loader, "device": device, "reference": Reference(loader.source, loader.augmentation)}


def per_core(sets: dict[str, Dataset], n: int, batch: int, device: torch.device) -> dict[str, float]:
    """CPU ms per image of each pipeline in this process, one torch thread."""
    torch.set_num_threads(1)
    chunks = [range(s, s + batch) for s in range(0, n, batch)]
    collate = {"loader": collate_views, "reference": collate_reference, "device": sets["device"].collate}
    out = {}
    for name in ("reference", "loader", "device"):
        ds = sets[name]
        ds[0]  # warm-up
        start = time.process_time()
        batches = [collate[name]([ds[i] for i in chunk]) for chunk in chunks]
        out[name if name != "device" else "device workers"] = (time.process_time() - start) / n * 1e3
    start = time.process_time()
    for b in batches:
        sets["device"].augment_batch(b, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["device views"] = (time.process_time() - start) / n * 1e3
    return out


def total(sets: dict[str, Dataset], n: int, batch: int, device: torch.device, workers: int) -> dict[str, float]:
    """Wall-clock images/s with ``workers`` DataLoader workers (views of the device path in this
    process, one torch thread: the workers hold the other cores)."""
    torch.set_num_threads(1)
    collate = {"loader": collate_views, "reference": collate_reference, "device": sets["device"].collate}
    out = {}
    for name in ("reference", "loader", "device"):
        loader = DataLoader(sets[name], batch_size=batch, sampler=range(n), collate_fn=collate[name],
                            num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
        start = time.perf_counter()
        for b in loader:
            if name == "device":
                sets["device"].augment_batch(b, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = n // batch * batch / (time.perf_counter() - start)
    return out


def pixel_agreement(sets: dict[str, Dataset], n: int) -> tuple[float, float]:
    """Mean and 99.9th percentile |loader - device| over all views of ``n`` samples, [0, 1] units."""
    loader = collate_views([sets["loader"][i] for i in range(n)])
    dev = sets["device"]
    views = dev.augment_batch(dev.collate([dev[i] for i in range(n)]), torch.device("cpu"))["crops"]
    std = dev.augmentation.std
    diff = torch.cat([((a - b).abs() * std).flatten() for a, b in zip(loader["crops"], views)])
    return float(diff.mean()), float(diff.quantile(0.999)) if diff.numel() < 2**24 else float("nan")


class StepClock:
    """Phase timer for ``Trainer.timer`` that records when every ``data`` phase starts and how long it takes."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts, self.data = device, [], []

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                if clock.device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()
                if name == "data":
                    clock.starts.append(self.start)

            def __exit__(self, *exc):
                if clock.device.type == "cuda":
                    torch.cuda.synchronize()
                if name == "data":
                    clock.data.append(time.perf_counter() - self.start)

        return _Phase()


def step_time(path: str, steps: int, work_dir: Path) -> tuple[float, float]:
    """Median (s/step, data s/step) of the demo with ``data.augment_on=path`` after 3 warm-up steps
    (medians: a step slowed by another process on a shared machine does not move them)."""
    cfg = load_config("fashion_mnist_tiny", [f"data.augment_on={path}", f"trainer.out_dir={work_dir}",
                                             f"trainer.name={path}", f"trainer.max_steps={steps + 4}",
                                             "trainer.progress=false", "trainer.log_every=1000",
                                             "trainer.checkpoint_every=100000"])
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=True))
    trainer.timer = clock = StepClock(trainer.fabric.device)
    trainer.fit()
    step = np.diff(clock.starts)[3:]  # step k = start of data k -> start of data k + 1
    return float(np.median(step)), float(np.median(clock.data[3:3 + len(step)]))


def workload_table(title: str, sets, n: int, batch: int, device: torch.device, workers: int) -> list[str]:
    core, wall = per_core(sets, n, batch, device), total(sets, n, batch, device, workers)
    ref = core["reference"]
    both = core["device workers"] + core["device views"]
    rows = [("DINO-style reference (torchvision v2 on PIL)", core["reference"], wall["reference"]),
            ("loader path (`data.augment_on=loader`)", core["loader"], wall["loader"]),
            ("device path: workers only (decode, bound, draws, masks, collate)", core["device workers"], None),
            (f"device path: views on {device} (`DeviceMultiCrop`)", core["device views"], None),
            (f"device path: workers + views on {device}", both, wall["device"])]
    lines = [f"### {title}", "", f"{n} images, batch {batch}; total = {workers} DataLoader workers"
             f"{' + the views in the main process' if device.type == 'cpu' else ''}.", "",
             "| pipeline | CPU ms / image (1 core) | images/s per core | images/s total | CPU time: reference / this |",
             "|---|---|---|---|---|"]
    for name, ms, ips in rows:
        lines.append(f"| {name} | {ms:.3f} | {1e3 / ms:.0f} | {'–' if ips is None else f'{ips:.0f}'} | "
                     f"{ref / ms:.2f}× |")
    return lines


def report(args: argparse.Namespace, work: Path) -> list[str]:
    device = torch.device(args.device)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    load0 = os.getloadavg()
    lines = [f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; views of the device path on "
             f"`{device}`. Load average (1/5/15 min) at the start: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}.", ""]
    demo = datasets(["data.source=fashion_mnist", "data.num_channels=1", "data.global_crop_size=28",
                     "data.local_crop_size=14", "data.num_local_crops=4", "data.global_crop_scale=[0.4,1.0]",
                     "data.local_crop_scale=[0.1,0.4]", "data.grayscale=0.0", "data.mean=[0.286]", "data.std=[0.353]",
                     "model.patch_size=7"])
    lines += workload_table("(a) Demo crops on Fashion-MNIST (2 × 28 + 4 × 14 px, 1 channel, 4 × 4 masks)", demo,
                            args.fmnist_images, args.demo_batch, device, args.workers) + load_note() + [""]
    folder = make_jpegs(work / "jpegs", args.jpeg_images)
    size_kib = sum(f.stat().st_size for f in folder.iterdir()) / args.jpeg_images / 1024
    paper = datasets(["data.source=folder", f"data.root={folder}", "data.num_channels=3"])
    lines += workload_table(f"(b) Paper crops on generated 500 × 375 JPEGs (2 × 224 + 10 × 96 px, 3 channels, "
                            f"14 × 14 masks; {size_kib:.0f} KiB per file)", paper, args.jpeg_images,
                            args.paper_batch, device, args.workers)
    mean, tail = pixel_agreement(paper, 8)
    lines += ["", f"Same samples, both paths (paper crops, 8 images, all views): mean |loader − device| = {mean:.4f}, "
              f"99.9th percentile {tail:.3f} ([0, 1] pixel units; resampling kernels differ, everything else equal)."]
    lines += load_note()
    if not args.skip_steps:
        lines += ["", f"### Demo training step with each path (`fashion_mnist_tiny`, batch 128, median of {args.steps} "
                  "steps after 3 warm-up steps, main-process data)", "", "| path | s/step | data s/step | data share |",
                  "|---|---|---|---|"]
        torch.set_num_threads(os.cpu_count())
        for path in ("loader", "device"):
            step, data = step_time(path, args.steps, work / "runs")
            lines.append(f"| `data.augment_on={path}` | {step:.3f} | {data:.4f} | {100 * data / step:.1f}% |")
    load1 = os.getloadavg()
    lines += ["", f"Load average at the end: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}."]
    return lines


class StoredBytes(Dataset):
    """The stored bytes of a folder (the file) or shards (the chunk item) image, not decoded."""

    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> int:
        if isinstance(self.source, ImageFolder):
            return len(self.source.path(index).read_bytes())
        return len(self.source.dataset[int(self.source.rows[index])][0])


def read_speed(ds: Dataset, order: list[int], workers: int) -> tuple[float, float]:
    """(images/s in this process on one thread, CPU time; images/s wall clock with ``workers`` DataLoader workers)."""
    torch.set_num_threads(1)
    ds[order[0]]  # warm-up: opens the chunk index
    start = time.process_time()
    for i in order:
        ds[i]
    per_core = len(order) / (time.process_time() - start)
    loader = DataLoader(ds, batch_size=32, sampler=order, collate_fn=list, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return per_core, len(order) / (time.perf_counter() - start)


def sources_report(args: argparse.Namespace, work: Path) -> list[str]:
    """Folder vs shards read speed on ``--jpeg-images`` generated JPEGs (see the module docstring)."""
    from sove.data.shards import ShardSource, write_shards

    n = args.jpeg_images
    folder = make_jpegs(work / "jpegs", n)
    start = time.perf_counter()
    write_shards(folder, work / "shards", progress=False)
    write = n / (time.perf_counter() - start)
    sources = {"folder (`data.source=folder`)": ImageFolder(folder), "shards (`data.source=shards`, local)":
               ShardSource(work / "shards")}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    load0 = os.getloadavg()
    size_kib = sum(f.stat().st_size for f in folder.iterdir()) / n / 1024
    lines = [f"{n} generated 500 × 375 JPEGs ({size_kib:.0f} KiB per file) in a shuffled order; total = "
             f"{args.workers} DataLoader workers. `sove shard` wrote {write:.0f} images/s (read + check-decode + "
             f"write). Load average (1/5/15 min) at the start: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}.", "",
             "| source | read | images/s per core | images/s total |", "|---|---|---|---|"]
    for name, source in sources.items():
        for what, ds in (("stored bytes", StoredBytes(source)), ("bytes + decode", source)):
            core, wall = read_speed(ds, order, args.workers)
            lines.append(f"| {name} | {what} | {core:.0f} | {wall:.0f} |")
    return lines + load_note()


def load_note() -> list[str]:
    return ["", f"1-minute load average after this part: {os.getloadavg()[0]:.2f}."]


def update_docs(path: Path, lines: list[str], begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers ``begin`` and ``end`` of ``path`` with ``lines``."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no '{begin}' ... '{end}' markers")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where the device path makes its views (cpu, cuda)")
    p.add_argument("--fmnist-images", type=int, default=2048)
    p.add_argument("--jpeg-images", type=int, default=96)
    p.add_argument("--demo-batch", type=int, default=128)
    p.add_argument("--paper-batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=10, help="demo training steps per path (after 3 warm-up steps)")
    p.add_argument("--skip-steps", action="store_true", help="no end-to-end demo steps")
    p.add_argument("--sources-only", action="store_true", help="only the folder vs shards read speed")
    p.add_argument("--update-docs", type=Path, help="write the report between the data_speed markers of this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = (sources_report if args.sources_only else report)(args, Path(tmp))
    print("\n".join(lines))
    if args.update_docs:
        update_docs(args.update_docs, lines, *((SOURCES_BEGIN, SOURCES_END) if args.sources_only else (BEGIN, END)))


if __name__ == "__main__":
    main()
