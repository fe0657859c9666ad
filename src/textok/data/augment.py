"""Training augmentation: random crops and horizontal flips of a batch, drawn from a seeded generator.

Why here and on tensors: every data source (the embedded scenes, folders, shards, decoded-once sets) hands the
training loop square images of one size, so one batch-level step serves them all, and drawing from a generator
seeded by the step keeps resume exact. Extraction, evaluation and the reconstruction grid never augment.

A random crop works on the centre square of each image, decoded at :func:`load_size`: a square of side
``c`` in [S, L] pixels (S the model's size, L = ceil(S / crop_min)) at a random position, resized to S. The
crop side follows ImageFolder's recipe (its training images are resized so the short side is uniform in
[S, S / 0.8], then a random S x S crop is taken): here c = L S / s for s uniform in [S, L]. The references
crop from the whole image; here the crop stays inside the centre square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError


def load_size(image_size: int, crop_min: float) -> int:
    """The side the training images are decoded at, so that a crop of ``crop_min`` of it is ``image_size``."""
    check_crop(crop_min)
    return image_size if crop_min >= 1.0 else math.ceil(image_size / crop_min)


def check_crop(crop_min: float) -> None:
    if not 0.0 < crop_min <= 1.0:
        raise ConfigError(f"data.crop_min={crop_min} must lie in (0, 1] (1 = the centre crop alone; ImageFolder's "
                          "random crops use 0.8)")


def augment(images: Tensor, size: int, crop_min: float = 1.0, flip: bool = False,
            generator: torch.Generator | None = None) -> Tensor:
    """Images (B, 3, L, L) -> (B, 3, size, size): a random crop per image (when ``L > size``; see the module
    docstring) resized with antialiased bicubic interpolation, then a left-right flip with probability 0.5
    (``flip``). Every draw comes from ``generator``: the same generator state gives the same batch."""
    B, _, L, W = images.shape
    if L != W or L < size:
        raise ConfigError(f"augment needs square images of at least {size} px, got {L} x {W}")
    if L == size and not flip:
        return images
    out = images
    if L > size:
        draws = torch.rand(B, 3, generator=generator, dtype=torch.float64).tolist()
        crops = []
        for i, (u_side, u_top, u_left) in enumerate(draws):
            short = size + u_side * (L - size)  # the short side ImageFolder would resize to
            side = min(L, max(size, round(L * size / short)))
            top, left = int(u_top * (L - side + 1)), int(u_left * (L - side + 1))
            crop = images[i:i + 1, :, top:top + side, left:left + side]
            if side != size:
                crop = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True,
                                     align_corners=False).clamp(-1, 1).to(images.dtype)
            crops.append(crop)
        out = torch.cat(crops)
    if flip:
        mirrored = torch.rand(B, generator=generator) < 0.5
        out = torch.where(mirrored[:, None, None, None].to(out.device), out.flip(-1), out)
    return out


def augment_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch's augmentation: a pure function of its position (exact resume)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_013 + micro * 103 + rank + 7) % (2**63 - 1))


__all__ = ["augment", "augment_generator", "check_crop", "load_size"]
