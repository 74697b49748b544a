"""Stop a pretraining run on SIGINT / SIGTERM with a checkpoint of the last finished step.

Ctrl-C (SIGINT) and a scheduler's SIGTERM (SLURM sends it before a job's time limit or on
preemption, ``scancel`` sends it; torchrun forwards it to its workers) no longer lose the steps
since the last periodic checkpoint (docs/distributed.md, "Stopping and preemption"):

1. the first signal only sets a flag (:class:`StopRequest`); the step in progress finishes, so the
   networks, the optimizer and the feature sets are never saved half-updated;
2. after that step every process agrees on stopping (one all-reduce of the flag per step when there
   are several processes, so all ranks stop after the same step), ``checkpoints/last.pt`` is written
   and :class:`TrainingInterrupted` is raised; ``sove pretrain --resume RUN`` continues exactly;
3. a second SIGINT (Ctrl-C pressed again) stops at once (``KeyboardInterrupt``), losing the steps since the
   last checkpoint. A repeated SIGTERM is ignored: under ``srun torchrun`` a worker receives SIGTERM twice,
   from SLURM and from torchrun forwarding it, and must still save.

DataLoader workers ignore both signals (:func:`ignore_stop_signals`): a terminal's Ctrl-C reaches the
whole process group, and a worker that died of it would make the next batch fail before the checkpoint
is written; the workers are shut down by the training process as usual. Because they ignore SIGTERM,
multiprocessing's exit handler (which terminates daemonic children with SIGTERM, then joins them)
would wait forever for persistent workers still alive when the interpreter exits, e.g. in a script
that keeps a :class:`~sove.train.trainer.Trainer`; :func:`shut_down_workers_at_exit` stops them
cleanly first.
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
import weakref
from pathlib import Path
from types import FrameType
from typing import Any, Callable

#: The signals that request a stop with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Pretraining stopped by a signal after a finished step, with a checkpoint of that step.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        step: the last finished optimizer step, the checkpoint's step.
        checkpoint: the checkpoint written (``RUN/checkpoints/last.pt``).
        run_dir: the run directory, for ``sove pretrain --resume``.
        exit_code: 128 + signum, the shell's convention (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, Path(checkpoint), Path(run_dir)
        self.exit_code = 128 + int(signum)
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} with a checkpoint "
                         f"({self.checkpoint}); continue with: sove pretrain --resume {self.run_dir}")


class StopRequest:
    """A context manager that turns the first SIGINT / SIGTERM into a request read at step boundaries.

    Outside the main thread (where Python cannot install signal handlers) it does nothing and
    :attr:`signum` stays None; a signal the process ignores (SIGINT of a job started with ``&`` from a
    script) stays ignored. The previous handlers are restored on exit.

    Args:
        announce: print one line to stderr on the first signal (rank 0 only, so a node of 8 processes
            prints it once).
    """

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:  # `cmd &` in a script: SIGINT stays ignored
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set from C
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum != signal.SIGINT:  # a repeated SIGTERM (SLURM and torchrun both send one): keep saving
                return
            self._restore()  # Ctrl-C again: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGINT"
            try:  # the terminal may be gone (SIGHUP passed on as SIGTERM): the checkpoint still comes first
                print(f"\nsove: {signal.Signals(signum).name} received: stopping after the step in progress with a "
                      f"checkpoint ({again} to stop at once, losing the steps since the last checkpoint)",
                      file=sys.stderr, flush=True)
            except OSError:
                pass


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM (see the module docstring)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def shut_down_workers(loader: Any) -> None:
    """Stop the persistent workers of a torch ``DataLoader`` now (no-op without live workers); the next
    ``iter(loader)`` starts new ones."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if iterator is not None:
        loader._iterator = None


def shut_down_workers_at_exit(loader: Any) -> Callable[[], None]:
    """At interpreter exit, before multiprocessing's exit handler (``atexit`` runs last-registered
    first), stop ``loader``'s workers if it is still alive: the workers ignore SIGTERM, so that handler
    could not terminate them (module docstring). Holds only a weak reference to ``loader``; returns the
    registered function (for ``atexit.unregister``)."""
    ref = weakref.ref(loader)

    def stop() -> None:
        alive = ref()
        if alive is not None:
            shut_down_workers(alive)

    atexit.register(stop)
    return stop
