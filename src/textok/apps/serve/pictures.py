"""Tensors -> small PNGs for the page: images, difference heat maps, the tokens as an N x d picture.

The page shows 16-64 px images; they are sent at their true size as PNG data URLs and enlarged by the
browser with nearest-neighbour scaling, so what the user sees (and downloads) is exactly what the model
produced. The colour stops are sent to the page too, which draws its legends from them.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# A few stops of matplotlib's "inferno" (black -> purple -> orange -> pale yellow) for |difference| maps,
# and a blue-white-red diverging map for signed token values; interpolated linearly.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)
_DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                      dtype=np.float64)


def png_data_url(rgb: np.ndarray) -> str:
    """uint8 (H, W, 3) -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3), rounded like ``save_image``."""
    x = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return x.permute(1, 2, 0).numpy()


def _colormap(t: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along the colour stops."""
    t = np.clip(t, 0.0, 1.0) * (len(stops) - 1)
    lo = np.floor(t).astype(int).clip(0, len(stops) - 2)
    frac = (t - lo)[..., None]
    return np.round(stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def heat_map(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> tuple[str, float]:
    """|a - b| averaged over colour, as an inferno PNG; returns (data URL, the largest difference in 0-255 levels).

    ``scale`` (in levels) fixes what maps to the brightest colour, so maps side by side compare; by default
    each map is scaled to its own maximum (at least 8 levels, so noise does not look like a large error)."""
    diff = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).abs().mean(0).cpu().numpy() * 127.5
    top = float(diff.max())
    return png_data_url(_colormap(diff / max(scale or top, 8.0), _INFERNO)), top


def legend_colours() -> dict[str, list[str]]:
    """The colour stops of the heat maps and token pictures as CSS colours, for the page's legends."""
    return {name: ["#%02x%02x%02x" % tuple(int(c) for c in stop) for stop in stops]
            for name, stops in (("heat", _INFERNO), ("tokens", _DIVERGING))}


def token_picture(z: torch.Tensor, max_side: int = 256) -> str:
    """Tokens (N, d) -> a picture, one cell per value: blue negative, white zero, red positive (scaled by the
    largest magnitude). N runs down, d across; each cell is a square of up to 24 px."""
    v = z.detach().float().cpu().reshape(z.shape[0], -1).numpy()
    peak = float(np.abs(v).max()) or 1.0
    rgb = _colormap(0.5 + 0.5 * v / peak, _DIVERGING)
    cell = int(max(2, min(24, max_side // max(v.shape))))
    return png_data_url(np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1))


__all__ = ["png_data_url", "to_uint8", "heat_map", "token_picture", "legend_colours"]
