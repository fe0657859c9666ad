"""Inception-v3 as used for FID / IS: the pytorch-fid network, loadable from its standard weight file.

The architecture and parameter names follow pytorch-fid's ``fid_inception_v3`` (torchvision's
``Inception3(num_classes=1008, aux_logits=False)`` with the TensorFlow-compatible blocks
``FIDInceptionA/C/E_1/E_2``), so ``pt_inception-2015-12-05-6726825d.pth`` loads with
``load_state_dict(strict=True)``. Those weights are the TF "2015-12-05" graph that the original FID/IS
code and ADM's evaluator use, hence numbers comparable with papers.

Nothing is downloaded: the file comes from a path argument or ``$TEXTOK_INCEPTION_WEIGHTS``.

Input convention: float images (B, 3, H, W) in **[-1, 1]** (the textok convention). They are resized to
299x299 bilinearly (``align_corners=False``, no antialiasing), exactly like pytorch-fid, which takes
[0, 1] and maps ``2x - 1`` afterwards; both steps are affine, so the order does not change the result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import sha256_file
from ..errors import TextokError
from ..weights import read_state_dict, weights_format

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_ENV = "TEXTOK_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; the TF-ported conv unit."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's 3x3 average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a); unchanged from torchvision."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a); unchanged from torchvision."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class _InceptionE(nn.Module):
    """8x8 block with expanded filter banks; the two FID variants differ only in the pool branch."""

    max_pool: bool = False

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionE_1(_InceptionE):  # noqa: N801 (reference name)
    """Mixed_7b: TF-style average pool."""


class FIDInceptionE_2(_InceptionE):  # noqa: N801 (reference name)
    """Mixed_7c: the TF FID graph uses a max pool here (a quirk of that graph, kept for fidelity)."""

    max_pool = True


class InceptionOutput(NamedTuple):
    pool: Tensor  # (B, 2048) final average-pool features: the FID feature space
    logits: Tensor  # (B, 1008) fc output with bias
    logits_unbiased: Tensor  # (B, 1008) fc output without bias: what the reference IS code uses


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3 (1008-way fc). ``forward`` returns pool features and logits.

    ``real_weights`` is True only after :func:`load_fid_inception` loaded the standard file; a randomly
    initialised instance is a stand-in whose numbers must not be called FID or IS.
    """

    def __init__(self, resize_input: bool = True) -> None:
        super().__init__()
        self.resize_input = resize_input
        self.real_weights = False
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def pool_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> (B, 2048) pool3 features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise TextokError(f"Inception expects images (B, 3, H, W); got shape {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype)
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> InceptionOutput:
        pool = self.pool_features(x)
        unbiased = pool @ self.fc.weight.t()
        return InceptionOutput(pool, unbiased + self.fc.bias, unbiased)


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The weight file from the argument, else ``$TEXTOK_INCEPTION_WEIGHTS``; a clear error if absent."""
    where = (f"download {WEIGHTS_URL} on a machine with internet and pass its path "
             f"(--inception-weights PATH) or set {WEIGHTS_ENV}=PATH")
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None:
        raise TextokError(f"Inception FID weights not given: need {WEIGHTS_FILENAME} "
                          f"(sha256 {WEIGHTS_SHA256_PREFIX}...); {where}")
    p = Path(chosen).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_FILENAME
    if not p.is_file():
        raise TextokError(f"Inception FID weights not found at {p}: need {WEIGHTS_FILENAME} "
                          f"(sha256 {WEIGHTS_SHA256_PREFIX}...); {where}")
    return p


def load_fid_inception(path: str | os.PathLike | None = None, *, check_hash: bool = True,
                       resize_input: bool = True) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load the pytorch-fid weights strictly (``real_weights=True``).

    ``path`` may be the file or a folder holding it; ``None`` reads ``$TEXTOK_INCEPTION_WEIGHTS``.
    A ``.pth`` file is loaded with ``torch.load(weights_only=True)`` and, with ``check_hash``, its sha256
    must start with 6726825d; a ``.safetensors`` conversion is accepted as is.
    """
    p = resolve_weights_path(path)
    if check_hash and weights_format(p) == "torch":
        digest = sha256_file(p)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise TextokError(f"{p} has sha256 {digest[:8]}..., not the FID Inception weights "
                              f"{WEIGHTS_FILENAME} (sha256 {WEIGHTS_SHA256_PREFIX}...); get that file "
                              f"or pass check_hash=False for a file you trust")
    state = read_state_dict(p, "FID Inception weights", f"the pytorch-fid file {WEIGHTS_FILENAME} or its "
                            ".safetensors conversion")
    net = FIDInceptionV3(resize_input=resize_input)
    state = dict(state)
    for key, buf in net.state_dict().items():  # files written before BatchNorm counters existed lack them
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(buf)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise TextokError(f"{p} does not match the FID Inception layout ({detail}); "
                          f"expected {WEIGHTS_FILENAME}") from None
    net.real_weights = True
    return net.eval()
