"""The entry points: ``sove.pretrain`` / ``sove.resume`` (Python, docs/python_api.md) and what
``sove pretrain`` runs (:func:`start_run`, :func:`resume_run`): the training loop of
:mod:`sove.train.trainer` with the evaluation callbacks attached and the curves drawn at the end.

The layers point down (data / models / method -> train -> eval / viz -> cli): this module, above
train, eval and viz, is where they meet, so the trainer never imports evaluation or plotting code.

Overrides are given as one keyword per config section holding a dict of its keys (nested dicts for
nested sections), or a top-level key's value::

    sove.pretrain("fashion_mnist_tiny", optim={"epochs": 1}, loss={"cls": {"num_anchors": 8}}, method="dino")
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from sove.config import SOVEConfig, load_config
from sove.errors import ConfigError, SoveError
from sove.run import Run

#: The config's sections (keywords taking a dict) and top-level keys (keywords taking a value).
SECTIONS = tuple(f.name for f in dataclasses.fields(SOVEConfig) if dataclasses.is_dataclass(f.default_factory))
TOP_KEYS = tuple(f.name for f in dataclasses.fields(SOVEConfig) if f.name not in SECTIONS)


def pretrain(config_or_dict: str | os.PathLike | Mapping | DictConfig | None = None, dataset: Any = None, *,
             test_dataset: Any = None, overwrite: bool = False, **overrides: Any) -> Run:
    """Pretrain a backbone with ``method`` (SOVE by default) on a preset, a YAML file or a dict; returns the run.

    Args:
        config_or_dict: a packaged preset's name (``"fashion_mnist_tiny"``), a YAML path, a nested dict of
            config keys over the defaults, or a config from :func:`sove.config.load_config` (used as given
            when nothing else changes it); None: the defaults (paper ViT-S/16).
        dataset: the training images: a folder path (``data.source=folder``, ``data.root=PATH``), or a
            map-style ``torch.utils.data.Dataset`` (or list) whose items are PIL images, uint8 HWC arrays,
            uint8 CHW tensors or ``(image, label)`` tuples (:mod:`sove.data.python_source`; read on access,
            not copied; labels from its ``targets`` / ``labels`` attribute). The run records
            ``data.source=python`` and a description in ``data.root``. None: the config's data.
        test_dataset: with a Python ``dataset``, a labelled dataset of the same kind whose integer labels
            number the same classes: the test split of the periodic k-NN (``eval.knn_every_epochs``;
            without it that k-NN is skipped; with ``eval.knn_every_epochs=0`` it is unused, with a
            ``sove: warning:`` at the start). Read on access, not recorded in the run.
        overwrite: replace an existing run of the same ``trainer.out_dir/trainer.name``.
        **overrides: config sections as dicts (``optim={"epochs": 1}``) or top-level keys (``method="dino"``),
            applied after ``config_or_dict`` (docs/configs.md lists the keys).

    Returns:
        :class:`sove.run.Run` of ``trainer.out_dir/trainer.name``: ``.backbone()``, ``.metrics()``, ``.path``.

    Raises:
        ConfigError: an unknown section or key (named), a bad value.
        SoveError: a dataset item of another type (naming the index); ``test_dataset`` without a Python
            ``dataset``, either of them without labels, a test label the train labels do not have; the
            errors of :func:`start_run`.
    """
    source, data = _data(dataset)
    test_source = _test_source(source, test_dataset, dataset)
    cfg = config_or_dict
    if not (isinstance(cfg, DictConfig) and not overrides and not data):
        cfg = _load(config_or_dict, _dotlist(overrides, "sove.pretrain") + data)
    if source is not None:
        source.num_channels = cfg.data.num_channels
        print(f"data: {source.description}, " + (f"{len(source.classes)} classes (from its .targets/.labels)"
                                                   if source.classes else "no labels (no .targets/.labels)"))
    _check_test_source(cfg, test_source)
    return Run(start_run(cfg, overwrite, source, test_source=test_source))


def resume(run_dir: str | os.PathLike, dataset: Any = None, *, test_dataset: Any = None, **overrides: Any) -> Run:
    """Continue a run exactly where ``checkpoints/last.pt`` left it; returns the run.

    Args:
        run_dir: the run directory (or a :class:`~sove.run.Run`).
        dataset: the same dataset the run was trained on, for a ``data.source=python`` run (checked
            against its recorded description: type and length); None otherwise.
        test_dataset: as in :func:`pretrain` (the periodic k-NN's test split of a Python-dataset run).
        **overrides: as in :func:`pretrain`; only trajectory-neutral keys may change (e.g.
            ``trainer={"max_steps": None}``).

    Raises:
        SoveError: a python-dataset run without ``dataset=`` or with another one, ``dataset=`` for a run
            that reads its images itself; the errors of :func:`resume_run`.
    """
    dotlist = _dotlist(overrides, "sove.resume")
    cfg = Run(run_dir, overrides=dotlist).config
    source = None
    if dataset is not None or cfg.data.source == "python":
        from sove.data.python_source import NOT_ON_DISK, PythonSource, describe

        if cfg.data.source != "python":
            raise SoveError(f"sove.resume(dataset=...): '{os.fspath(run_dir)}' reads its images itself "
                            f"(data.source={cfg.data.source}); resume it without dataset=")
        if dataset is None:
            raise SoveError(NOT_ON_DISK.format(root=cfg.data.root))
        if describe(dataset) != cfg.data.root:
            raise SoveError(f"sove.resume(dataset=...): got {describe(dataset)}, the run was trained on "
                            f"{cfg.data.root}; pass the same dataset (an exact resume needs the same items)")
        source = PythonSource(dataset, cfg.data.num_channels)
    test_source = _test_source(source, test_dataset, dataset)
    _check_test_source(cfg, test_source)
    return Run(resume_run(Path(run_dir), dotlist, source, test_source=test_source))


def start_run(cfg: DictConfig, overwrite: bool = False, source: Any = None, callbacks: Iterable[Any] = (),
              test_source: Any = None) -> Path:
    """Run pretraining of ``cfg.method`` for ``cfg`` (``sove pretrain``); returns ``trainer.out_dir/trainer.name``.

    Writes ``config.yaml`` (the resolved config), ``metrics.csv``, TensorBoard events,
    ``checkpoints/last.pt`` (atomic, every ``trainer.checkpoint_every`` steps and at the end) and
    ``plots/curves.png``. ``trainer.init_from=CKPT`` initialises student and teacher from another run's
    checkpoint, ``model.init=SOURCE`` their backbones (a fresh run; see :mod:`sove.train.init_from`).
    Data, run plan (:func:`~sove.train.preflight.check_run_plan`) and initial weights are checked before
    the run directory is created. The periodic k-NN (``eval.knn_every_epochs``) is attached, plus ``callbacks``
    (Fabric callbacks, see :class:`~sove.train.trainer.Trainer`). ``source``: the images instead of
    ``cfg.data``'s (a :class:`~sove.data.python_source.PythonSource`); ``test_source``: the periodic k-NN's
    test split for such a source (its train split is ``source``).

    With ``trainer.auto_resume=true``, or after a torchrun restart, a run directory holding a checkpoint
    is resumed as by :func:`resume_run` with ``cfg`` (:func:`sove.run.auto_resume_checkpoint`).

    Raises:
        SoveError: existing run without ``overwrite`` or auto-resume (a folder that is not a sove run: never
            replaced), run in use, absent device, unwritable ``trainer.out_dir`` (checked before any work); data,
            config (run plan) or initial-weight problems; ``overwrite`` with ``trainer.auto_resume=true``.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from sove.method import build_method
    from sove.run import auto_resume_checkpoint, auto_resume_reason, prepare_run_dir
    from sove.run_lock import rank_zero_lock
    from sove.train.builders import build_train_dataset, preflight
    from sove.train.init_from import initial_networks
    from sove.train.preflight import check_run_plan, planned_world_size
    from sove.train.trainer import Trainer

    if (last := auto_resume_checkpoint(cfg, overwrite)) is not None:  # trainer.auto_resume, or a torchrun restart
        return _resume(cfg, last.parents[1], source, callbacks, auto_resume_reason(), test_source)
    run_dir = preflight(cfg, overwrite)  # name, device, existing folder, writable: before any work
    dataset = build_train_dataset(cfg, source)  # bad data stops here, before the run directory exists
    check_run_plan(cfg, len(dataset), planned_world_size(cfg))
    method = build_method(cfg)  # a missing optional dependency stops here
    networks = initial_networks(cfg, method.make_head)  # trainer.init_from / model.init, before the run directory
    with rank_zero_lock(run_dir):
        if rank_zero_only.rank == 0:  # before the launch: the processes Fabric spawns skip this
            prepare_run_dir(cfg, overwrite)
        return _fit(Trainer(cfg, run_dir, dataset, networks, method, _callbacks(callbacks, source, test_source)),
                    run_dir)


def resume_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), source: Any = None,
               callbacks: Iterable[Any] = (), test_source: Any = None) -> Path:
    """Continue a run exactly where ``checkpoints/last.pt`` left it, mid-epoch included (``sove pretrain --resume``).

    The run's own ``config.yaml`` is used; ``overrides`` (``key=value``) may change only trajectory-neutral
    keys (:data:`sove.train.preflight.TRAJECTORY_NEUTRAL`, e.g. ``trainer.max_steps``), on the same
    number of processes and precision. Everything is checked before the run directory is touched.
    ``metrics.csv`` keeps its rows up to the checkpoint's step. ``source``, ``callbacks``, ``test_source``: as in :func:`start_run`.

    Raises:
        SoveError: not a run directory, no checkpoint in it, in use by another process, absent device,
            or a resume that would change training (:func:`~sove.train.preflight.check_resume`, naming the keys).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SoveError(f"--resume: '{run_dir}' is not a sove run directory (no config.yaml)")
    return _resume(load_config(str(run_dir / "config.yaml"), overrides), run_dir, source, callbacks, "--resume",
                   test_source)


def _resume(cfg: DictConfig, run_dir: Path, source: Any, callbacks: Iterable[Any], how: str,
            test_source: Any = None) -> Path:
    """Continue ``run_dir`` from its ``last.pt`` with ``cfg`` (checked against the checkpoint's config;
    ``how`` names what resumes in the messages)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from sove.preflight import check_trainer_device
    from sove.run import resume_checkpoint
    from sove.run_lock import rank_zero_lock
    from sove.train import checkpoint as ckpt
    from sove.train.builders import build_train_dataset, resolve_precision
    from sove.train.loggers import check_installed
    from sove.train.preflight import check_resume, check_run_plan, planned_world_size
    from sove.train.trainer import Trainer

    check_trainer_device(cfg, resolve_precision(cfg))
    check_installed(list(cfg.trainer.loggers))
    with rank_zero_lock(run_dir):
        path = resume_checkpoint(run_dir)
        state = ckpt.load_checkpoint(path)
        world = planned_world_size(cfg)
        check_resume(state, cfg, world, resolve_precision(cfg), str(path), how)
        dataset = build_train_dataset(cfg, source)
        check_run_plan(cfg, len(dataset), world)
        if rank_zero_only.rank == 0:
            ckpt.remove_stale_temporaries(run_dir / "checkpoints")
        trainer = Trainer(cfg, run_dir, dataset, callbacks=_callbacks(callbacks, source, test_source))
        try:
            trainer.load_state_dict(state, str(path))
        except BaseException:
            trainer.close()  # loader workers stopped, process-wide kernel settings restored
            raise
        trainer.fabric.print(f"resumed {path} at step {trainer.step} (epoch {trainer.epoch}, batch {trainer.batch_in_epoch})")
        return _fit(trainer, run_dir)


def _callbacks(extra: Iterable[Any], source: Any = None, test_source: Any = None) -> list[Any]:
    """The periodic k-NN (on ``source`` / ``test_source`` when a test source is given), then ``extra``."""
    from sove.eval.periodic import PeriodicKNN

    return [PeriodicKNN((source, test_source) if test_source is not None else None), *extra]


def _fit(trainer: Any, run_dir: Path) -> Path:
    """Train, print the time (and the time budget's report), draw ``RUN/plots/curves.png`` (rank 0)."""
    start = time.perf_counter()
    try:
        trainer.fit()
    finally:
        trainer.close()  # loader workers stopped, process-wide kernel settings restored
    if trainer.budget is not None:
        trainer.fabric.print(trainer.budget.report(trainer.step, trainer.clock()), flush=True)
    trainer.fabric.print(f"pretraining done in {(time.perf_counter() - start) / 60:.1f} min: {run_dir}")
    if trainer.fabric.is_global_zero:
        from sove.viz.curves import plot_curves

        print(f"training curves: {plot_curves(run_dir)}", flush=True)
    return run_dir


def _load(config: Any, dotlist: list[str]) -> DictConfig:
    """:func:`load_config` of a preset name / YAML path / dict / DictConfig with ``dotlist`` after it."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return load_config(None, _flatten(config, "") + dotlist)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"sove.pretrain: config_or_dict must be a preset name, a YAML path, a dict or a "
                          f"DictConfig, got a {type(config).__name__}")
    return load_config(None if config is None else os.fspath(config), dotlist)


def _dotlist(overrides: Mapping[str, Any], where: str) -> list[str]:
    """``key=value`` strings of keyword overrides (module docstring); ConfigError naming a bad keyword."""
    out = []
    for name, value in overrides.items():
        if name in SECTIONS and isinstance(value, Mapping):
            out += _flatten(value, name + ".")
        elif name in SECTIONS:
            raise ConfigError(f"{where}({name}=...): a config section takes a dict of its keys, e.g. "
                              f"{name}={{'KEY': VALUE}}; got a {type(value).__name__}")
        elif name in TOP_KEYS:
            out.append(f"{name}={json.dumps(value, default=str)}")
        else:
            raise ConfigError(f"{where}({name}=...): '{name}' is not a config section or key; the sections are "
                              f"{', '.join(SECTIONS)} (each a dict), the keys {', '.join(TOP_KEYS)}")
    return out


def _flatten(values: Mapping[str, Any], prefix: str) -> list[str]:
    """``prefix.key=JSON value`` for every leaf of a nested dict (JSON is YAML: OmegaConf parses it back)."""
    out = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value, default=str)}")
    return out


def _test_source(source: Any, test_dataset: Any, dataset: Any) -> Any:
    """The :class:`~sove.data.python_source.PythonSource` of ``test_dataset`` (None without one), checked
    against the train ``source``: both labelled, every test label one of the train labels.

    Raises:
        SoveError: ``test_dataset`` without a Python ``dataset`` (a folder run sets ``data.test_root``),
            a split without labels, a test label beyond the train labels.
    """
    if test_dataset is None:
        return None
    if source is None:
        where = ("a folder dataset=: set data.test_root=TEST_FOLDER instead" if isinstance(dataset, (str, os.PathLike))
                 else "no Python dataset=")
        raise SoveError(f"test_dataset= is the periodic k-NN's test split of a Python dataset=, and this run has "
                        f"{where}")
    from sove.data.python_source import PythonSource

    test = PythonSource(test_dataset)
    for name, split in (("dataset", source), ("test_dataset", test)):
        if split.labels is None:
            raise SoveError(f"{name}=: the {type(split.dataset).__name__} has no .targets / .labels (int labels, one "
                            "per item); the periodic k-NN needs labels in both splits")
    if int(test.labels.max()) >= len(source.classes):
        raise SoveError(f"test_dataset=: label {int(test.labels.max())} is not a label of dataset= (0 .. "
                        f"{len(source.classes) - 1}); both must number the same classes")
    return test


def _check_test_source(cfg: DictConfig, test_source: Any) -> None:
    """Give ``test_source`` the run's ``data.num_channels``; warn (``sove: warning:``, rank 0) when the periodic
    k-NN that would read it is off (``eval.knn_every_epochs=0``)."""
    from sove.train.preflight import warn

    if test_source is None:
        return
    test_source.num_channels = cfg.data.num_channels
    if cfg.eval.knn_every_epochs == 0:
        warn("test_dataset= is used only by the periodic k-NN, which eval.knn_every_epochs=0 turns off; set "
             "eval.knn_every_epochs=N to evaluate every N epochs")


def _data(dataset: Any) -> tuple[Any, list[str]]:
    """(source or None, data overrides) of :func:`pretrain`'s ``dataset``."""
    if dataset is None:
        return None, []
    if isinstance(dataset, (str, os.PathLike)):
        return None, ["data.source=folder", f"data.root={json.dumps(os.fspath(dataset))}"]
    from sove.data.python_source import PythonSource

    source = PythonSource(dataset)
    return source, ["data.source=python", f"data.root={json.dumps(source.description)}"]
