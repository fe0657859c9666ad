"""User-facing errors.

Anything a user can cause (a bad file, a wrong config key, a mismatched checkpoint) raises ``TextokError``
with a one-line message that names the problem and the fix. The CLI prints that line and exits with
status 2 instead of a traceback.
"""

from __future__ import annotations


class TextokError(Exception):
    """A problem with the user's input, stated in one line with its fix."""


class ConfigError(TextokError, ValueError):
    """A config key or value that does not exist or does not fit."""


class CheckpointMismatchError(TextokError):
    """A checkpoint written by a model of another type or configuration."""
