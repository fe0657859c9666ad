"""A training run's directory (``--out``): textok's own, used by one process at a time, and opened for resuming.

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
from typing import Any, Iterator

from ..errors import TextokError
from ..hub import config_diff, flatten
from ..io import RUN_MARKER, Inputs, atomic_write_text, check_output, read_json, remove_stale
from .checkpoint import CheckpointManager

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


def check_run_directory(out: str | Path, inputs: Inputs = ()) -> None:
    """Refuse ``out`` when it is a file, a non-empty folder that is not a textok run (no train_config.json), or
    one of the run's ``inputs`` (``(name, path)`` pairs) or a place inside one."""
    check_output(out, inputs, kind="run", markers=(RUN_MARKER,), what="textok run", ignore=EARLY_FILES)


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


def check_resume_compatible(latest: Path, model_type: str, model_config: dict[str, Any], kind: str = "model") -> None:
    """Refuse to resume a checkpoint written for another model type or config, naming what differs."""
    meta = read_json(latest / "meta.json", f"checkpoint {latest} (meta.json)")
    if meta.get("model_type") != model_type:
        raise TextokError(f"{latest} is a checkpoint of a {meta.get('model_type')!r} {kind}, not {model_type!r}; "
                          "use another --out or the same model")
    diff = config_diff(meta["model_config"], json.loads(json.dumps(model_config)))  # as saved: tuples are lists
    if diff:
        raise TextokError(f"cannot resume {latest}: the {kind} config differs ({'; '.join(diff)}); "
                          "use another --out or the original config")


# Training settings a resumed run cannot honour: they decide which images (and captions) each step sees, or they
# live in state the checkpoint restores (Adam's betas and weight decay come back with the optimizer, the
# discriminator's shape with its weights). Everything else may change on resume and is reported.
FIXED_ON_RESUME = ("batch_size", "grad_accum", "seed", "data.source", "data.train_size", "data.seed",
                   "data.captions_file", "data.caption_bank", "data.captions_per_image", "optim.betas",
                   "optim.weight_decay", "optim.d_weight_decay", "loss.discriminator")


def resume_changes(saved: dict[str, Any], current: dict[str, Any], step: int) -> tuple[list[str], list[str]]:
    """(changes that are refused, changes that are allowed) between a checkpoint's training settings and this
    run's, each as ``"key: old -> new"``. Keys the checkpoint does not know (added to textok later) are skipped."""
    old, new = flatten(saved), flatten(current)
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (JSON has no tuples)
    changed = {k: (old[k], new.get(k)) for k in old if k in new and as_list(old[k]) != as_list(new[k])}
    refused, allowed = [], []
    for key, (a, b) in sorted(changed.items()):
        line = f"{key}: {a!r} -> {b!r}"
        gan_toggled = key == "loss.adversarial.weight" and (float(a) > 0) != (float(b) > 0)
        (refused if key in FIXED_ON_RESUME or gan_toggled else allowed).append(line)
    if isinstance(new.get("max_steps"), int) and new["max_steps"] < step:
        refused.append(f"max_steps: {new['max_steps']} is below the checkpoint's step {step}")
    return refused, allowed


def open_run(out: Path, train_config: dict[str, Any], model_type: str, model_config: dict[str, Any], kind: str,
             keep_last: int, is_main: bool):
    """A run directory's checkpoint manager and the checkpoint to resume from, with ``train_config.json``
    written by the main process. Call it holding the run's lock (:func:`run_lock`).

    The main process first removes what a killed save left behind (temporary checkpoint directories and
    files). Resuming takes the newest checkpoint that is intact (a damaged one is named and skipped); it is
    refused when the checkpoint was written for another model, or when settings changed that a resumed run
    cannot honour; the settings that did change are printed.
    """
    ckpts = CheckpointManager(out / "checkpoints", keep_last=keep_last)
    if is_main:
        for directory in (out, out / "checkpoints"):
            for path in remove_stale(directory):
                print(f"removed {path}, left by an interrupted save")
    latest, damaged = ckpts.latest_intact()
    if damaged and latest is None:
        raise TextokError(f"no checkpoint in {ckpts.root} can be read ({damaged[0]}); move that folder away to "
                          "start the run again, or use another --out")
    if latest is not None:
        check_resume_compatible(latest, model_type, model_config, kind)
        meta = read_json(latest / "meta.json", f"checkpoint {latest} (meta.json)")  # verified just above
        refused, allowed = resume_changes(meta.get("train_config") or {}, train_config, int(meta["step"]))
        if refused:
            raise TextokError(f"cannot resume {latest} with these settings ({'; '.join(refused)}): a resumed run "
                              "must see the same data in the same order; use the original values, or another --out")
        if is_main:
            for line in damaged:
                print(f"skipping a damaged checkpoint: {line}")
            if allowed:
                print(f"resuming with changed settings: {'; '.join(allowed)}")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(train_config, indent=2))
    return ckpts, latest
