"""Errors a user can fix, kept apart from bugs.

``MoekitError`` and its subclasses carry a message that names the argument, field or file and what was
expected; the CLI prints them in one line. Anything else that escapes a command is a bug in moekit
and is shown with its full traceback.
"""

from __future__ import annotations


class MoekitError(Exception):
    """Bad user input or a damaged file: the message says what is wrong and what to do."""


class ConfigError(MoekitError, ValueError):
    """A configuration field holds a value that is not allowed (names field, value, what is allowed)."""


class CheckpointError(MoekitError):
    """A checkpoint or model folder is missing, damaged or of the wrong kind (names the file)."""


class UsageError(MoekitError, ValueError):
    """A command-line argument or input file is not usable (names the argument)."""
