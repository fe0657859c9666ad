"""Fréchet distance in any feature space: the extractor protocol, streaming statistics and honest names.

A feature extractor is a torch module mapping images (B, 3, H, W) in [-1, 1] to (B, D) features, with a
``name`` attribute. The reported metric is ``FD-<name>``; only the Inception extractor carrying the real
pytorch-fid weights (``real_weights=True``) is reported as ``FID``. A randomly initialised Inception, or
any other network (e.g. open_nsfw), never gets that name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, TextokError
from ..nets.inception import FIDInceptionV3, load_fid_inception
from ..nets.opennsfw import INPUT_SIZE, OpenNSFW
from .fid import FeatureStats, GaussianStats, frechet_distance_stats


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images (B, 3, H, W) in [-1, 1] -> features (B, D)."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


DEFAULT_FD_SIZE = 64  # FD-opennsfw's input side unless told otherwise: what `textok demo` and `eval` report


class InceptionFeatures(nn.Module):
    """The FID Inception as a :class:`FeatureExtractor` giving the 2048-d pool features."""

    name = "inception"

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.net = net

    @property
    def real_weights(self) -> bool:
        return bool(getattr(self.net, "real_weights", False))

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None, check_hash: bool = True) -> "InceptionFeatures":
        """Load the real pytorch-fid weights (path, folder, or ``$TEXTOK_INCEPTION_WEIGHTS``)."""
        return cls(load_fid_inception(path, check_hash=check_hash))

    def forward(self, images: Tensor) -> Tensor:
        return self.net.pool_features(images)


INCEPTION_ENV = "TEXTOK_INCEPTION_WEIGHTS"
FD_NETWORKS = ("opennsfw",)


class OpenNSFWFeatures(nn.Module):
    """open_nsfw's 1024-d pooled feature as a :class:`FeatureExtractor` (reported as ``FD-opennsfw[@size]``)."""

    def __init__(self, size: int = 224, onnx_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if size < 32:
            raise ConfigError(f"fd_size {size} is too small for open_nsfw (it downsamples 32x): use at least 32")
        self.net = OpenNSFW(onnx_path, size=size)
        self.size = size
        self.name = "opennsfw" if size == INPUT_SIZE else f"opennsfw@{size}"

    def forward(self, images: Tensor) -> Tensor:
        return self.net.pooled(images)


def build_fd_extractor(name: str, size: int = 224) -> FeatureExtractor:
    """A Fréchet-distance feature network by name (``"opennsfw"``); ``size`` is its input side."""
    if name == "opennsfw":
        return OpenNSFWFeatures(size)
    raise ConfigError(f"unknown FD network {name!r} (available offline: {', '.join(FD_NETWORKS)}; "
                      "FID uses the Inception weights, see --inception-weights)")


def maybe_inception(path: str | os.PathLike[str] | None) -> tuple[InceptionFeatures | None, str]:
    """The real FID Inception if a path is given or ``$TEXTOK_INCEPTION_WEIGHTS`` is set, else (None, why).

    A path that is given but wrong is an error (the user asked for FID), never a silent skip.
    """
    if path is None and not os.environ.get(INCEPTION_ENV):
        return None, (f"no Inception weights (pass --inception-weights PATH to pt_inception-2015-12-05-6726825d.pth "
                      f"or set {INCEPTION_ENV})")
    return InceptionFeatures.from_weights(path), ""


def metric_name(extractor: object) -> str:
    """``FID`` for the Inception with real weights, else ``FD-<name>``."""
    name = getattr(extractor, "name", None)
    if not isinstance(name, str) or not name:
        raise TextokError(f"{type(extractor).__name__} has no 'name' attribute; feature extractors must name "
                          "their network so the metric can be reported as FD-<name>")
    if name == "inception" and getattr(extractor, "real_weights", False) is True:
        return "FID"
    return f"FD-{name}"


def quantize_uint8(images: Tensor) -> Tensor:
    """Round [-1, 1] images to the 256 levels of 8-bit files, as evaluators that read PNGs see them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _module_device(m: object) -> torch.device:
    if isinstance(m, nn.Module):
        for p in m.parameters():
            return p.device
        for b in m.buffers():
            return b.device
    return torch.device("cpu")


@torch.no_grad()
def compute_stats(extractor: FeatureExtractor, image_batches: Iterable[Tensor], progress: bool = True,
                  quantize: bool = False, total: int | None = None) -> FeatureStats:
    """Stream image batches through ``extractor`` into float64 :class:`FeatureStats`.

    ``image_batches`` yields (B, 3, H, W) tensors in [-1, 1] (or (images, labels) tuples, whose first item
    is used). ``quantize`` rounds to 8-bit levels first. ``total`` is the number of batches for tqdm.
    """
    name = metric_name(extractor)  # validates the name early
    stats = FeatureStats(feature=getattr(extractor, "name"))
    device = _module_device(extractor)
    if isinstance(extractor, nn.Module):
        extractor.eval()
    it: Iterable = image_batches
    if progress:
        from ..progress import progress_bar

        it = progress_bar(image_batches, desc=f"{name} features", unit="batch", total=total)
    for batch in it:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor) or batch.ndim != 4:
            raise TextokError(f"expected image batches (B, 3, H, W); got {type(batch).__name__} "
                              f"{tuple(batch.shape) if isinstance(batch, Tensor) else ''}")
        x = batch.to(device=device, dtype=torch.float32)
        if quantize:
            x = quantize_uint8(x)
        feats = extractor(x)
        if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
            raise TextokError(f"extractor {extractor.name!r} returned shape {tuple(feats.shape)}; expected "
                              f"({x.shape[0]}, D)")
        stats.update(feats)
    return stats


def frechet_distance_between(extractor: FeatureExtractor, batches_a: Iterable[Tensor],
                             reference: Iterable[Tensor] | GaussianStats, progress: bool = True,
                             quantize: bool = False) -> tuple[str, float]:
    """(metric name, value): FD between generated batches and reference batches or saved statistics."""
    a = compute_stats(extractor, batches_a, progress=progress, quantize=quantize).to_gaussian()
    b = reference if isinstance(reference, GaussianStats) else compute_stats(
        extractor, reference, progress=progress, quantize=quantize).to_gaussian()
    return metric_name(extractor), frechet_distance_stats(a, b)
