"""Perceptual distances: LPIPS (VGG, v0.1 numerics) and an offline open_nsfw feature distance.

Both take images in [-1,1] (B,3,H,W) and return one distance per sample, shape (B,); a training loss takes
``.mean()``. Both networks are frozen, but gradients flow to the inputs. ``x`` and ``y`` go through the
network as one concatenated batch.

* ``LPIPS`` reproduces the ``lpips`` package v0.1 (VGG): its ScalingLayer, per-position unit
  normalisation over channels, squared difference, 1x1 linear heads ``lin0..lin4`` (read from the installed
  ``lpips`` wheel's ``weights/v0.1/vgg.pth`` without importing ``lpips``, which imports torchvision),
  spatial mean, sum over the five taps. It needs torchvision's VGG16 weights from a local file.
* ``OpenNSFWPerceptual`` is the offline default: the same recipe without learned heads (each channel weighs
  1, i.e. ``lpips``'s ``lpips=False`` variant) on open_nsfw's stage features, averaged over stages. It is a
  stand-in for LPIPS, not LPIPS.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, TextokError
from ..nets.opennsfw import OpenNSFW
from ..nets.vgg import TAP_CHANNELS, VGG16Features
from ..weights import read_state_dict

# lpips v0.1 ScalingLayer: (x - shift) / scale maps [-1,1] inputs to ImageNet-normalised ones.
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
_EPS = 1e-10

PERCEPTUAL_NAMES: tuple[str, ...] = ("lpips-vgg", "opennsfw", "none")


def normalize_channels(f: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Unit-normalise the channel vector at each position (lpips.normalize_tensor), in float32.

    ``eps**2`` under the root keeps the gradient finite where a feature vector is all zero (a dead ReLU
    position), where the reference formula gives NaN; the value differs from it only when ||f|| < ~1e-9.
    """
    f = f.float()
    norm = torch.sqrt(f.pow(2).sum(dim=1, keepdim=True) + eps * eps)
    return f / (norm + eps)


def lpips_heads_path(net: str = "vgg") -> Path:
    """The installed ``lpips`` wheel's v0.1 head weights, located without importing ``lpips``."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise TextokError("LPIPS heads need the PyPI package lpips: pip install --no-deps lpips==0.1.4 "
                          "(or pass lpips_heads=PATH to its weights/v0.1/vgg.pth)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise TextokError(f"{path} is missing: reinstall lpips==0.1.4 with --no-deps")
    return path


def load_lpips_heads(path: str | os.PathLike[str] | None = None) -> list[torch.Tensor]:
    """The five (1,C,1,1) head weights ``lin{k}.model.1.weight`` of lpips' VGG v0.1 file."""
    p = Path(path) if path is not None else lpips_heads_path("vgg")
    if not p.is_file():
        raise TextokError(f"LPIPS head file {p} does not exist: pass lpips' weights/v0.1/vgg.pth or leave it unset")
    sd = read_state_dict(p, "LPIPS heads", "lpips' weights/v0.1/vgg.pth")
    try:
        heads = [sd[f"lin{k}.model.1.weight"].float() for k in range(5)]
    except (KeyError, TypeError):
        raise TextokError(f"{p} is not lpips' v0.1 VGG head file (keys lin0.model.1.weight ... lin4...)") from None
    for k, (w, c) in enumerate(zip(heads, TAP_CHANNELS)):
        if tuple(w.shape) != (1, c, 1, 1):
            raise TextokError(f"{p}: head lin{k} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1) for VGG")
    return heads


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 backbone: ``forward(x, y) -> (B,)`` for images in [-1,1]."""

    def __init__(self, vgg16_weights: str | os.PathLike[str] | None = None,
                 lpips_heads: str | os.PathLike[str] | None = None, *, load_vgg: bool = True) -> None:
        """``vgg16_weights``: torchvision vgg16 file (else ``$TEXTOK_VGG16_WEIGHTS``); ``load_vgg=False`` keeps
        random VGG weights (tests only). ``lpips_heads``: defaults to the installed wheel's file."""
        super().__init__()
        self.net = VGG16Features(vgg16_weights, load=load_vgg)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        with torch.no_grad():
            for lin, w in zip(self.lins, load_lpips_heads(lpips_heads)):
                lin.weight.copy_(w)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Stays in eval mode: a frozen metric network."""
        return super().train(False)

    def per_layer(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The five per-tap terms, each (B,), whose sum is the LPIPS distance."""
        b = x.shape[0]
        inp = (torch.cat([x, y], 0) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for f, lin in zip(self.net(inp), self.lins):
            f = normalize_channels(f)
            d = (f[:b] - f[b:]).pow(2)
            # the 1x1 head as a weighted channel sum: stays float32 under autocast
            out.append((d * lin.weight.float().view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2)))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.per_layer(x, y), 0).sum(0)


class OpenNSFWPerceptual(nn.Module):
    """LPIPS-style distance on open_nsfw features without learned heads: ``forward(x, y) -> (B,)``.

    Per stage: unit-normalise channels at each position, squared difference summed over channels (in [0,4]),
    mean over positions; then the mean over the chosen stages (0 = stem ... 4 = last stage).
    """

    def __init__(self, onnx_path: str | os.PathLike[str] | None = None,
                 layers: Sequence[int] = (0, 1, 2, 3, 4), size: int | None = 224) -> None:
        """``size``: side images are resized to before the net (224 as trained; None = native size)."""
        super().__init__()
        if not layers or any(not 0 <= i <= 4 for i in layers):
            raise ConfigError(f"opennsfw perceptual layers {tuple(layers)} must be a non-empty subset of 0..4")
        self.layers = tuple(sorted(set(int(i) for i in layers)))
        self.net = OpenNSFW(onnx_path, size=size)

    def train(self, mode: bool = True) -> "OpenNSFWPerceptual":
        """Stays in eval mode: a frozen loss network."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        feats = self.net.forward_features(torch.cat([x, y], 0))
        terms = []
        for i in self.layers:
            f = normalize_channels(feats[i])
            terms.append((f[:b] - f[b:]).pow(2).sum(1).mean(dim=(1, 2)))
        return torch.stack(terms, 0).mean(0)


def build_perceptual(name: str, **paths: object) -> nn.Module | None:
    """Perceptual loss by name: "lpips-vgg", "opennsfw" (offline default) or "none" (-> None).

    Keyword arguments: ``vgg16_weights``, ``lpips_heads`` (lpips-vgg); ``onnx_path``, ``layers``, ``size``
    (opennsfw). Missing weights raise a TextokError that says why and what to use instead.
    """
    key = name.strip().lower()
    if key == "none":
        return None
    if key == "lpips-vgg":
        allowed = {"vgg16_weights", "lpips_heads"}
    elif key == "opennsfw":
        allowed = {"onnx_path", "layers", "size"}
    else:
        raise ConfigError(f"unknown perceptual loss {name!r}: choose one of {', '.join(PERCEPTUAL_NAMES)}")
    extra = sorted(set(paths) - allowed)
    if extra:
        raise ConfigError(f"perceptual loss {key!r} takes {sorted(allowed)}, not {extra}")
    kwargs = {k: v for k, v in paths.items() if v is not None or k == "size"}  # size=None: native size
    try:
        if key == "lpips-vgg":
            return LPIPS(**kwargs)  # type: ignore[arg-type]
        return OpenNSFWPerceptual(**kwargs)  # type: ignore[arg-type]
    except ConfigError:
        raise
    except TextokError as e:
        alt = "use perceptual=opennsfw (offline) or none" if key == "lpips-vgg" else "use perceptual=none"
        raise TextokError(f"perceptual loss {key!r} unavailable: {e}; or {alt}") from None
