"""DINOv2 ViT (Oquab et al. 2023) as a frozen feature network, read from a local checkpoint.

Why: ImageFolder regularizes one token branch against DINOv2's global (CLS) feature. No DINOv2 weights are
available offline, so this module only *loads* them: a ``.safetensors`` or ``.pth`` state dict in the key
layout shared by the official release and timm (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``; optional
register tokens as ``reg_token`` (timm) or ``register_tokens`` (official)). Width, depth, MLP width, patch
size and position grid are read from the tensors; heads = width / 64 (every DINOv2 size).

As in ImageFolder's code (timm ``patch_size=16``), the 14 x 14 patch embedding can be resampled to another
patch size with FlexiViT's pseudo-inverse resize: for every patch x, <resize(x), w_new> = <x, w_old> when the
new patch is not smaller. Position embeddings are resized bicubically to the input's patch grid.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TextokError
from ..weights import read_state_dict
from .vit import Attention, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resample_patch_kernel(weight: Tensor, new_size: int) -> Tensor:
    """(D, C, p, p) patch-embedding kernel -> (D, C, new, new), FlexiViT's pseudo-inverse resize (float64)."""
    old = weight.shape[-1]
    if old == new_size:
        return weight
    basis = torch.eye(old * old, dtype=torch.float64).view(old * old, 1, old, old)
    # resize operator as a matrix: row i = the resized i-th basis patch (old^2, new^2)
    resize = F.interpolate(basis, size=(new_size, new_size), mode="bicubic", align_corners=False).flatten(1)
    flat = weight.double().flatten(2)  # (D, C, old^2)
    new = flat @ torch.linalg.pinv(resize).t()  # w_new = pinv(M) w_old, per (D, C)
    return new.view(*weight.shape[:2], new_size, new_size).to(weight.dtype)


def _resize_grid(pos: Tensor, grid: int, new_h: int, new_w: int) -> Tensor:
    """(1, grid^2, D) -> (1, new_h * new_w, D), bicubic (antialiased when shrinking)."""
    if (grid, grid) == (new_h, new_w):
        return pos
    D = pos.shape[-1]
    g = pos.reshape(1, grid, grid, D).permute(0, 3, 1, 2)
    g = F.interpolate(g.float(), size=(new_h, new_w), mode="bicubic", align_corners=False,
                      antialias=new_h < grid or new_w < grid)
    return g.permute(0, 2, 3, 1).reshape(1, new_h * new_w, D).to(pos.dtype)


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as DINOv2 (textok's ViT MLP uses the tanh approximation)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, hidden)
        self.ls2 = LayerScale(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> the CLS feature after the final norm (B, width)."""

    name = "dinov2"

    def __init__(self, width: int, depth: int, heads: int, hidden: int, patch_size: int = 14, pos_grid: int = 37,
                 class_pos: bool = True, reg_tokens: int = 0, image_size: int = 224) -> None:
        super().__init__()
        self.feature_dim, self.pos_grid, self.class_pos, self.image_size = width, pos_grid, class_pos, image_size
        self.patch_embed = PatchEmbed(patch_size, 3, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, width)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid**2 + int(class_pos), width))
        self.blocks = nn.ModuleList(DinoBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] RGB -> ImageNet-normalised pixels at ``image_size`` (bicubic, antialiased when shrinking)."""
        s = self.image_size
        if tuple(images.shape[-2:]) != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bicubic", align_corners=False,
                                   antialias=images.shape[-1] > s)
        return ((images + 1.0) / 2.0 - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def features(self, pixels: Tensor) -> Tensor:
        """ImageNet-normalised pixels (sides a multiple of the patch size) -> CLS feature (B, width)."""
        B, _, H, W = pixels.shape
        p = self.patch_size
        if H % p or W % p:
            raise TextokError(f"DINOv2 input {H}x{W} is not a multiple of its patch size {p}")
        x = self.patch_embed(pixels)
        pos = self.pos_embed
        cls_pos, patch_pos = (pos[:, :1], pos[:, 1:]) if self.class_pos else (None, pos)
        x = x + _resize_grid(patch_pos, self.pos_grid, H // p, W // p)
        cls = self.cls_token + cls_pos if cls_pos is not None else self.cls_token
        parts = [cls.expand(B, -1, -1)]
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(B, -1, -1))
        x = torch.cat(parts + [x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, images: Tensor) -> Tensor:
        return self.features(self.preprocess(images))


def load_dinov2(path: str | os.PathLike[str], *, patch_size: int | None = 16, image_size: int = 224,
                heads: int | None = None) -> DINOv2:
    """A frozen :class:`DINOv2` from a local checkpoint; ``patch_size`` resamples the patch embedding
    (None keeps the checkpoint's), ``image_size`` is the side images are resized to."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextokError(f"DINOv2 checkpoint {path} does not exist: pass a local .safetensors/.pth of a DINOv2 "
                          "ViT (official or timm key layout)")
    state = {k.removeprefix("backbone."): v for k, v in read_state_dict(path, "DINOv2 checkpoint", "a local .safetensors/.pth of a DINOv2 ViT (timm or official layout)").items()}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
    state.pop("mask_token", None)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            hint = " (SwiGLU MLPs, as in ViT-g, are not supported)" if "blocks.0.mlp.w12.weight" in state else ""
            raise TextokError(f"{path} is not a DINOv2 ViT checkpoint in the timm/official layout: {key!r} is "
                              f"missing{hint}")
    width = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    tokens = state["pos_embed"].shape[1]
    class_pos = math.isqrt(tokens) ** 2 != tokens
    grid = math.isqrt(tokens - int(class_pos))
    if grid * grid != tokens - int(class_pos):
        raise TextokError(f"{path}: pos_embed holds {tokens} positions, not a square grid (+ class token)")
    native = state["patch_embed.proj.weight"].shape[-1]
    reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    for i in range(depth):  # DINOv2 always has LayerScale; accept checkpoints without it as scale 1
        for ls in ("ls1", "ls2"):
            state.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(width))
    model = DINOv2(width, depth, heads or max(1, width // 64), state["blocks.0.mlp.fc1.weight"].shape[0], native,
                   grid, class_pos, reg, image_size)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise TextokError(f"{path} does not fit a DINOv2 ViT of width {width}, depth {depth}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, mis-shaped {wrong[:3]}")
    model.load_state_dict(state)
    if patch_size is not None and patch_size != native:
        with torch.no_grad():
            w = resample_patch_kernel(model.patch_embed.proj.weight.data, patch_size)
            conv = nn.Conv2d(3, width, patch_size, stride=patch_size)
            conv.weight.copy_(w)
            conv.bias.copy_(model.patch_embed.proj.bias)
        model.patch_embed.proj, model.patch_embed.patch_size = conv, patch_size
    if image_size % model.patch_size:
        raise TextokError(f"DINOv2 teacher input size {image_size} is not a multiple of its patch size "
                          f"{model.patch_size}")
    return model.eval().requires_grad_(False)


__all__ = ["DINOv2", "load_dinov2", "resample_patch_kernel", "IMAGENET_MEAN", "IMAGENET_STD"]
