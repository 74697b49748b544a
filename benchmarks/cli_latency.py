"""How long the command line takes to answer: a config error, ``--help``, ``sove presets``.

    python benchmarks/cli_latency.py            # median of 5 fresh processes per command
    python benchmarks/cli_latency.py --repeats 3

Each command runs in a new ``python -m sove`` process (imports included, as a user sees it) and
is timed from start to exit; the table gives the median and the minimum wall time and the exit
status. Nothing is trained: every command stops at argument or config checking.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

#: (what, arguments of ``sove``).
COMMANDS = (
    ("invalid choice value", ["pretrain", "trainer.precision=bf16"]),
    ("unknown config key", ["pretrain", "loss.cls.num_judgez=3"]),
    ("unknown preset", ["pretrain", "--config", "no_such_preset"]),
    ("pretrain --help", ["pretrain", "--help"]),
    ("presets", ["presets"]),
)


def time_command(args: list[str], repeats: int) -> tuple[float, float, int]:
    """(median s, min s, exit status) of ``python -m sove ARGS`` over ``repeats`` fresh processes."""
    times, status = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sove", *args], capture_output=True)
        times.append(time.perf_counter() - start)
        status = done.returncode
    return statistics.median(times), min(times), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| command | median s | min s | exit status |\n|---|---|---|---|")
    for what, argv in COMMANDS:
        median, fastest, status = time_command(argv, args.repeats)
        print(f"| {what}: `sove {' '.join(argv)}` | {median:.2f} | {fastest:.2f} | {status} |")


if __name__ == "__main__":
    main()
