"""Per-image PSNR and SSIM in torch (batched), plus a converter of mixed image modes to RGB.

SSIM follows Wang et al. 2004 as implemented by ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R, channel_axis=...``:
an 11x11 Gaussian window (radius ``int(3.5 * 1.5 + 0.5) = 5``), population (co)variances, K1=0.01,
K2=0.03, the SSIM map averaged after cropping a (win_size - 1) // 2 = 5 pixel border, channels averaged.
Because exactly the window radius is cropped, every kept pixel sees a window lying inside the image, so
a 'valid' separable convolution gives the same numbers as skimage's reflect-padded filter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import TextokError


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, (B, C, H, W) -> (B,). ``data_range`` is max - min (2 for [-1, 1] images).

    Matches ``skimage.metrics.peak_signal_noise_ratio``: 10 log10(R² / MSE), MSE over all pixels and
    channels of one image; identical images give +inf.
    """
    if x.shape != y.shape:
        raise TextokError(f"PSNR needs images of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window_1d(sigma: float = 1.5, truncate: float = 3.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 1D Gaussian scipy.ndimage uses (radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def _valid_filter(x: Tensor, w: Tensor, dim: int) -> Tensor:
    """'Valid' 1D correlation along ``dim`` as a sum of shifted slices (fast in float64 on CPU, unlike conv2d)."""
    n = x.shape[dim] - w.numel() + 1
    out = x.narrow(dim, 0, n) * w[0]
    for k in range(1, w.numel()):  # 11 taps, each a whole-tensor op
        out = out + x.narrow(dim, k, n) * w[k]
    return out


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, reduce_channels: bool = True) -> Tensor:
    """Per-image SSIM of the values as given, (B, C, H, W) -> (B,) (or (B, C) with ``reduce_channels=False``).

    SSIM is not shift invariant (its luminance term uses the means), so the value range matters: the
    number papers report is on [0, 1] (or [0, 255]) images; for textok's [-1, 1] images use
    :func:`ssim_pm1`. Computed in float64; images must be at least 11x11 for the default sigma.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise TextokError(f"SSIM needs two (B, C, H, W) batches of one shape; "
                          f"got {tuple(x.shape)} and {tuple(y.shape)}")
    w = gaussian_window_1d(sigma, dtype=torch.float64).to(x.device)
    win = w.numel()
    b, c, h, wd = x.shape
    if h < win or wd < win:
        raise TextokError(f"SSIM window is {win}x{win}; images of {h}x{wd} are too small")
    x = x.double().reshape(b * c, 1, h, wd)
    y = y.double().reshape(b * c, 1, h, wd)
    # Five filtered maps in one grouped pass: means, second moments and the cross moment.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (BC, 5, H, W)
    filt = _valid_filter(_valid_filter(stack, w, dim=-2), w, dim=-1)
    ux, uy, uxx, uyy, uxy = filt.unbind(dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_channel = s.flatten(1).mean(dim=1).view(b, c)
    return per_channel.mean(dim=1) if reduce_channels else per_channel


def ssim_pm1(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of [-1, 1] images on the usual [0, 1] scale (data_range 1): the number to report."""
    return ssim((x.double() + 1) / 2, (y.double() + 1) / 2, data_range=1.0)


def to_rgb(images: Tensor | np.ndarray, channel_axis: int = 1, alpha: str = "drop",
           background: float = 1.0) -> Tensor:
    """Convert grayscale (1 channel), gray+alpha (2) or RGBA (4) images to 3-channel RGB.

    ``channel_axis`` is the channel dimension (1 for (B, C, H, W), 0 for (C, H, W)). Alpha is dropped by
    default, like PIL's ``convert("RGB")`` used by pytorch-fid; ``alpha="composite"`` blends onto a
    ``background`` value given in the images' own range (alpha in [0, 1] for float, 0..255 for uint8).
    Anything else is refused with a clear error.
    """
    x = torch.as_tensor(images)
    if x.ndim < 3:
        raise TextokError(f"expected images with a channel axis; got shape {tuple(x.shape)}")
    axis = channel_axis % x.ndim
    c = x.shape[axis]
    if c not in (1, 2, 3, 4):
        raise TextokError(f"cannot convert {c}-channel images to RGB (supported: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA); "
                          f"check channel_axis={channel_axis} for shape {tuple(x.shape)}")
    if alpha not in ("drop", "composite"):
        raise TextokError(f"alpha={alpha!r}: use 'drop' or 'composite'")
    if c == 3:
        return x
    color = x.narrow(axis, 0, 1 if c in (1, 2) else 3)
    if c in (2, 4) and alpha == "composite":
        if x.dtype == torch.uint8:  # alpha in 0..255, background given in 0..255
            a = x.narrow(axis, c - 1, 1).double() / 255.0
            color = (color.double() * a + background * (1 - a)).round().clamp(0, 255).to(torch.uint8)
        elif torch.is_floating_point(x):  # alpha in [0, 1]
            a = x.narrow(axis, c - 1, 1)
            color = color * a + background * (1 - a)
        else:
            raise TextokError(f"alpha compositing supports uint8 or float images, not {x.dtype}")
    if color.shape[axis] == 1:
        color = color.expand(*[3 if i == axis else -1 for i in range(x.ndim)])
    return color.contiguous()


def pil_to_rgb(image: "object") -> "object":
    """A PIL image of any common mode (L, LA, P, RGBA, CMYK, I;16, ...) as mode RGB, or a clear error."""
    mode = getattr(image, "mode", None)
    if mode is None:
        raise TextokError(f"expected a PIL image; got {type(image).__name__}")
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I") and arr.max(initial=0) > 255 else (1.0 if mode == "F" else 255.0)
        from PIL import Image

        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    try:
        return image.convert("RGB")  # type: ignore[attr-defined]
    except (ValueError, OSError) as e:
        raise TextokError(f"cannot convert a PIL image of mode {mode!r} to RGB ({e})") from None


__all__ = ["psnr", "ssim", "ssim_pm1", "gaussian_window_1d", "to_rgb", "pil_to_rgb"]
