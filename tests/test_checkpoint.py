"""Atomic checkpoints survive SIGKILL mid-write; loading is weights_only, strict, prefix-tolerant."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from sove.errors import DiskFullError, SoveError
from sove.state_keys import BACKBONE_PREFIXES, strip_key_prefixes
from sove.train.checkpoint import (atomic_save, load_checkpoint, load_state_strict, remove_stale_temporaries,
                                   rng_state, set_rng_state, strip_prefixes)

WRITER = textwrap.dedent("""
    import sys, torch
    from sove.train.checkpoint import atomic_save
    path = sys.argv[1]
    version = 1
    while True:  # rewrite a ~40 MB checkpoint forever; each version is filled with its number
        atomic_save({"version": version, "w": torch.full((10_000_000,), float(version))}, path)
        print(version, flush=True)
        version += 1
""")


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.031, 0.057, 0.1, 0.17])
def test_sigkill_during_write_leaves_a_loadable_previous_state(tmp_path, delay):
    path = tmp_path / "last.pt"
    atomic_save({"version": 0, "w": torch.zeros(10_000_000)}, path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # the writer is now in its rewrite loop
    time.sleep(delay)  # different points of the next write (one write takes ~0.1-0.3 s here)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(path)
    v = state["version"]
    assert torch.equal(state["w"], torch.full((10_000_000,), float(v)))  # complete, never mixed
    # A left-over temporary file is never mistaken for the checkpoint.
    assert {p.name for p in tmp_path.iterdir()} - {"last.pt"} <= {n for n in os.listdir(tmp_path) if n.startswith(".")}


def test_load_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(SoveError, match="could not be loaded"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(SoveError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_key_prefixes_stripped_in_any_order_only_at_the_start():
    assert strip_key_prefixes("_forward_module.module._orig_mod.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert strip_key_prefixes("module.backbone.vit.cls_token") == "backbone.vit.cls_token"
    assert strip_key_prefixes("module.backbone.vit.cls_token", BACKBONE_PREFIXES) == "cls_token"
    assert strip_key_prefixes("modules.0.weight") == "modules.0.weight"
    assert strip_key_prefixes("head.module.weight", BACKBONE_PREFIXES) == "head.module.weight"


def test_wrapper_prefixes_are_stripped_and_keys_checked():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {f"module._orig_mod.{k}": v + 1 for k, v in net.state_dict().items()}
    assert set(strip_prefixes(state)) == {"0.weight", "0.bias"}
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3))
    load_state_strict(plain, state, "ddp checkpoint")
    assert torch.equal(plain[0].bias, net[0].bias + 1)
    with pytest.raises(SoveError, match=r"missing keys \['0.bias'\].*unexpected keys \['0.extra'\]"):
        load_state_strict(plain, {"0.weight": net[0].weight, "0.extra": net[0].bias}, "bad checkpoint")


def _previous(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"version": 0, "w": torch.arange(4.0)}, path)
    return path


REAL_SAVE = torch.save


def _enospc_in_write(obj, f):  # torch's C++ writer: the OSError of f.write surfaces as a RuntimeError
    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    REAL_SAVE(obj, Full())


@pytest.mark.parametrize("where", ["torch.save", "torch.save C++", "os.replace"])
def test_disk_full_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    import sove.train.checkpoint as ckpt

    path = _previous(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"torch.save": (ckpt.torch, "save", full), "torch.save C++": (ckpt.torch, "save", _enospc_in_write),
              "os.replace": (ckpt.os, "replace", full)}[where]
    monkeypatch.setattr(*target)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(free=int(1.5 * 2**20)))
    with pytest.raises(DiskFullError) as e:
        atomic_save({"version": 1, "w": torch.zeros(4)}, path)
    assert str(e.value) == (f"no space left on device while saving '{path}' (1.5 MiB free there); the previous "
                            "'last.pt' is intact and nothing was replaced; free some space, then run again (a run "
                            "continues with `sove pretrain --resume RUN_DIR`)")
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 0
    assert os.listdir(tmp_path) == ["last.pt"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import sove.train.checkpoint as ckpt

    path = _previous(tmp_path)

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_save({"version": 1}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 0 and os.listdir(tmp_path) == ["last.pt"]


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp_path / f".last.pt.tmp-{proc.pid}"
    live = tmp_path / f".last.pt.tmp-{os.getpid()}"
    other = tmp_path / ".notes.tmp-abc"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_rng_state_saves_and_restores_cuda_generators(tmp_path, monkeypatch):
    """GPU resume is exact: the per-device CUDA generator states travel in the checkpoint (mocked here)."""
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in saved])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    atomic_save({"rng": rng_state()}, tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")["rng"]  # weights_only round trip
    set_rng_state(state)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], saved))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # fewer GPUs now: the first device's state
    set_rng_state(state)
    assert len(restored[1]) == 1 and torch.equal(restored[1][0], saved[0])
    del state["cuda"]  # a checkpoint written without CUDA still loads, and leaves the CUDA RNG alone
    set_rng_state(state)
    assert len(restored) == 2


def test_rng_state_without_cuda_has_no_cuda_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in rng_state()
