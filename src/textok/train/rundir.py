"""A training run's directory (``--out``): textok's own, and used by one process at a time.

* A path that is a file, or a folder holding files that are not a textok run, is refused before anything
  is written there (a run writes checkpoints and cleans up its own temporary files in that folder).
* A second ``train-*`` on the same ``--out`` is refused while the first is alive: two processes writing the
  same checkpoints would corrupt each other's resume. The lock is an advisory ``flock`` on
  ``OUT/.textok.lock``, which the kernel releases when its holder exits however it exits, so the lock of a
  killed or crashed run is simply taken over. The file records who holds it, for the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import TextokError
from ..io import RUN_MARKER, STALE

LOCK_NAME = ".textok.lock"
# What a run writes before train_config.json (a run killed that early still owns its directory).
EARLY_FILES = (LOCK_NAME, "text_cache.safetensors")

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def check_run_directory(out: str | Path) -> None:
    """Refuse ``out`` when it is a file or a non-empty folder that is not a textok run (no train_config.json)."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise TextokError(f"--out {out} is a file; a training run needs a directory: choose another --out")
    foreign = [p.name for p in out.iterdir() if p.name not in EARLY_FILES and not STALE.match(p.name)]
    if foreign and not (out / RUN_MARKER).is_file():
        raise TextokError(f"--out {out} already holds files that are not a textok run (e.g. {sorted(foreign)[0]}; "
                          f"no {RUN_MARKER}): choose another --out (an empty or new directory)")


@contextlib.contextmanager
def run_lock(out: str | Path, enabled: bool = True) -> Iterator[None]:
    """Check ``out`` (:func:`check_run_directory`), create it, and hold its lock for the duration of the block.

    Raises :class:`TextokError` naming the holder when another live process has it. ``enabled=False`` (the
    non-main ranks of a distributed run) only checks: the main rank holds the lock for the whole job.
    """
    out = Path(out)
    check_run_directory(out)
    if not enabled or fcntl is None:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(path)
            pid, host = who.get("pid", "?"), who.get("host", "?")
            raise TextokError(f"{out} is in use by another textok run (process {pid} on {host}, started "
                              f"{who.get('started', '?')}); wait for it to finish, stop it, or use another --out"
                              ) from None
        previous = _holder(path)
        if previous.get("pid") not in (None, os.getpid()):
            print(f"{out}: taking over the lock of process {previous['pid']} on {previous.get('host', '?')}, "
                  "which is no longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: nobody holds it
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:  # a run refused before writing anything
                path.unlink()
                out.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the flock
