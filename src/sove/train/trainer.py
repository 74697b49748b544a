"""The SOVE training loop on Lightning Fabric. The one place that knows the order of a step.

One step (DESIGN.md, "Data flow of one step")::

    teacher(clean globals)            -> t_cls (2, B, d), projected patches
    student(masked globals + locals)  -> s_cls (V, B, d), projected masked patches
    loss = l1 * L_CLS(Eq. 2) + l2 * L_patch(Eq. 4)      (concepts from E_C / E_P, no grad)
    backward -> per-tensor clip -> AdamW -> EMA(teacher) -> enqueue E_C, E_P (all-gathered)
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sove import __version__
from sove.data import MultiCropAugmentation, SSLDataset, build_source, collate_views
from sove.errors import DataError, SoveError
from sove.method import ConceptSettings, FeatureSet, SOVELoss
from sove.models import build_networks
from sove.train.checkpoint import atomic_save, rng_state
from sove.train.schedules import Schedules, build_schedules


def build_train_dataset(cfg: DictConfig) -> SSLDataset:
    """The multi-crop, masked training dataset of ``cfg.data`` / ``cfg.mask``."""
    d = cfg.data
    source = build_source(d.source, d.root, "train", d.download, d.num_channels, d.test_root)
    aug = MultiCropAugmentation(
        d.global_crop_size, d.local_crop_size, d.num_local_crops, tuple(d.global_crop_scale),
        tuple(d.local_crop_scale), tuple(d.mean), tuple(d.std), d.num_channels, d.color_jitter,
        d.grayscale, d.blur, d.solarize,
    )
    return SSLDataset(source, aug, cfg.model.patch_size, cfg.mask.mode, cfg.mask.ratio)


def build_loss(cfg: DictConfig) -> SOVELoss:
    """:class:`SOVELoss` from ``cfg.loss`` (search in bf16 on GPU only; weights stay fp32)."""
    lo = cfg.loss

    def settings(c) -> ConceptSettings:
        return ConceptSettings(**OmegaConf.to_container(c))

    return SOVELoss(settings(lo.cls), settings(lo.patch), lo.cls_weight, lo.patch_weight,
                    lo.student_temp, cfg.trainer.seed, lo.chunk_size)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on >= 2-D weights only; none on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_tensor(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each gradient tensor whose L2 norm exceeds ``max_norm`` down to that norm (DINO's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scale = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scale)


class EMA:
    """Teacher <- m * teacher + (1 - m) * student over matching parameters, with fused foreach ops."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        s = dict(student.named_parameters())
        self.pairs = [(t, s[name]) for name, t in teacher.named_parameters()]
        self.teacher_params = [t for t, _ in self.pairs]
        self.student_params = [p for _, p in self.pairs]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        torch._foreach_lerp_(self.teacher_params, [p.detach() for p in self.student_params], 1.0 - momentum)


def prepare_run_dir(cfg: DictConfig, overwrite: bool) -> Path:
    """Create ``out_dir/name``; refuse an existing run unless ``overwrite``.

    Raises:
        SoveError: the run directory exists and ``overwrite`` is False.
    """
    run_dir = Path(cfg.trainer.out_dir) / cfg.trainer.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise SoveError(f"run directory '{run_dir}' exists; pass --overwrite to replace it "
                            "or trainer.name=NEW_NAME for a new run")
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision``; ``auto`` = bf16-mixed on GPU, 32-true elsewhere (SOVE_SPEC §6)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "32-true"


class Trainer:
    """Owns the networks, feature sets, optimizer and loop of one pretraining run."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.trainer
        # run_dir already holds config.yaml and checkpoints/: the CSV logger's warning is moot.
        warnings.filterwarnings("ignore", message=".*Experiment logs directory.*")
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                             strategy=t.strategy, precision=resolve_precision(cfg),
                             loggers=[CSVLogger(str(run_dir), name="", version=""),
                                      TensorBoardLogger(str(run_dir), name="tensorboard", version="")])
        self.fabric.launch()
        self.fabric.seed_everything(t.seed, verbose=False)
        self.dataset = build_train_dataset(cfg)
        if len(self.dataset) < cfg.optim.batch_size * self.fabric.world_size:
            raise DataError(f"data.root: {len(self.dataset)} images is fewer than one global batch "
                            f"({cfg.optim.batch_size} x {self.fabric.world_size}); lower optim.batch_size")
        loader = DataLoader(self.dataset, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.data.num_workers, collate_fn=collate_views,
                            persistent_workers=cfg.data.num_workers > 0)
        self.loader = self.fabric.setup_dataloaders(loader)
        student, teacher = build_networks(cfg, seed=t.seed)
        self.student_module, self.teacher = student, self.fabric.to_device(teacher)
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=tuple(cfg.optim.betas))
        self.student, self.optimizer = self.fabric.setup(student, self.optimizer)
        self.ema = EMA(self.student_module, self.teacher)
        self.student_params = [p for p in self.student_module.parameters() if p.requires_grad]
        lo = cfg.loss
        self.cls_fs = FeatureSet(lo.cls_feature_set_size, cfg.model.head_out_dim, seed=t.seed) if lo.cls_weight > 0 else None
        self.patch_fs = (FeatureSet(lo.patch_feature_set_size, cfg.model.head_out_dim, seed=t.seed + 1)
                         if lo.patch_weight > 0 else None)
        for fs in (self.cls_fs, self.patch_fs):
            if fs is not None:
                fs.to(self.fabric.device)
        self.loss_fn = build_loss(cfg)
        global_batch = cfg.optim.batch_size * self.fabric.world_size
        self.schedules: Schedules = build_schedules(cfg.optim, cfg.loss, len(self.loader), global_batch)
        self.total_steps = min(self.schedules.total_iters, t.max_steps or self.schedules.total_iters)
        self.step = 0
        self.fabric.print(f"sove {__version__}: {len(self.dataset)} images, global batch {global_batch}, "
                          f"{len(self.loader)} steps/epoch, {self.total_steps} steps, "
                          f"peak lr {self.schedules.lr.max():.2e} (= {cfg.optim.base_lr} x {global_batch}/256), "
                          f"precision {self.fabric.strategy.precision.precision}, device {self.fabric.device}")

    # ----------------------------------------------------------------------------------- step
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step on one batch; returns the loss terms (detached)."""
        it, sch = self.step, self.schedules
        for group in self.optimizer.param_groups:
            group["lr"] = float(sch.lr[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(sch.weight_decay[it])
        crops, masks = batch["crops"], batch["masks"]  # masks: (2, B, L)
        b = crops[0].shape[0]
        global_crops = torch.cat(crops[:2])  # (2B, C, H, W), view-major
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
        flat_masks = masks.flatten(0, 1)  # (2B, L)
        owner = flat_masks.nonzero()[:, 0]  # image index of each masked token, row-major order

        with torch.no_grad(), self.fabric.autocast():
            t_out = self.teacher(global_crops, masks=None, patch_select=flat_masks)
        t_cls = t_out["cls"].float().view(2, b, -1)
        out = self.student(global_crops, local_crops, masks=flat_masks)
        s_cls = out["cls"].float().view(-1, b, out["cls"].shape[-1])
        terms = self.loss_fn(
            student_cls=s_cls, teacher_cls=t_cls, student_patches=out["patches"].float(),
            teacher_patches=t_out["patches"].float(), patch_owner=owner, num_images=2 * b,
            cls_feature_set=self.cls_fs, patch_feature_set=self.patch_fs, step=it,
            teacher_temp=float(sch.teacher_temp[it]),
        )
        self.check_finite(terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.fabric.backward(terms["loss"])
        clip_per_tensor(self.student_params, self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.ema.update(float(sch.momentum[it]))
        self.enqueue(t_cls, t_out["patch_tokens"], batch["index"], b)
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def enqueue(self, t_cls: torch.Tensor, t_patch_tokens: torch.Tensor, index: torch.Tensor, b: int) -> None:
        """E_C <- teacher CLS of global view 2; E_P <- one random teacher patch of view 2 per image."""
        if self.cls_fs is not None:
            self.cls_fs.enqueue(t_cls[1], index)
        if self.patch_fs is not None:
            tokens = t_patch_tokens[b:]  # (B, L, D) of view 2
            pos = torch.randint(tokens.shape[1], (b,), device=tokens.device)
            with self.fabric.autocast():
                emb = self.teacher.head(tokens[torch.arange(b, device=tokens.device), pos])
            self.patch_fs.enqueue(emb.float(), index)

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stop with the culprit term, the step, lr and temperatures when the loss is not finite."""
        if torch.isfinite(terms["loss"]):
            return
        bad = [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v)]
        sch, it = self.schedules, self.step
        raise SoveError(f"non-finite loss term(s) {bad or ['loss']} at step {it} "
                        f"(lr {sch.lr[it]:.3e}, teacher_temp {sch.teacher_temp[it]:.4f}, "
                        f"student_temp {self.cfg.loss.student_temp}); the last checkpoint is intact")

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> Path:
        """Train for ``optim.epochs`` (or ``trainer.max_steps``); returns the last checkpoint path."""
        t = self.cfg.trainer
        bar = tqdm(total=self.total_steps, disable=not (t.progress and self.fabric.is_global_zero),
                   desc="pretrain", unit="step", dynamic_ncols=True)
        epoch, seen, t0 = 0, 0, time.perf_counter()
        while self.step < self.total_steps:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(epoch)
            for batch in self.loader:
                terms = self.training_step(batch)
                self.step += 1
                seen += batch["index"].shape[0] * self.fabric.world_size
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.log(terms, epoch, seen / (time.perf_counter() - t0))
                    bar.set_postfix({k: f"{float(v):.3f}" for k, v in terms.items()}, refresh=False)
                bar.update(1)
                if self.step % t.checkpoint_every == 0:
                    self.save(epoch)
                if self.step >= self.total_steps:
                    break
            epoch += 1
        bar.close()
        path = self.save(epoch)
        for logger in self.fabric.loggers:
            logger.finalize("success")
        return path

    def log(self, terms: dict[str, torch.Tensor], epoch: int, img_per_s: float) -> None:
        it = self.step - 1
        sch = self.schedules
        metrics = {f"loss/{k}": float(v) for k, v in terms.items()}
        metrics.update({"lr": float(sch.lr[it]), "weight_decay": float(sch.weight_decay[it]),
                        "momentum": float(sch.momentum[it]), "teacher_temp": float(sch.teacher_temp[it]),
                        "epoch": epoch, "img_per_s": img_per_s})
        self.fabric.log_dict(metrics, step=self.step)

    def save(self, epoch: int) -> Path:
        """Atomically write ``checkpoints/last.pt`` (rank 0 only); returns its path."""
        path = self.run_dir / "checkpoints" / "last.pt"
        state = {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "cls_feature_set": self.cls_fs.state_dict() if self.cls_fs is not None else None,
            "patch_feature_set": self.patch_fs.state_dict() if self.patch_fs is not None else None,
            "step": self.step, "epoch": epoch,
            "rng": rng_state(),
            "config": OmegaConf.to_yaml(self.cfg),
            "version": __version__,
        }
        if self.fabric.is_global_zero:
            atomic_save(state, path)
            keep = self.cfg.trainer.keep_checkpoints
            if keep > 0:
                atomic_save(state, path.with_name(f"step_{self.step:07d}.pt"))
                for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
                    old.unlink()
        self.fabric.barrier()
        return path


def pretrain(cfg: DictConfig, overwrite: bool = False) -> Path:
    """Run SOVE pretraining for ``cfg``; returns the run directory ``trainer.out_dir/trainer.name``.

    Writes ``config.yaml`` (the resolved config), ``metrics.csv``, TensorBoard events and
    ``checkpoints/last.pt`` (atomic, every ``trainer.checkpoint_every`` steps and at the end).

    Raises:
        SoveError: existing run directory without ``overwrite``; data or config problems.
    """
    run_dir = prepare_run_dir(cfg, overwrite)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer = Trainer(cfg, run_dir)
    start = time.perf_counter()
    trainer.fit()
    trainer.fabric.print(f"pretraining done in {(time.perf_counter() - start) / 60:.1f} min: {run_dir}")
    return run_dir


