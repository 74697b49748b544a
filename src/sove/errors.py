"""User-facing exceptions and warnings. The CLI prints an error's message on one line and exits with status 2."""

import sys


class SoveError(Exception):
    """Base class for errors caused by user input (config, files, data)."""


class ConfigError(SoveError):
    """An invalid configuration value or key; the message names the key."""


class DataError(SoveError):
    """Missing, empty or unreadable data; the message names the path."""


def warn(message: str) -> None:
    """Print a one-line ``warning: <message>`` to stderr (something was left out or replaced)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
