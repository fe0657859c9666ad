"""User-facing errors.

Anything a user can cause (a bad file, a wrong config key, a mismatched checkpoint) raises ``TextokError``
with a one-line message that names the problem and the fix. The CLI prints that line and exits with
status 2 instead of a traceback.
"""

from __future__ import annotations

import signal


class TextokError(Exception):
    """A problem with the user's input, stated in one line with its fix."""


class ConfigError(TextokError, ValueError):
    """A config key or value that does not exist or does not fit."""


class CheckpointMismatchError(TextokError):
    """A checkpoint written by a model of another type or configuration."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or by SIGTERM (``kill``, ``timeout``, SLURM preemption, ``docker stop``).

    It derives from ``KeyboardInterrupt`` so that ``except Exception`` blocks let it through and the clean-up
    written for Ctrl-C (removing temporary files) runs for SIGTERM too. The CLI exits with ``128 + signum``
    (130 for SIGINT, 143 for SIGTERM), so ``train && extract-latents`` stops after an interrupted run.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(message or f"interrupted by {name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
