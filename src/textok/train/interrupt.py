"""Ctrl-C and SIGTERM during training: save, then stop."""

from __future__ import annotations

import signal
from typing import Any

from ..errors import Interrupted


class GracefulInterrupt:
    """The first Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second one aborts.

    Schedulers stop jobs with SIGTERM (``kill``, ``timeout``, SLURM preemption, ``docker stop``), so it is
    treated like Ctrl-C. Leaving the block after such a request raises :class:`Interrupted`: the CLI exits with
    130 / 143 instead of 0, so a chained ``train && extract-latents`` does not go on with an unfinished model.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulInterrupt":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them there
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.requested:
            raise Interrupted(signum, f"interrupted again by {signal.Signals(signum).name}: stopped without saving")
        self.requested = True
        self.signum = signum

    def join(self) -> None:
        """Stop with the other processes of a multi-process run, one of which was asked to (as by SIGTERM)."""
        if not self.requested:
            self.requested, self.signum = True, signal.SIGTERM

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        if self.requested and exc_type is None:
            raise Interrupted(self.signum, f"interrupted by {signal.Signals(self.signum).name} after saving a "
                                           "checkpoint")
        return False
