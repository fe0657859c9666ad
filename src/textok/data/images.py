"""Decoding and resizing images: any mode to RGB, center crop, resize, [-1, 1] tensors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import TextokError
from ..io import Inputs, atomic_file, check_output_file

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


# Single-channel modes with more than 8 bits and the value of full white in each: 16-bit PNGs open as I;16 (or
# I), float TIFFs as F (taken to be in [0, 1]). PIL's convert("RGB") clips them at 255, which turns a 16-bit
# image almost all white, so they are scaled by their own range instead.
HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded bytes -> float (3, size, size) in [-1, 1]. Raises ``UnidentifiedImageError``/``OSError`` if corrupt,
    ``Image.DecompressionBombError`` when it claims more pixels than PIL's limit."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in HIGH_DEPTH_WHITE:
            return _decode_high_depth(img, size)
        rgb = center_crop_resize(to_rgb(img), size)
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _decode_high_depth(img: Image.Image, size: int) -> torch.Tensor:
    """A 16-bit / float grayscale image, scaled by its mode's white (not clipped at 255) and resized in float."""
    arr = np.asarray(img, dtype=np.float32) / HIGH_DEPTH_WHITE[img.mode]
    gray = center_crop_resize(Image.fromarray(np.clip(arr, 0.0, 1.0)), size)
    x = torch.from_numpy(np.asarray(gray, dtype=np.float32).copy()).clamp(0.0, 1.0)
    return x.mul(2.0).sub(1.0)[None].repeat(3, 1, 1)


def load_image(path: str, size: int) -> torch.Tensor:
    """A file -> (3, size, size) in [-1, 1], with a one-line error if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read(), size)
    except FileNotFoundError:
        raise TextokError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise TextokError(f"image {path} is a directory; give image files") from None
    except Image.DecompressionBombError:
        raise TextokError(f"image {path} claims more than twice PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                          "(a guard against decompression bombs); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TextokError(f"image {path} cannot be decoded ({type(err).__name__}); is it a valid image file?") from None


def image_format(path: str | Path) -> str:
    """PIL's format name for ``path``'s extension; a one-line error for an extension no writer knows."""
    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise TextokError(f"{path}: {('unknown image extension ' + repr(ext)) if ext else 'no file extension'}; "
                          "name the output .png (or .jpg, .webp, .bmp, .tif)")
    return fmt


def check_output_image(path: str | Path, flag: str = "--out", inputs: Inputs = ()) -> None:
    """Refuse an output image path before any work: one of the ``inputs`` or inside one, a directory, a name
    without an image extension, or a folder that cannot be created or written."""
    check_output_file(path, flag, inputs)
    image_format(path)


def save_pil(img: Image.Image, path: str | Path) -> None:
    """Write ``img`` in the format its extension names, atomically (a full disk leaves the old file intact)."""
    fmt = image_format(path)
    with atomic_file(path) as tmp:
        img.save(tmp, format=fmt)


def save_image(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> an image grid (``nrow`` images per row), written atomically."""
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
    save_pil(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)
