"""One writer per run directory, and which folders are sove runs at all.

``sove pretrain`` (new, ``--overwrite`` or ``--resume``) holds :class:`RunLock` on ``RUN/.sove.lock``
while it trains: one training process per run. The commands that write their outputs into a run
(``eval`` into ``RUN/eval``, ``export``, ``plot``, ``concepts``, ``embed`` with its output inside the
run) hold a second lock, ``RUN/.sove-outputs.lock``: one of them at a time, while training may go on
(they read the atomically replaced ``last.pt`` and write files the trainer does not). The lock is an advisory
``flock`` on that file: the kernel drops it when its owner exits, however it exits, so the lock of
a killed process is recovered by the next command (its file, left behind, only says who held it).
The file records the owner's PID, host and start time for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, ContextManager

from sove.errors import SoveError

#: The training lock file inside a run directory (``sove pretrain``).
LOCK_NAME = ".sove.lock"
#: The lock file of the commands that write evaluation results, exports and plots into a run.
OUTPUTS_LOCK_NAME = ".sove-outputs.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (signal 0 probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_sove_run(folder: str | Path) -> bool:
    """Whether ``folder`` is a run directory made by ``sove pretrain``: a ``checkpoints/`` folder
    and a ``config.yaml`` holding a sove config (top-level ``trainer``, ``model`` and ``data``)."""
    import yaml

    folder = Path(folder)
    config = folder / "config.yaml"
    if not (folder / "checkpoints").is_dir() or not config.is_file():
        return False
    try:
        content = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and {"trainer", "model", "data"} <= set(content)


def run_containing(path: str | Path) -> Path | None:
    """The sove run directory that is ``path`` or one of its parents (None if there is none)."""
    path = Path(path).resolve()
    return next((folder for folder in (path, *path.parents) if is_sove_run(folder)), None)


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    host = owner.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"process {owner.get('pid', '?')}{where} (started {when})"


class RunLock:
    """Exclusive lock of one run directory (``RUN/<name>``: :data:`LOCK_NAME` for training,
    :data:`OUTPUTS_LOCK_NAME` for the output commands); a context manager.

    Raises (on :meth:`acquire`):
        SoveError: another live process holds the run ("run RUN is in use by process PID (started
            ...)"), or the run directory cannot be written.

    Why ours and not ``filelock`` (the same ``flock``): its flock lock records no holder, and the error
    message names the owner from the record (PID, host, start, command) written into the locked file.
    """

    def __init__(self, run_dir: str | Path, name: str = LOCK_NAME) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory if needed); returns self."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = self._read(fd)
                    os.close(fd)
                    pid = owner.get("pid", "PID")
                    raise SoveError(f"run {self.run_dir} is in use by {_describe(owner)}; wait for it to "
                                    f"finish or stop it (kill {pid}), then run this again") from None
                if self._same_file(fd):  # not a file its previous owner removed meanwhile
                    self._fd = fd
                else:
                    os.close(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "command": " ".join(["sove"] + sys.argv[1:])}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, json.dumps(record).encode())
        except OSError as e:
            self.release()
            raise SoveError(f"cannot write into run {self.run_dir} ({e.strerror}); "
                            "make it writable or copy the run to a writable place") from None
        return self

    def release(self) -> None:
        """Drop the lock and remove the lock file (no-op when not held)."""
        if self._fd is None:
            return
        if self._same_file(self._fd):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def rank_zero_lock(run_dir: str | Path) -> ContextManager:
    """:class:`RunLock` on global rank 0, nothing elsewhere (the processes Fabric launches work under it)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return RunLock(run_dir) if rank_zero_only.rank == 0 else contextlib.nullcontext()
