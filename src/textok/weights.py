"""The one reader of weight files textok did not write (published checkpoints, torchvision and pytorch-fid files).

The format is told from the file's first bytes, not its name: a safetensors header (an 8-byte length, then a JSON
object), a ``torch.save`` zip archive or a legacy ``torch.save`` pickle stream. ``torch.save`` files are read with
``weights_only=True`` (tensors and plain containers only; no code runs). A checkpoint that wraps its weights
(``{"state_dict": {...}}``, ``{"model": {...}}``, DINO's ``{"teacher": {...}}``) is unwrapped. Every failure is
one line naming the file, what was expected and what to give instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .errors import TextokError

WRAPPERS = ("state_dict", "model", "teacher")


def weights_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` zip or pickle) or ``"unknown"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    return "unknown"


def read_state_dict(path: str | os.PathLike[str], what: str, expected: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict (on the CPU) from a local weight file.

    ``what`` names the weights in messages ("VGG16 weights"); ``expected`` says what to give instead
    ("torchvision's vgg16-397923af.pth or a .safetensors file")."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TextokError(f"{what} not found at {p}: {expected}")
    fmt = weights_format(p)
    try:
        if fmt == "safetensors":
            state = load_file(str(p), device="cpu")
        elif fmt == "torch":
            with open(p, "rb") as f:  # a file object: torch.load would read a *.safetensors name as safetensors
                state = torch.load(f, map_location="cpu", weights_only=True)
        else:
            raise TextokError("neither a safetensors file nor a torch.save file")
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = why if len(why) <= 160 else why[:157] + "..."
        raise TextokError(f"cannot read {what} from {p} ({why}); give {expected}") from None
    if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
        for wrapper in WRAPPERS:
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise TextokError(f"{p} does not hold a flat state dict of tensors; give {expected}")
    return state
