"""User-facing exceptions. The CLI prints their message on one line and exits with status 2."""


class SoveError(Exception):
    """Base class for errors caused by user input (config, files, data)."""


class ConfigError(SoveError):
    """An invalid configuration value or key; the message names the key."""


class DataError(SoveError):
    """Missing, empty or unreadable data; the message names the path."""
