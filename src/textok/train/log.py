"""What a training run shows: the JSONL metrics log (and TensorBoard, when installed) and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from ..io import atomic_write_text
from ..progress import progress_bar as terminal_bar


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> tqdm | None:
    """A bar over training steps (``None`` when disabled, e.g. on non-main ranks; drawn only on a terminal)."""
    if not enabled:
        return None
    return terminal_bar(total=total, initial=initial, desc=desc, unit="step")


def _logged_step(line: str) -> float:
    """The step of a log line; a blank or torn line (a kill mid-write) sorts after every step and is dropped."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf


class JsonlLog:
    """Append-only JSONL metrics log; on resume, entries past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [l for l in path.read_text().splitlines() if _logged_step(l) <= resume_step]
            atomic_write_text(path, "".join(l + "\n" for l in kept))
        self._tb = None
        try:  # lazily: tensorboard is optional, not a dependency of textok
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tb"))
        except Exception:
            self._tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(f"{v:.6g}") for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
