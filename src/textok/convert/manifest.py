"""Manifests: the official key names and shapes of each published checkpoint layout, committed as data.

One JSON file per format under ``manifests/``: ``{"format", "source", "description", "variants": {name:
{"published": [file names], "test_only": bool, "settings": {the release's published config}, "keys": {name:
shape}}}}``. The key lists were read off the official model code built with each release's config; the
``test_only`` variant is the same layout at a CPU test size. A checkpoint is converted only when its keys and
shapes equal one variant's exactly; otherwise the refusal names the first key that differs.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError, TextokError

MANIFEST_DIR = Path(__file__).parent / "manifests"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One published layout: its key shapes and the settings its release was configured with."""

    format: str
    name: str
    published: tuple[str, ...]
    settings: dict[str, Any]
    keys: dict[str, tuple[int, ...]]
    test_only: bool = False


def parse_manifest(data: Any, where: str) -> dict[str, Variant]:
    """Validate a manifest's JSON; a malformed one is refused naming the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("format"), str) or not isinstance(data.get("variants"), dict):
        raise ConfigError(f"manifest {where} is malformed: it needs a \"format\" name and a \"variants\" mapping")
    variants: dict[str, Variant] = {}
    for name, entry in data["variants"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("keys"), dict) or not entry["keys"]:
            raise ConfigError(f"manifest {where}: variant {name!r} has no \"keys\" mapping of names to shapes")
        keys: dict[str, tuple[int, ...]] = {}
        for key, shape in entry["keys"].items():
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ConfigError(f"manifest {where}: variant {name!r} key {key!r} has shape {shape!r}, not a list "
                                  "of non-negative integers")
            keys[key] = tuple(shape)
        settings = entry.get("settings", {})
        if not isinstance(settings, dict):
            raise ConfigError(f"manifest {where}: variant {name!r} settings must be a mapping")
        variants[name] = Variant(data["format"], name, tuple(entry.get("published", ())), settings, keys,
                                 bool(entry.get("test_only", False)))
    if not variants:
        raise ConfigError(f"manifest {where} lists no variants")
    return variants


@cache
def load_manifest(fmt: str) -> dict[str, Variant]:
    """The committed manifest of ``fmt`` (cached: it is read-only data)."""
    path = MANIFEST_DIR / f"{fmt}.json"
    if not path.is_file():
        raise ConfigError(f"no manifest for format {fmt!r} ({path.name} is missing from the textok package)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"manifest {path.name} is not valid JSON ({err})") from None
    return parse_manifest(data, path.name)


def layout_problems(state: dict[str, Tensor], variant: Variant) -> list[str]:
    """How ``state`` differs from ``variant``'s layout: missing keys, then extra keys, then mis-shaped ones."""
    missing = [f"missing key {k!r}" for k in variant.keys if k not in state]
    extra = [f"extra key {k!r}" for k in state if k not in variant.keys]
    wrong = [f"key {k!r} has shape {list(state[k].shape)}, the layout has {list(s)}"
             for k, s in variant.keys.items() if k in state and tuple(state[k].shape) != s]
    return missing + extra + wrong


def match_variant(state: dict[str, Tensor], variants: dict[str, Variant], source: str,
                  name: str | None = None) -> Variant:
    """The variant whose layout ``state`` has exactly (``name`` forces one); otherwise one line naming the
    first key that differs from the closest variant."""
    if name is not None:
        if name not in variants:
            fmt = next(iter(variants.values())).format
            raise TextokError(f"format {fmt} has no variant {name!r} (variants: {', '.join(variants)})")
        candidates = {name: variants[name]}
    else:
        candidates = variants
    problems = {n: layout_problems(state, v) for n, v in candidates.items()}
    exact = [n for n, p in problems.items() if not p]
    if exact:
        return candidates[exact[0]]
    closest = min(problems, key=lambda n: len(problems[n]))
    found = problems[closest]
    more = f" (and {len(found) - 1} more differences)" if len(found) > 1 else ""
    fmt = candidates[closest].format
    raise TextokError(f"{source} does not have the published {fmt} layout of {closest}: {found[0]}{more}; check "
                      f"--from (see `textok convert --help`) or that the file is the released checkpoint")


__all__ = ["MANIFEST_DIR", "Variant", "layout_problems", "load_manifest", "match_variant", "parse_manifest"]
