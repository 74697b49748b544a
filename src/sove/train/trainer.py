"""The training loop on Lightning Fabric, one for every method. The one place that knows the order of a step.

One step (docs/architecture.md, "Who owns what in a step")::

    method.begin_step                                      (SOVE: E_P positions of the global batch)
    per micro-batch: method.forward_step -> terms -> backward (teacher + student forward, loss)
    per-tensor clip -> AdamW -> EMA(teacher) -> method.after_optimizer_step (SOVE: enqueue E_C, E_P;
                                                                          DINO/iBOT: center update)

The method (:mod:`sove.method`: SOVE, DINO, iBOT) owns heads, buffers and losses; this module owns data,
schedules, optimizer, clipping, EMA, precision, logging, checkpoints and the loop.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sove import __version__
from sove.data import SSLDataset, collate_views
from sove.data.decode import unreadable_report
from sove.data.decoded import DecodedDataset, DeviceViews
from sove.data.sampler import EpochKeys, ResumableSampler
from sove.distributed import all_gather_objects
from sove.errors import DataError, SoveError
from sove.method import Method, StepContext, build_method, checkpoint_method
from sove.models import build_networks
from sove.train import checkpoint as ckpt
from sove.seeding import SCHEME as SEED_SCHEME, generator, stream_seed
from sove.train.budget import TimeBudget
from sove.train.builders import build_train_dataset, loader_options, resolve_precision
from sove.train.diagnostics import Diagnostics, SkippedStep
from sove.train.stop import (StopRequest, TrainingInterrupted, ignore_stop_signals, shut_down_workers,
                             shut_down_workers_at_exit)
from sove.train.loggers import build_loggers, finalize_loggers, start_loggers
from sove.train.metrics_csv import MetricsCSV
from sove.train.optim import EMA, clip_per_tensor, param_groups
from sove.train.preflight import check_budget_plan
from sove.train.schedules import Schedules, build_schedules


def use_deterministic_kernels() -> tuple[bool, bool, bool]:
    """``trainer.deterministic``: deterministic kernels for this process (docs/configs.md); returns the
    previous (enabled, warn_only, cudnn.benchmark) for :func:`restore_kernels`.

    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set when not set already; cuBLAS reads it when CUDA first
    creates a handle, so in a process that used CUDA before, set it in the environment instead. Ops
    without a deterministic kernel warn once instead of failing (``warn_only=True``); the two such ops
    of a step are avoided: attention runs on the math SDPA backend (:meth:`Trainer.kernels`) and the
    local crops' position embedding is resampled by a matrix (:meth:`MaskedViT.position_embed`).
    """
    import os

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return before


def restore_kernels(before: tuple[bool, bool, bool]) -> None:
    """Undo :func:`use_deterministic_kernels` (process-wide settings)."""
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark = before[2]


#: trainers alive with ``trainer.deterministic`` and the settings from before the first of them
_KERNEL_HOLDERS: dict[str, Any] = {"count": 0, "before": None}


def hold_deterministic_kernels() -> None:
    """One more holder of the deterministic kernels: the first applies :func:`use_deterministic_kernels`."""
    if _KERNEL_HOLDERS["count"] == 0:
        _KERNEL_HOLDERS["before"] = use_deterministic_kernels()
    _KERNEL_HOLDERS["count"] += 1


def release_deterministic_kernels() -> None:
    """One holder fewer: the last restores the settings from before the first (:func:`restore_kernels`), so
    two trainers closed in any order leave the process as it was."""
    _KERNEL_HOLDERS["count"] -= 1
    if _KERNEL_HOLDERS["count"] == 0:
        restore_kernels(_KERNEL_HOLDERS["before"])
        _KERNEL_HOLDERS["before"] = None


class Trainer(Diagnostics):
    """Owns the networks, optimizer, schedules and loop of one pretraining run; ``method`` the objective."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dataset: SSLDataset | None = None,
                 networks: tuple[torch.nn.Module, torch.nn.Module] | None = None, method: Method | None = None,
                 callbacks: Iterable[Any] = ()) -> None:
        """Set up Fabric, data, method, networks, optimizer and schedules.

        Args:
            cfg: the full config.
            run_dir: the run directory (exists; rank 0 made it).
            dataset: the training dataset (default: built from ``cfg.data``).
            networks: (student, teacher) to train instead of :func:`build_networks` ones with the
                method's head (``trainer.init_from`` / ``model.init`` give them this way).
            method: the objective (default: :func:`sove.method.build_method` of ``cfg.method``).
            callbacks: Fabric callbacks; ``on_train_epoch_end(trainer=...)`` is called after each epoch
                (the periodic k-NN of :mod:`sove.eval.periodic`, attached by :mod:`sove.api`, which also
                holds the entry points ``pretrain`` / ``resume`` that build and run a Trainer).

        Raises:
            SoveError: ``method=dino|ibot`` without lightly; fewer images than one global batch.
        """
        self.cfg, self.run_dir = cfg, run_dir
        # Optional phase timer (benchmarks): a callable name -> context manager; None = no timing.
        self.timer: Callable[[str], ContextManager] | None = None
        # The SIGINT / SIGTERM request while :meth:`fit` runs (callbacks read it: sove.eval.periodic).
        self.stop: StopRequest | None = None
        t = cfg.trainer
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        loggers = build_loggers(cfg, run_dir)  # trainer.loggers, MetricsCSV first
        self.fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                             strategy=t.strategy, precision=resolve_precision(cfg), loggers=loggers,
                             callbacks=list(callbacks))
        self.metrics_csv: MetricsCSV = loggers[0]
        self.fabric.launch()
        if self.fabric.is_global_zero:
            start_loggers(loggers, cfg, run_dir)
        # torch / numpy / random global RNGs (drop path, device augmentation) from the ``global`` stream
        self.fabric.seed_everything(stream_seed(t.seed, "global", bits=32), verbose=False)
        self.dataset = dataset if dataset is not None else build_train_dataset(cfg)
        b, world = cfg.optim.batch_size, self.fabric.world_size
        if len(self.dataset) < b * world:
            raise DataError(f"data.root: {len(self.dataset)} images is fewer than one global batch "
                            f"({b} x {world}); lower optim.batch_size")
        self.sampler = ResumableSampler(len(self.dataset), b, world, self.fabric.global_rank, t.seed)
        # A private generator keeps the loader from drawing on the global RNG at each epoch start.
        on_device = isinstance(self.dataset, DecodedDataset)  # data.augment_on=device
        loader = DataLoader(self.dataset, batch_size=b, sampler=EpochKeys(self.sampler), drop_last=True,
                            collate_fn=self.dataset.collate if on_device else collate_views,
                            generator=generator(t.seed, "loader"), worker_init_fn=ignore_stop_signals,
                            **loader_options(cfg, self.fabric.device))
        self.torch_loader = loader  # its persistent workers: close(), and at exit before multiprocessing's handler
        self.exit_hook = shut_down_workers_at_exit(loader)
        self.loader = self.fabric.setup_dataloaders(loader, use_distributed_sampler=False, move_to_device=not on_device)
        if on_device:  # the workers decoded; the views are made on the training device
            self.loader = DeviceViews(self.loader, self.dataset, self.fabric.device)
        self.method = method if method is not None else build_method(cfg)
        student, teacher = networks if networks is not None else build_networks(cfg, t.seed, self.method.make_head)
        self.student_module, self.teacher = student, self.fabric.to_device(teacher)
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=tuple(cfg.optim.betas))
        self.student, self.optimizer = self.fabric.setup(
            torch.compile(student) if t.compile else student, self.optimizer)
        self.ema = EMA(self.student_module, self.teacher)
        self.student_params = [p for p in self.student_module.parameters() if p.requires_grad]
        self.method.to(self.fabric.device)
        self.budget = TimeBudget(cfg, self.sampler.batches_per_epoch, b * world) if t.time_budget else None
        self.schedules: Schedules = (self.budget.schedules() if self.budget is not None else
                                     build_schedules(cfg.optim, cfg.loss, self.sampler.batches_per_epoch, b * world))
        self.total_steps = min(self.schedules.total_iters, t.max_steps or self.schedules.total_iters)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.checkpoint_step: int | None = None  # step of the last checkpoint saved or resumed from
        self.skipped: list[str] = []  # messages of unreadable images met since the last report
        self.unreadable: dict[str, None] = {}  # every distinct one reported so far, in order
        labels = getattr(self.dataset.source, "labels", None)
        self.labels = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
        steps = (f"{self.total_steps} steps" if self.total_steps == self.schedules.total_iters else
                 f"{self.total_steps} of the schedule's {self.schedules.total_iters} steps (trainer.max_steps)")
        if self.budget is not None:
            steps = (f"steps sized to trainer.time_budget={t.time_budget} by the pace of the first steps"
                     + (f" (stop at trainer.max_steps={t.max_steps})" if t.max_steps else ""))
        # last: a failure above leaves the process-wide settings untouched (close() restores them later)
        self.holds_kernels, self.closed = False, False
        self.hold_kernels()
        self.fabric.print(f"sove {__version__}: method {self.method.name}, {len(self.dataset)} images, "
                          f"global batch {b * world}, {self.sampler.batches_per_epoch} steps/epoch, {steps}, "
                          f"peak lr {cfg.optim.base_lr * b * world / 256:.2e} (= {cfg.optim.base_lr} x {b * world}/256), "
                          f"precision {self.fabric.strategy.precision.precision}, device {self.fabric.device}")

    def close(self) -> None:
        """Stop the data loader's persistent workers (``data.num_workers`` > 0; a later :meth:`fit` starts
        new ones, also done at interpreter exit: :func:`sove.train.stop.shut_down_workers_at_exit`) and
        restore the process-wide kernel settings ``trainer.deterministic`` changed."""
        shut_down_workers(self.torch_loader)
        atexit.unregister(self.exit_hook)
        self.closed = True
        if self.holds_kernels:
            release_deterministic_kernels()
            self.holds_kernels = False

    def hold_kernels(self) -> None:
        """With ``trainer.deterministic``: hold the deterministic kernels (:func:`hold_deterministic_kernels`)
        until :meth:`close`; again in a :meth:`fit` after :meth:`close`."""
        if self.cfg.trainer.deterministic and not self.holds_kernels:
            hold_deterministic_kernels()
            self.holds_kernels = True

    def kernels(self) -> ContextManager:
        """Context of a step's forward and backward: with ``trainer.deterministic`` the math SDPA backend
        (the fused attention kernels' CUDA backward is not deterministic), else no change."""
        if not self.holds_kernels:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    def phase(self, name: str) -> ContextManager:
        """Context timing one phase of a step (``forward``, ``objective``, ``backward``, ``optimizer``,
        ``enqueue``, ``data``) with :attr:`timer`; a no-op when no timer is set."""
        return contextlib.nullcontext() if self.timer is None else self.timer(name)

    # ----------------------------------------------------------------------------------- step
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step on one batch (split into ``optim.accumulate_grad_batches`` micro-batches).

        Every micro-batch sees the same method state (feature sets, centers change only after the
        optimizer step) and its loss is divided by the number of micro-batches, so the gradient
        equals the full batch's. :meth:`Method.after_optimizer_step` runs once, after the EMA.

        Returns:
            The loss terms (detached), averaged over micro-batches.
        """
        it, sch = self.step, self.schedules
        for group in self.optimizer.param_groups:
            group["lr"] = float(sch.lr[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(sch.weight_decay[it])
        b, parts = batch["index"].shape[0], self.cfg.optim.accumulate_grad_batches
        ctx = StepContext(it, float(sch.teacher_temp[it]), self.fabric.global_rank, self.fabric.world_size,
                          self.fabric.autocast, self.phase)
        self.method.begin_step(ctx, batch)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for k, lo in enumerate(range(0, b, b // parts)):
            with self.fabric.no_backward_sync(self.student, enabled=k < parts - 1), self.kernels():
                terms = self.micro_step(batch, slice(lo, lo + b // parts), ctx, 1.0 / parts)
            if isinstance(terms, SkippedStep):
                return terms.terms  # the NaN guard's report (skip mode)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value / parts
        with self.phase("optimizer"):
            if not clip_per_tensor(self.student_params, self.cfg.optim.clip_grad):
                self.optimizer.zero_grad(set_to_none=True)
                return self.non_finite(["gradient"], totals, batch, {})
            self.optimizer.step()
            self.ema.update(float(sch.momentum[it]))
        with self.phase("enqueue"):
            self.method.after_optimizer_step(batch["index"])
        if self.cfg.trainer.check_sync and self.fabric.world_size > 1:
            self.check_sync()
        return totals

    def micro_step(self, batch: dict[str, Any], micro: slice, ctx: StepContext,
                   scale: float) -> dict[str, torch.Tensor] | SkippedStep:
        """Forward and loss of one micro-batch (:meth:`Method.forward_step`), then backward of ``scale`` x loss.

        Returns:
            The detached loss terms, or a :class:`SkippedStep` when the loss is not finite and
            ``trainer.on_nonfinite=skip`` (with ``stop`` the NaN guard raises).
        """
        terms = self.method.forward_step(self.student, self.teacher, batch, micro, ctx)
        if not bool(torch.isfinite(terms["loss"])):
            bad = [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v)] or ["loss"]
            return SkippedStep(self.non_finite(bad, terms, batch, self.method.report_stats()))
        with self.phase("backward"):
            self.fabric.backward(terms["loss"] * scale)
        return {k: v.detach() for k, v in terms.items()}

    # ----------------------------------------------------------------------------------- loop
    def fit(self, deadline: float | None = None) -> Path | None:
        """Train until ``optim.epochs`` (or ``trainer.max_steps``); returns the last checkpoint path.

        Args:
            deadline: optional ``time.perf_counter()`` value: stop after the step that passes it,
                without saving, and return None; a later ``fit`` call continues exactly there
                (the benchmarks alternate methods this way).

        Raises:
            TrainingInterrupted: SIGINT / SIGTERM arrived; the step in progress was finished and saved
                (:mod:`sove.train.stop`).
        """
        if self.closed:  # fit() after close(): new loader workers, again stopped at interpreter exit
            atexit.register(self.exit_hook)
            self.closed = False
        self.hold_kernels()
        with StopRequest(announce=self.fabric.is_global_zero) as self.stop:
            return self._fit(deadline, self.stop)

    def _fit(self, deadline: float | None, stop: StopRequest) -> Path | None:
        t = self.cfg.trainer
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (t.progress and self.fabric.is_global_zero),
                   desc="pretrain", unit="step", dynamic_ncols=True)
        seen, t0 = 0, time.perf_counter()
        if self.budget is not None:
            self.budget.start(self.clock())
        while self.step < self.total_steps:
            if self.batch_in_epoch >= self.sampler.batches_per_epoch:
                self.end_epoch()
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            self.dataset.set_epoch(self.epoch)
            batches = iter(self.loader)
            while True:
                with self.phase("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                terms = self.training_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                self.skipped += batch.get("skipped", [])
                seen += batch["index"].shape[0] * self.fabric.world_size
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    if self.fabric.world_size > 1:  # the global-batch loss: mean over ranks
                        terms = self.fabric.all_reduce(terms, reduce_op="mean")
                    self.log(terms, seen / (time.perf_counter() - t0))
                    bar.set_postfix({k: f"{float(v):.3f}" for k, v in terms.items()}, refresh=False)
                bar.update(1)
                if self.budget is not None:
                    self.follow_budget(bar)
                if self.batch_in_epoch == self.sampler.batches_per_epoch:
                    self.end_epoch()  # before saving: a checkpoint never sits at an epoch's end
                if self.step % t.checkpoint_every == 0:
                    self.save()
                if self.step >= self.total_steps:
                    break
                signum = self.stop_signal(stop)
                if signum:
                    bar.close()
                    saved = self.checkpoint_step == self.step  # by checkpoint_every just now
                    path = self.run_dir / "checkpoints" / "last.pt" if saved else self.save()
                    finalize_loggers(self.fabric.loggers)
                    # Lightning's launcher kills rank 0 when another rank exits non-zero: leave together
                    self.fabric.barrier()
                    raise TrainingInterrupted(signum, self.step, path, self.run_dir)
                if deadline is not None and time.perf_counter() >= deadline:
                    bar.close()
                    return None
        bar.close()
        self.report_skipped()
        path = self.save()
        finalize_loggers(self.fabric.loggers)
        return path

    def stop_signal(self, stop: StopRequest) -> int:
        """The signal that asked this run to stop (0: none), the same on every rank: with several
        processes the largest signal number over the ranks (one all-reduce per step), so all ranks
        stop after the same step and write one checkpoint together."""
        signum = stop.signum or 0
        if self.fabric.world_size > 1:
            flag = torch.tensor(float(signum), device=self.fabric.device)
            signum = int(self.fabric.all_reduce(flag, reduce_op="max").item())
        return signum

    def clock(self) -> float:
        """Seconds of the clock the time budget reads (``time.perf_counter``; tests replace it)."""
        return time.perf_counter()

    def follow_budget(self, bar: tqdm) -> None:
        """After a step: let the time budget measure the pace and re-size the schedules (:mod:`sove.train.budget`)."""
        line = self.budget.after_step(self.step, self.clock(), lambda total: self.fabric.broadcast(total, src=0))
        if line is None:
            return
        self.schedules = self.budget.schedules()
        self.total_steps = min(self.schedules.total_iters, self.cfg.trainer.max_steps or self.schedules.total_iters)
        bar.total = self.total_steps
        self.fabric.print(line, flush=True)
        check_budget_plan(self.cfg, self.schedules.total_iters, self.cfg.optim.batch_size * self.fabric.world_size)

    def end_epoch(self) -> None:
        """Report unreadable images of the epoch, move to the next epoch, call the callbacks'
        ``on_train_epoch_end`` (the periodic k-NN runs on a forked RNG: training is the same with or without it)."""
        self.report_skipped()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.fabric.call("on_train_epoch_end", trainer=self)

    def report_skipped(self) -> None:
        """When some rank met a new unreadable file: ``epoch E: skipped N unreadable file(s) of TOTAL (list
        in RUN/unreadable_train.txt); TOTAL - N images used``, N counting each file of the run once."""
        met = [m for messages in all_gather_objects(self.skipped) for m in messages]
        self.skipped = []
        new = [m for m in dict.fromkeys(met) if m not in self.unreadable]
        if not new:
            return
        self.unreadable.update(dict.fromkeys(new))
        if self.fabric.is_global_zero:
            line = unreadable_report(list(self.unreadable), len(self.dataset), self.run_dir / "unreadable_train.txt")
            self.fabric.print(f"epoch {self.epoch}: {line} (data.on_error=skip)")

    def log(self, terms: dict[str, torch.Tensor], img_per_s: float) -> None:
        it, sch = self.step - 1, self.schedules
        metrics = {f"loss/{k}": float(v) for k, v in terms.items()}
        metrics.update(self.method.metrics(self.labels, self.step))
        metrics.update({"lr": float(sch.lr[it]), "weight_decay": float(sch.weight_decay[it]),
                        "momentum": float(sch.momentum[it]), "teacher_temp": float(sch.teacher_temp[it]),
                        "epoch": self.epoch, "img_per_s": img_per_s})
        self.fabric.log_dict(metrics, step=self.step)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (docs/method.md, "Feature sets"; docs/architecture.md, "Run directory");
        ``method`` = ``{"name": cfg.method, "state": the method's state_dict}`` (feature sets, centers)."""
        return {
            "student": self.student_module.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": {"name": self.method.name, "state": self.method.state_dict()},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": ckpt.rng_state(), "config": OmegaConf.to_yaml(self.cfg), "version": __version__,
            "seed_scheme": SEED_SCHEME,
            "world_size": self.fabric.world_size, "precision": self.fabric.strategy.precision.precision,
            "time_budget": self.budget.state_dict(self.clock()) if self.budget is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore a :meth:`state_dict` (strict keys; ``source`` names the file in errors). A checkpoint
        written before methods existed loads as a SOVE one (:func:`sove.method.checkpoint_method`).

        Raises:
            SoveError: the checkpoint's method is not ``cfg.method``; a state that does not fit (naming the keys).
        """
        name, method_state = checkpoint_method(state, source)
        if name != self.method.name:
            raise SoveError(f"{source} was trained with method={name}, this run is method={self.method.name}; "
                            f"resume it with method={name}, or start a new run")
        ckpt.load_state_strict(self.student_module, state["student"], f"student in {source}")
        ckpt.load_state_strict(self.teacher, state["teacher"], f"teacher in {source}")
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.load_state_strict(self.method, method_state, f"method {name} in {source}")
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if self.budget is not None:
            self.budget.load_state_dict(state.get("time_budget"), source)
            self.schedules = self.budget.schedules()
            self.total_steps = min(self.schedules.total_iters, self.cfg.trainer.max_steps or self.schedules.total_iters)
        self.checkpoint_step = self.step
        ckpt.set_rng_state(state["rng"])
        self.metrics_csv.resume_at(self.step)

    def save(self) -> Path:
        """Atomically write ``checkpoints/last.pt`` (+ a step copy, keep-N) on rank 0; returns its path."""
        path = self.run_dir / "checkpoints" / "last.pt"
        state = self.state_dict()
        self.checkpoint_step = self.step
        if self.fabric.is_global_zero:
            ckpt.atomic_save(state, path)
            keep = self.cfg.trainer.keep_checkpoints
            if keep > 0:
                ckpt.atomic_save(state, path.with_name(f"step_{self.step:07d}.pt"))
                for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
                    old.unlink()
        self.fabric.barrier()
        return path

