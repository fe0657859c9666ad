"""Reading a published checkpoint without running anything from it.

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin`` files are pickles, so they are read
with ``torch.load(..., weights_only=True)`` only: tensors, dicts and plain values load, and a file that would
need any other object (arbitrary code) is refused in one line; the one class allowed besides is
``argparse.Namespace`` (training scripts store their arguments as one; unpickling it only sets attributes). A
directory (a Hugging Face snapshot) is read through its single weights file.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import TextokError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# Containers some releases wrap their state dict in (checked in this order).
WRAPPER_KEYS = ("state_dict", "model", "module", "ema")


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or the one weights file inside a directory (a Hub snapshot)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise TextokError(f"{p} does not exist: give the published checkpoint file (or the folder holding it)")
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    preferred = [f for f in found if f.suffix == ".safetensors"] or found
    if len(preferred) != 1:
        names = ", ".join(f.name for f in found) or "none"
        raise TextokError(f"{p} holds {len(preferred)} weight files ({names}): give the checkpoint file itself")
    return preferred[0]


def read_published(path: str | Path, containers: tuple[tuple[str, ...], ...] = ()) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict from a published checkpoint, read without executing it.
    ``containers``: where a format's training checkpoints keep the weights (key paths, the first present wins,
    e.g. ``("trainer", "var_wo_ddp")``); without them the usual ``{"model": state_dict}`` wrappers are tried."""
    return read_checkpoint(path, containers)[0]


def read_checkpoint(path: str | Path, containers: tuple[tuple[str, ...], ...] = ()) -> tuple[dict[str, Tensor],
                                                                                           tuple[str, ...] | None]:
    """:func:`read_published` that also says which of ``containers`` held the weights (None without them)."""
    p = weights_file(path)
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p), device="cpu"), None
        except (SafetensorError, OSError) as err:
            raise TextokError(f"{p} is not a readable safetensors file ({err})") from None
    if p.suffix not in PICKLE_SUFFIXES:
        raise TextokError(f"{p}: unknown checkpoint type {p.suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TextokError(f"{p} needs arbitrary code to load ({first[:160]}); textok reads published checkpoints "
                          "with torch.load(weights_only=True) only and will not run it: get the file's "
                          ".safetensors release, or re-save its state dict of tensors where you trust the code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise TextokError(f"{p} is not a readable torch checkpoint ({type(err).__name__}: {str(err)[:120]})") from None
    if not containers:
        return flat_state(obj, p), None
    inner, used = _inside(obj, containers, p)
    return flat_state(inner, p), used


def _inside(obj: object, containers: tuple[tuple[str, ...], ...], where: Path) -> tuple[object, tuple[str, ...]]:
    """The object at the first of ``containers`` (key paths) that ``obj`` holds, and that path."""
    for path in containers:
        inner = obj
        for key in path:
            inner = inner.get(key) if isinstance(inner, dict) else None
        if inner is not None:
            return inner, path
    tried = " or ".join("[" + "][".join(repr(k) for k in path) + "]" for path in containers)
    raise TextokError(f"{where} has no weights at {tried}; is it this format's released checkpoint? (check --from)")


def flat_state(obj: object, where: Path | str) -> dict[str, Tensor]:
    """Unwrap a ``{"model": state_dict}``-style container and check that every value is a tensor."""
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise TextokError(f"{where} does not hold a state dict (a mapping of names to tensors)")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise TextokError(f"{where}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; give the "
                          "checkpoint's state dict")
    return dict(obj)


__all__ = ["read_checkpoint", "read_published", "flat_state", "weights_file"]
