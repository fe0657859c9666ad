"""Training checkpoints: atomic, pickle-free, the last K kept, resumable exactly.

Layout: ``OUT/checkpoints/step-0000100/`` with one ``<name>.json`` + ``<name>.safetensors`` pair per
component (model, EMA, optimizers, discriminator, RNG states, ...) and ``meta.json`` (step, configs). A
directory is written under a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ..io import atomic_directory
from .state import load_state, save_state

STEP_DIR = re.compile(r"^step-(\d+)$")


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

    def save(self, step: int, components: dict[str, Any], meta: dict[str, Any]) -> Path:
        target = self.root / f"step-{step:07d}"
        with atomic_directory(target) as tmp:
            for name, obj in components.items():
                save_state(obj, tmp / name)
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "components": sorted(components)}, indent=2))
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    @staticmethod
    def load(path: Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        meta = json.loads((path / "meta.json").read_text())
        return {name: load_state(path / name, device) for name in meta["components"]}, meta
