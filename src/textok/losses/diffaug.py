"""DiffAugment (Zhao et al. 2020) for the discriminator: differentiable translation, colour and cutout.

ImageFolder's recipe feeds its discriminator through it (``prob`` 1, cutout 0.2): the reconstructions in the
generator's pass, and both the real images and the (detached) reconstructions in the discriminator's pass, each
with its own draws. Every transform is differentiable in the images, so the generator's gradient passes
through. Draws come from a ``torch.Generator`` so that a resumed run draws the same augmentations.

Per image: a translation by up to 1/8 of the side in each direction (zero fill); brightness + U(-0.5, 0.5),
saturation x U(0, 2) about the per-pixel channel mean, contrast x U(0.5, 1.5) about the image mean; a zeroed
square of ``cutout`` x the side at a uniformly drawn centre (clipped at the border).
"""

from __future__ import annotations

import torch
from torch import Tensor


def diff_augment(images: Tensor, generator: torch.Generator | None = None, cutout: float = 0.2,
                 translation: float = 0.125, color: bool = True) -> Tensor:
    """``images`` (B, C, H, W), augmented per image as the module docstring says (float32 at least); a zero
    ``cutout`` or ``translation`` and ``color=False`` switch those parts off (the draws stay the same)."""
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    B, _, H, W = x.shape
    u = torch.rand(7, B, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else "cpu").to(x.device)
    # translation: integer shifts in [-round(H t), round(H t)], zero fill
    dh, dw = round(H * translation), round(W * translation)
    shift_h = (u[0] * (2 * dh + 1)).floor().long() - dh
    shift_w = (u[1] * (2 * dw + 1)).floor().long() - dw
    rows = torch.arange(H, device=x.device)[None, :] - shift_h[:, None]  # source row of each output row
    cols = torch.arange(W, device=x.device)[None, :] - shift_w[:, None]
    valid = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    idx_h = rows.clamp(0, H - 1)[:, None, :, None].expand(B, x.shape[1], H, W)
    idx_w = cols.clamp(0, W - 1)[:, None, None, :].expand(B, x.shape[1], H, W)
    x = x.gather(2, idx_h).gather(3, idx_w) * valid[:, None].to(x.dtype)
    if color:  # brightness, saturation, contrast
        c = lambda v: v.to(x.dtype)[:, None, None, None]  # noqa: E731
        x = x + c(u[2] - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * c(u[3] * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c(u[4] + 0.5) + mean
    # cutout: a zeroed square of side round(cutout H) x round(cutout W) centred at a uniform position
    if cutout > 0:
        ch, cw = round(H * cutout), round(W * cutout)
        top = (u[5] * H).floor().long() - ch // 2
        left = (u[6] * W).floor().long() - cw // 2
        r = torch.arange(H, device=x.device)[None, :]
        q = torch.arange(W, device=x.device)[None, :]
        inside_h = (r >= top[:, None]) & (r < top[:, None] + ch)
        inside_w = (q >= left[:, None]) & (q < left[:, None] + cw)
        hole = inside_h[:, :, None] & inside_w[:, None, :]
        x = x * (~hole)[:, None].to(x.dtype)
    return x


__all__ = ["diff_augment"]
