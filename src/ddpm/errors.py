"""Errors that are the user's to fix. The CLI prints them as one line and exits non-zero."""


class DDPMError(Exception):
    """Base class: a problem with the user's input, not a bug.

    ``field`` names the value at fault as the Python API calls it (a keyword such as ``guidance_rescale``,
    or a config key such as ``train.lr``; a tuple where the message names several), written in the
    message as it is: the CLI puts the flag that sets it in its place (``ddpm.cli.parser.in_flags``), so
    the library never speaks in flags."""

    def __init__(self, message: str = "", *, field: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.field = field


class ConfigError(DDPMError):
    """An invalid configuration value or an unknown name."""


class DataError(DDPMError):
    """Missing, empty or unreadable data."""


class CheckpointError(DDPMError):
    """A missing, damaged or incompatible checkpoint."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message without terminal colour codes (torch colours parts of
    its messages), or its type's name when it has none: what a one-line error may quote of it."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__
