"""Progress bars for long work: drawn on a terminal (and in a notebook), quiet when stderr is a file or a pipe, so
logs and CI output keep only their lines (the estimated-time line and the metrics still print)."""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` that draws only on a terminal: ``disable=None`` is tqdm's "off when
    the stream is not a TTY" (its notebook bar stays on). ``disable=True`` still turns it off everywhere."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


__all__ = ["progress_bar"]
