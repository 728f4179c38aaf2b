"""Errors that are the user's to fix. The CLI prints them as one line and exits non-zero."""


class DDPMError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(DDPMError):
    """An invalid configuration value or an unknown name."""


class DataError(DDPMError):
    """Missing, empty or unreadable data."""


class CheckpointError(DDPMError):
    """A missing, damaged or incompatible checkpoint."""
