"""What the page calls things: a model by the folders that tell it apart, an error by its first line."""

from __future__ import annotations

from pathlib import Path


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def model_name(directory: str | Path) -> str:
    """``runs/demo/textok/final`` -> ``demo/textok/final``: the run's name is the informative part, and the
    folder above it tells two runs of the same recipe apart."""
    parts = Path(directory).resolve().parts
    return _suffix(parts, 3 if parts[-1] in ("final", "latest", "ema") else 2)


def _suffix(parts: tuple[str, ...], keep: int) -> str:
    return "/".join(parts[-keep:]) if len(parts) > keep else "/".join(parts[1:]) or parts[-1]


def distinct_names(directories: list[str]) -> list[str]:
    """:func:`model_name` of each directory, lengthened (more parent folders) until no two are the same."""
    parts = [Path(d).resolve().parts for d in directories]
    names = [model_name(d) for d in directories]
    for _ in range(max((len(p) for p in parts), default=0)):
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            break
        names = [_suffix(p, n.count("/") + 2) if n in clash else n for p, n in zip(parts, names)]
    return names


def same_directory(a: str | Path, b: str | Path) -> bool:
    """Two spellings of one directory (relative, with ``..`` or through a symlink) are the same model."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


__all__ = ["one_line", "model_name", "distinct_names", "same_directory"]
