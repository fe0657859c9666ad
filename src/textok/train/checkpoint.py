"""Training checkpoints: atomic, pickle-free, the last K kept, resumable exactly.

Layout: ``OUT/checkpoints/step-0000100/`` with one ``<name>.json`` + ``<name>.safetensors`` pair per
component (model, EMA, optimizers, discriminator, RNG states, ...) and ``meta.json`` (step, configs). A
directory is written under a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest complete one. ``meta.json`` records every file's sha256, so a checkpoint damaged
afterwards (a truncated copy, a flipped bit on a bad disk) is skipped on resume in favour of the newest one that
is intact (:meth:`CheckpointManager.latest_intact`).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import TextokError
from ..io import atomic_directory, check_safetensors, check_sha256, read_json, sha256_files
from .state import load_state, save_state

STEP_DIR = re.compile(r"^step-(\d+)$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write fails with when the disk (or the user's quota) is full


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def latest_intact(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint whose files are intact, and a line per newer one that is not (and why)."""
        skipped = []
        for path in reversed(self.all()):
            try:
                self.verify(path)
            except TextokError as err:
                skipped.append(str(err))
                continue
            return path, skipped
        return None, skipped

    @staticmethod
    def verify(path: Path) -> dict[str, Any]:
        """``meta.json`` of checkpoint ``path`` after checking that every component's files parse (headers
        only, no tensor is read); raises :class:`TextokError` "... is corrupt (...)" otherwise."""
        meta = read_json(path / "meta.json", f"checkpoint {path} (meta.json)")
        if not isinstance(meta, dict) or not isinstance(meta.get("components"), list) or "step" not in meta:
            raise TextokError(f"checkpoint {path} (meta.json) is corrupt (not a checkpoint record)")
        for name in meta["components"]:
            stem = path / str(name)
            for suffix in (".json", ".safetensors"):
                if not stem.with_suffix(suffix).is_file():
                    raise TextokError(f"checkpoint {path} is corrupt ({stem.name}{suffix} is missing)")
            read_json(stem.with_suffix(".json"), f"checkpoint {path} ({stem.name}.json)")
            check_safetensors(stem.with_suffix(".safetensors"), f"checkpoint {path} ({stem.name}.safetensors)")
        sums = meta.get("sha256", {})  # absent in checkpoints written before checksums: headers only
        check_sha256(path, sums if isinstance(sums, dict) else {}, what=f"checkpoint {path}", fix="")
        return meta

    def save(self, step: int, components: dict[str, Any], meta: dict[str, Any]) -> Path:
        target = self.root / f"step-{step:07d}"
        try:
            with atomic_directory(target, markers=("meta.json",)) as tmp:
                for name, obj in components.items():
                    save_state(obj, tmp / name)
                sums = sha256_files(tmp)
                (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "components": sorted(components),
                                                           "sha256": sums}, indent=2))
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise self.disk_full(target, err) from None
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def disk_full(self, target: Path, err: OSError) -> TextokError:
        """The one line for a full disk (or quota) while writing ``target``: where, and what is still intact."""
        last = self.latest()
        kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint had been saved yet"
        return TextokError(f"no space left on the disk of {target.parent} while writing {target.name} "
                           f"({err.strerror}); {kept} and the partial write was removed: free space there and run the "
                           "same command again to resume")

    @staticmethod
    def load(path: Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        meta = json.loads((path / "meta.json").read_text())
        return {name: load_state(path / name, device) for name in meta["components"]}, meta


def rng_state() -> dict[str, Any]:
    """The global RNG states (CPU, and every GPU's), for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the global RNG states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])
