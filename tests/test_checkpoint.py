"""Atomic checkpoints survive SIGKILL mid-write; loading is weights_only, strict, prefix-tolerant."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sove.errors import SoveError
from sove.train.checkpoint import atomic_save, load_checkpoint, load_state_strict, strip_prefixes

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


def test_wrapper_prefixes_are_stripped_and_keys_checked():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {f"module._orig_mod.{k}": v + 1 for k, v in net.state_dict().items()}
    assert set(strip_prefixes(state)) == {"0.weight", "0.bias"}
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3))
    load_state_strict(plain, state, "ddp checkpoint")
    assert torch.equal(plain[0].bias, net[0].bias + 1)
    with pytest.raises(SoveError, match=r"missing keys \['0.bias'\].*unexpected keys \['0.extra'\]"):
        load_state_strict(plain, {"0.weight": net[0].weight, "0.extra": net[0].bias}, "bad checkpoint")
