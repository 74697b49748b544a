"""Run-directory safety: --overwrite deletes only sove runs, one writer per run, no debris of killed
saves, pre-flight checks before any work or file, a full disk reported in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_image_folder
from sove.cli import main
from sove.config import load_config
from sove.run_lock import LOCK_NAME, OUTPUTS_LOCK_NAME, RunLock
from sove.run import prepare_run_dir
from sove.train.builders import preflight
from sove.train.checkpoint import load_checkpoint

HOLDER = ("import sys, time; from sove.run_lock import RunLock; RunLock(*sys.argv[1:]).acquire(); "
          "print('held', flush=True); time.sleep(120)")


def cli(capsys, args):
    """(exit status, stderr without the run-plan's `sove: warning:` lines)."""
    status = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return status, "\n".join(line for line in err if not line.startswith("sove: warning:"))


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
    """The run directory of a 1-step TINY run (`sove pretrain`), shared by the module."""
    root = tmp_path_factory.mktemp("trained")
    images = make_image_folder(root / "images")
    args = ["pretrain", *tiny_overrides, f"data.root={images}", f"data.test_root={images}",
            f"trainer.out_dir={root / 'runs'}",
            "trainer.name=run", "trainer.max_steps=1"]
    assert main(args) == 0
    return root / "runs" / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run (tests that change it)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def fake_run(out_dir: Path, name: str) -> Path:
    """A sove run directory as `sove pretrain` makes it before training (config.yaml, checkpoints/)."""
    return prepare_run_dir(load_config(None, [f"trainer.out_dir={out_dir}", f"trainer.name={name}"]), False)


# ------------------------------------------------------------------ item 6: --overwrite deletes only sove runs
@pytest.mark.parametrize("content", [{"notes.txt": "mine"}, {"config.yaml": "lr: 1\n", "checkpoints/a.txt": "x"}])
def test_overwrite_never_deletes_a_folder_that_is_not_a_sove_run(tmp_path, capsys, content, tiny_overrides):
    folder = tmp_path / "runs" / "mine"
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = listing(folder)
    status, err = cli(capsys, ["pretrain", "--overwrite", *tiny_overrides, "data.root=/nonexistent",
                               f"trainer.out_dir={tmp_path / 'runs'}", "trainer.name=mine"])
    assert status == 2
    assert err == (f"sove: error: '{folder}' exists and is not a sove run directory (no config.yaml and checkpoints/ "
                   "written by `sove pretrain`); sove never deletes it: choose another trainer.name or trainer.out_dir")
    assert listing(folder) == before


@pytest.mark.parametrize("name", ["''", ".", "..", "a/b", "../x", "a\\b"])
def test_run_names_that_are_not_one_folder_are_refused(tmp_path, capsys, name, tiny_overrides):
    """Regression: trainer.name='' made the run directory out_dir itself, and --overwrite deleted it
    with every other run in it."""
    out = tmp_path / "runs"
    other = fake_run(out, "other")
    (other / "checkpoints" / "last.pt").write_bytes(b"work")
    before = listing(tmp_path)
    status, err = cli(capsys, ["pretrain", "--overwrite", *tiny_overrides, "data.root=/nonexistent",
                               f"trainer.out_dir={out}",
                               f"trainer.name={name}"])
    value = name.strip("'")
    assert status == 2
    assert err == (f"sove: error: trainer.name={value!r} is not a plain folder name (it must be non-empty, not '.' "
                   "or '..', without '/' or '\\'); the run directory is trainer.out_dir/trainer.name")
    assert listing(tmp_path) == before


def test_overwrite_replaces_a_sove_run_and_refuses_without_it(tmp_path):
    run = fake_run(tmp_path, "r")
    (run / "checkpoints" / "last.pt").write_bytes(b"old")
    (run / "eval").mkdir()
    (run / "eval" / "knn.json").write_text("{}")
    cfg = load_config(None, [f"trainer.out_dir={tmp_path}", "trainer.name=r"])
    with pytest.raises(Exception, match="exists; pass --resume"):
        prepare_run_dir(cfg, overwrite=False)
    assert (run / "eval" / "knn.json").is_file()
    assert prepare_run_dir(cfg, overwrite=True) == run
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    assert not any((run / "checkpoints").iterdir())


# ------------------------------------------------------------------ items 8, 9: one writer, no debris
def started(run: Path, name: str = LOCK_NAME) -> str:
    owner = json.loads((run / name).read_text())
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"]))


def test_a_run_in_use_is_refused_to_every_writer_and_a_dead_writers_lock_and_debris_recovered(run_copy, capsys):
    """Regression: a second `sove pretrain --resume` on a run still training was accepted, and both
    processes wrote the same checkpoint and metrics files; a kill during a checkpoint save left
    `.last.pt.tmp-PID` files (up to a checkpoint's size) that nothing ever removed."""
    # Training holds RUN/.sove.lock (a second training is refused); the commands that write outputs
    # into the run hold RUN/.sove-outputs.lock (one at a time; they may run while training goes on).
    writers = {OUTPUTS_LOCK_NAME: [["export", run_copy], ["eval", "knn", "--run", run_copy],
                                   ["eval", "linear", "--run", run_copy], ["plot", run_copy], ["concepts", run_copy],
                                   ["embed", "--run", run_copy, "--split", "test", "--out", run_copy / "e"]],
               LOCK_NAME: [["pretrain", "--resume", run_copy, "trainer.max_steps=2"]]}  # the last holder: training
    for name, commands in writers.items():
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy), name], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            before = listing(run_copy)
            line = (f"sove: error: run {run_copy} is in use by process {holder.pid} (started "
                    f"{started(run_copy, name)}); wait for it to finish or stop it (kill {holder.pid}), then run "
                    "this again")
            for args in commands:
                assert cli(capsys, args) == (2, line), args
            assert listing(run_copy) == before
            with pytest.raises(Exception, match=f"in use by process {holder.pid}"):
                RunLock(run_copy, name).acquire()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    (run_copy / OUTPUTS_LOCK_NAME).unlink()
    # The killed holder's lock file stays behind, naming a dead process, and so do the temporary
    # files of saves killed mid-write: the next writer takes the lock over and removes those
    # temporaries (only a dead process's: a live writer's are kept).
    assert json.loads((run_copy / LOCK_NAME).read_text())["pid"] == holder.pid
    folder = run_copy / "checkpoints"
    dead, live = folder / f".last.pt.tmp-{holder.pid}", folder / f".step_0000001.pt.tmp-{os.getppid()}"
    dead.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 10)
    assert main(["pretrain", "--resume", str(run_copy), "trainer.max_steps=2"]) == 0
    assert load_checkpoint(folder / "last.pt")["step"] == 2
    assert not dead.exists() and live.exists()
    assert not (run_copy / LOCK_NAME).exists()


# ------------------------------------------------------------------ item 10: pre-flight checks
@pytest.mark.parametrize("override, line", [
    ("trainer.accelerator=gpu", "trainer.accelerator=gpu: this machine has no CUDA GPU (torch.cuda.is_available() "
                                "is False); use trainer.accelerator=cpu or auto"),
    ("trainer.precision=16-mixed", "trainer.precision=16-mixed: float16 needs a CUDA GPU; use bf16-mixed or "
                                   "32-true here"),
    ("trainer.devices=0", "trainer.accelerator=cpu devices=0 strategy=auto precision=32-true: "
                          "`Fabric(devices=0)` value is not a valid input using cpu accelerator."),
])
def test_absent_device_fails_before_the_run_directory_exists(tmp_path, capsys, monkeypatch, image_folder,
                                                            override, line, tiny_overrides):
    """Regression: trainer.accelerator=gpu without a GPU was a Fabric traceback that left a half-made
    run directory; the retry then said it exists, and the advised --resume failed too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["pretrain", *tiny_overrides, f"data.root={image_folder}", f"trainer.out_dir={tmp_path / 'runs'}",
            "trainer.accelerator=cpu", override]
    for _ in range(2):
        assert cli(capsys, args) == (2, f"sove: error: {line}")
    assert not (tmp_path / "runs").exists()


def test_unwritable_out_dir_fails_before_any_work(tmp_path, capsys, monkeypatch, tiny_overrides):
    import sove.preflight as preflight

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight, "_probe", read_only)
    status, err = cli(capsys, ["pretrain", *tiny_overrides, "data.root=/nonexistent",
                               f"trainer.out_dir={tmp_path / 'runs'}",
                               "trainer.name=r"])
    assert (status, err) == (2, f"sove: error: cannot write the run directory to '{tmp_path / 'runs' / 'r'}': "
                                f"'{tmp_path}' is not writable (Read-only file system); make it writable or "
                                "choose another trainer.out_dir")
    assert not (tmp_path / "runs").exists()


def test_resume_with_an_absent_device_leaves_the_run_as_it_was(run_copy, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = listing(run_copy)
    status, err = cli(capsys, ["pretrain", "--resume", run_copy, "trainer.accelerator=cuda"])
    assert (status, err) == (2, "sove: error: trainer.accelerator=cuda: this machine has no CUDA GPU "
                                "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto")
    assert listing(run_copy) == before


def test_a_failed_start_is_not_resumable_and_is_started_again(tmp_path, capsys):
    run = fake_run(tmp_path, "run")  # what a start that failed before its first checkpoint leaves
    (run / "metrics.csv").write_text("step\n")
    (run / "tensorboard").mkdir()
    status, err = cli(capsys, ["pretrain", "--resume", run])
    assert (status, err) == (2, f"sove: error: --resume: '{run}' holds no checkpoint yet (its start failed or "
                                "stopped before the first save); start it again with the same `sove pretrain` "
                                "command (no --overwrite needed)")
    cfg = load_config(None, [f"trainer.out_dir={tmp_path}", "trainer.name=run", "optim.epochs=30"])
    assert preflight(cfg, overwrite=False) == run
    assert prepare_run_dir(cfg, overwrite=False) == run
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    assert load_config(str(run / "config.yaml")).optim.epochs == 30
    (run / "eval").mkdir()  # anything a start does not write: a run that needs --overwrite
    with pytest.raises(Exception, match="exists; pass --resume"):
        preflight(cfg, overwrite=False)


@pytest.mark.parametrize("args, what, folder", [
    (["eval", "knn", "--run", "{run}"], "k-NN results", "eval"),
    (["eval", "linear", "--run", "{run}"], "results and feature caches", "eval"),
    (["eval", "lowshot", "--run", "{run}"], "results and feature caches", "eval"),
    (["export", "{run}"], "the exported backbone", ""),
    (["embed", "--run", "{run}", "--split", "test", "--out", "{run}/emb/x"], "embeddings", "emb"),
    (["concepts", "{run}"], "the concept grid", "plots"),
    (["plot", "{run}"], "plots", "plots"),
])
def test_unwritable_output_fails_before_any_feature_extraction(trained, capsys, monkeypatch, args, what, folder):
    """Regression: a read-only run directory failed only after minutes of feature extraction, with
    OSError / SafetensorError tracebacks (eval knn, eval linear, export)."""
    import sove.eval.features as features
    import sove.preflight as preflight

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*a, **k):
        raise AssertionError("features extracted before the output folder was checked")

    run = trained
    monkeypatch.setattr(preflight, "_probe", read_only)
    monkeypatch.setattr(features, "extract_features", never)
    before = listing(run)
    status, err = cli(capsys, [a.format(run=run) for a in args])
    target = run / folder if folder else run
    probed = target if target.exists() else run  # the folder, or where it would be made
    assert (status, err) == (2, f"sove: error: cannot write {what} to '{target}': '{probed}' is not writable "
                                "(Read-only file system); make it writable or write elsewhere (copy the run, "
                                "or --out where offered)")
    assert listing(run) == before


def test_output_folder_that_is_a_file_fails_before_extraction(run_copy, capsys):
    (run_copy / "eval").write_text("not a folder")
    status, err = cli(capsys, ["eval", "knn", "--run", run_copy])
    assert (status, err) == (2, f"sove: error: cannot write k-NN results to '{run_copy / 'eval'}': "
                                f"'{run_copy / 'eval'}' is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_directory_is_reported_in_one_line(run_copy, capsys):
    run_copy.chmod(0o555)
    try:
        status, err = cli(capsys, ["eval", "knn", "--run", run_copy])
    finally:
        run_copy.chmod(0o755)
    assert (status, err) == (2, f"sove: error: cannot write into run {run_copy} (Permission denied); make it "
                                "writable or copy the run to a writable place")


def test_dense_protocols_check_their_result_folder(tmp_path, monkeypatch):
    import sove.preflight as preflight
    from sove.eval.encoder import result_path
    from sove.errors import SoveError

    def read_only(path):
        raise OSError(errno.EACCES, "Permission denied")

    assert result_path("video", tmp_path / "run", None, None) == tmp_path / "run" / "eval" / "video.json"
    monkeypatch.setattr(preflight, "_probe", read_only)
    with pytest.raises(SoveError) as e:
        result_path("video", None, None, tmp_path / "out" / "v.json")
    assert str(e.value) == (f"cannot write the video result to '{tmp_path / 'out'}': '{tmp_path}' is not writable "
                            "(Permission denied); make it writable or write elsewhere (copy the run, or --out "
                            "where offered)")


def test_eval_device_that_is_absent_is_one_line(trained, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = cli(capsys, ["eval", "knn", "--run", trained, "--device", "cuda"])
    assert (status, err) == (2, "sove: error: --device cuda: this machine has 0 CUDA GPU(s); use --device cpu")


# ------------------------------------------------------------------ item 11: a full disk while saving
def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(run_copy, capsys, monkeypatch):
    """Regression: ENOSPC during a save ended in a 30-line traceback with a C++ message."""
    import sove.train.checkpoint as ckpt

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=3 * 2**20))
    last = run_copy / "checkpoints" / "last.pt"
    status, err = cli(capsys, ["pretrain", "--resume", run_copy, "trainer.max_steps=2"])
    assert (status, err) == (2, f"sove: error: no space left on device while saving '{last}' (3.0 MiB free there); "
                                "the previous 'last.pt' is intact and nothing was replaced; free some space, then "
                                "run again (a run continues with `sove pretrain --resume RUN_DIR`)")
    assert load_checkpoint(last)["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    assert not (run_copy / LOCK_NAME).exists()


def test_disk_full_in_export_and_embed_is_one_line_and_keeps_earlier_outputs(run_copy, capsys, monkeypatch):
    """Regression: ENOSPC in `sove export` was a SafetensorError traceback leaving a partial file, and
    `sove embed` left a partial .npy and an empty .csv; `--out emb/x.v2` wrote emb/x.npy."""
    import sove.train.checkpoint as ckpt

    assert cli(capsys, ["export", run_copy])[0] == 0
    assert cli(capsys, ["embed", "--run", run_copy, "--split", "test", "--out", run_copy / "emb" / "x.v2"])[0] == 0
    assert sorted(p.name for p in (run_copy / "emb").iterdir()) == ["x.v2.csv", "x.v2.npy"]
    before = listing(run_copy)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    for args, path in ((["export", run_copy], run_copy / "export" / "model.safetensors"),
                       (["embed", "--run", run_copy, "--split", "test", "--out", run_copy / "emb" / "x.v2"],
                        run_copy / "emb" / "x.v2.npy")):
        status, err = cli(capsys, args)  # embed's progress bar precedes the line
        assert (status, err.splitlines()[-1]) == (
            2, f"sove: error: no space left on device while saving '{path}' (0.0 MiB free there); the previous "
               f"'{path.name}' is intact and nothing was replaced; free some space, then run again")
        assert "Traceback" not in err
    assert listing(run_copy) == before
