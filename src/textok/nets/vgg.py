"""VGG16 ``features`` in torchvision's layout, tapped at the five LPIPS layers.

No VGG weights ship offline, so this module only defines the network with torchvision's exact parameter
names (``features.0.weight`` ... ``features.28.bias``) so that torchvision's ``vgg16-397923af.pth`` (or the
``features.*`` subset of it, as a .pth or .safetensors file) loads strictly from a local path. torchvision
itself is never imported: it does not work beside this torch build.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TextokError
from ..weights import read_state_dict

ENV_VAR = "TEXTOK_VGG16_WEIGHTS"
WEIGHTS_FILE = "vgg16-397923af.pth"

# torchvision's cfg "D": channel counts with "M" for a 2x2 max pool.
_CFG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Index (in ``features``) of the ReLU whose output is each LPIPS tap: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
TAP_NAMES: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def _make_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _CFG_D:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


def resolve_vgg16_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The VGG16 weight file from ``path`` or ``$TEXTOK_VGG16_WEIGHTS``; a one-line error if absent."""
    raw = path if path is not None else os.environ.get(ENV_VAR)
    if not raw:
        raise TextokError(
            f"VGG16 weights are needed for LPIPS but none were given: download torchvision's {WEIGHTS_FILE} "
            f"and pass its path (vgg16_weights=...) or set ${ENV_VAR} to it"
        )
    p = Path(raw).expanduser()
    if not p.is_file():
        raise TextokError(
            f"VGG16 weight file {p} does not exist: put torchvision's {WEIGHTS_FILE} there "
            f"or point ${ENV_VAR} / vgg16_weights at it"
        )
    return p


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` (key names preserved) returning the 5 LPIPS taps.

    Frozen by default (it is a loss/metric network): parameters do not require grad, but gradients flow
    to the input.
    """

    tap_names = TAP_NAMES
    tap_channels = TAP_CHANNELS

    def __init__(self, weights: str | os.PathLike[str] | None = None, *, load: bool = True,
                 freeze: bool = True) -> None:
        """``weights``: a local file (else ``$TEXTOK_VGG16_WEIGHTS``). ``load=False`` keeps random init (tests)."""
        super().__init__()
        self.features = _make_features()
        if load:
            self.load_weights(weights)
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def load_weights(self, weights: str | os.PathLike[str] | None = None) -> None:
        """Load torchvision vgg16 weights strictly (``classifier.*`` keys, if present, are ignored)."""
        path = resolve_vgg16_weights(weights)
        sd = read_state_dict(path, "VGG16 weights", f"torchvision's {WEIGHTS_FILE} or a .safetensors file")
        feats = {k: v for k, v in sd.items() if k.startswith("features.")}
        other = [k for k in sd if not k.startswith(("features.", "classifier."))]
        if not feats or other:
            raise TextokError(
                f"{path} is not a torchvision vgg16 state dict (found keys like {list(sd)[:3]}): "
                f"give {WEIGHTS_FILE} or its features.* subset"
            )
        try:
            self.load_state_dict(feats, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise TextokError(f"{path} does not match the vgg16 features layout ({first[-1].strip()}): "
                              f"give torchvision's {WEIGHTS_FILE}") from None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: already ImageNet/LPIPS-scaled (B,3,H,W). Returns [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
        taps: list[torch.Tensor] = []
        last = TAP_INDICES[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAP_INDICES:
                taps.append(x)
            if i == last:  # the final max pool is never needed
                break
        return taps
