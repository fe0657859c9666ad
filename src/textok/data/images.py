"""Decoding and resizing images: any mode to RGB, center crop, resize, [-1, 1] tensors."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import TextokError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette and CMYK convert directly; transparency is composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None if s < 2 * size else 3.0)
    return img


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> float (3, size, size) in [-1, 1]. Raises ``UnidentifiedImageError``/``OSError`` if corrupt."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = center_crop_resize(to_rgb(img), size)
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_image(path: str, size: int) -> torch.Tensor:
    """A file -> (3, size, size) in [-1, 1], with a one-line error if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read(), size)
    except FileNotFoundError:
        raise TextokError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TextokError(f"image {path} cannot be decoded ({type(err).__name__}); is it a valid image file?") from None


def save_image(images: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> a PNG grid (``nrow`` images per row)."""
    if images.dim() == 3:
        images = images[None]
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    B, C, H, W = x.shape
    nrow = nrow or B
    rows = (B + nrow - 1) // nrow
    grid = torch.full((C, rows * H, nrow * W), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
