"""Report building blocks shared by the verbs, the demos, the study and the benchmarks: a text table for the
terminal, a Markdown table, a captioned image grid and a line plot.

Why one module: every experiment writes the same kinds of artefact, and they should look the same everywhere
(grids: original first, pixels upscaled nearest so tokens' artefacts stay visible, the caption beside each
row; plots: headless Agg, one line per series).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from PIL import Image, ImageDraw, ImageFont

from .data.images import save_pil
from .errors import TextokError

GAP = 4  # pixels between grid cells
HEADER = 24  # height of the column-title strip
TEXT_WIDTH = 560  # width of the caption strip beside the images
LINE_HEIGHT = 18
WRAP = 70  # characters per caption line


def _font():
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def wrap_text(text: str, width: int = WRAP) -> list[str]:
    """Greedy word wrap at ``width`` characters (a single longer word stays on its own line)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return lines


def _fit_words(text: str, width: float, length) -> list[str]:
    """Wrap ``text`` on spaces so each line's rendered ``length`` fits ``width`` (a longer word stays whole)."""
    lines, line = [], ""
    for word in text.split():
        if line and length(f"{line} {word}") > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def _to_pil(image: Tensor):
    arr = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(arr.numpy())


@torch.no_grad()
def captioned_grid(columns: dict[str, Tensor], captions: Sequence[str], path: str | Path, scale: int = 4) -> Path:
    """Save a grid: one row per image, one column per named tensor (B,3,H,W) in [-1,1], the caption beside
    each row. Put the originals first in ``columns``; images are upscaled ``scale``x with nearest neighbour."""
    if not columns:
        raise TextokError("captioned_grid needs at least one column of images")
    tensors = list(columns.values())
    rows = tensors[0].shape[0]
    for name, t in columns.items():
        if t.dim() != 4 or t.shape[1] != 3:
            raise TextokError(f"grid column {name!r} has shape {tuple(t.shape)}; expected (batch, 3, H, W)")
        if t.shape[0] != rows or t.shape[-2:] != tensors[0].shape[-2:]:
            raise TextokError(f"grid column {name!r} has shape {tuple(t.shape)} but the first column has "
                              f"{tuple(tensors[0].shape)}: give every column the same images count and size")
    if len(captions) != rows:
        raise TextokError(f"{len(captions)} captions for {rows} grid rows: give one caption per row")
    h, w = tensors[0].shape[-2] * scale, tensors[0].shape[-1] * scale
    ncol = len(tensors)
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [_fit_words(t, w - 4, lambda s: measure.textlength(s, font=font)) for t in columns]
    header = HEADER + (LINE_HEIGHT - 2) * (max(len(t) for t in titles) - 1)  # narrow columns: titles wrap
    canvas = Image.new("RGB", (ncol * (w + GAP) + TEXT_WIDTH, header + rows * (h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        for k, line in enumerate(title):
            draw.text((j * (w + GAP) + 4, 4 + (LINE_HEIGHT - 2) * k), line, fill="black", font=font)
    max_lines = max(1, h // LINE_HEIGHT)
    for i in range(rows):
        y = header + i * (h + GAP)
        for j, col in enumerate(tensors):
            canvas.paste(_to_pil(col[i]).resize((w, h), Image.Resampling.NEAREST), (j * (w + GAP), y))
        for k, line in enumerate(wrap_text(captions[i])[:max_lines]):
            draw.text((ncol * (w + GAP) + 8, y + 4 + LINE_HEIGHT * k), line, fill="black", font=font)
    path = Path(path)
    save_pil(canvas, path)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned text table on standard output (the columns: ``columns``, else the first row's keys)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def markdown_table(rows: list[dict]) -> str:
    """A GitHub Markdown table; the columns are the keys of all rows in first-seen order (missing = blank)."""
    if not rows:
        return ""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) if c in r else "" for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def line_plot(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, path: str | Path,
              logx: bool = True, title: str | None = None) -> Path:
    """One line (with markers) per named series of (x, y) points, saved as PNG. With ``logx`` the x axis is
    log2 and ticks sit on the given x values (token counts 16, 32, 64, ...)."""
    import matplotlib  # lazily: heavy, needed only for plots

    matplotlib.use("Agg")  # headless; no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    xs: set[float] = set()
    try:
        for name, points in series.items():
            pts = sorted((float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y)))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            xs.update(p[0] for p in pts)
        if logx and xs and min(xs) > 0:
            ax.set_xscale("log", base=2)
        if xs:
            ticks = sorted(xs)
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


__all__ = ["captioned_grid", "line_plot", "markdown_table", "print_table", "wrap_text"]
