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


class DiskFullError(SoveError):
    """A file could not be written for lack of space (ENOSPC / EDQUOT); names the file and the free space."""


def disk_full(exc: BaseException | None) -> OSError | None:
    """The "no space left on device" / "disk quota exceeded" OSError that is ``exc`` or that ``exc``
    was raised from or while handling (torch's C++ writer reports one as a RuntimeError); else None."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
