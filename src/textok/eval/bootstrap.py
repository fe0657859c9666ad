"""Paired bootstrap replicates of evaluation metrics, for intervals on differences between models.

Why paired: every model of a comparison is scored on the same images, so one resampling of the image indices
is applied to all of them at once; the spread of a difference then holds only the noise that does not cancel
between the models (an image hard for both moves both). Each function returns, per model, the metric over
``reps`` resamplings (with replacement) of the images; any derived quantity (a difference, a relative gain,
an order) computed replicate by replicate has as its interval the percentiles of those values
(:func:`percentile_interval`).

* per-image metrics (PSNR, SSIM): the mean over the resampled images;
* Fréchet distance: originals vs reconstructions, both resampled with the same indices, exactly as
  :func:`textok.eval.fid.fd_between` computes it (a resample repeats images, which shrinks its effective size
  and raises every FD a little; differences between models under one resample are what the interval is for);
* KID: the unbiased MMD² of :mod:`textok.eval.kid` on the resampled images, from kernel matrices computed once
  (pairs of the same source image are excluded, as the estimator excludes each image's pair with itself).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import TextokError
from .fid import FeatureSet, fd_between

LEVEL = 0.95


def resample_indices(n: int, reps: int, seed: int = 0) -> np.ndarray:
    """``reps`` resamplings with replacement of ``n`` indices, (reps, n); deterministic for a seed."""
    if n < 2:
        raise TextokError(f"a bootstrap needs at least 2 images; got {n}")
    if reps < 1:
        raise TextokError(f"bootstrap replicates must be at least 1; got {reps}")
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def _same_length(values: Mapping[str, np.ndarray]) -> int:
    sizes = {k: len(v) for k, v in values.items()}
    if len(set(sizes.values())) != 1:
        raise TextokError(f"a paired bootstrap needs every model scored on the same images; got sizes {sizes}")
    return next(iter(sizes.values()))


def bootstrap_means(values: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per model, the mean of its per-image values over each resampling (rows of ``indices``)."""
    n = _same_length(values)
    if indices.max(initial=0) >= n:
        raise TextokError(f"resampled indices reach {indices.max()} for {n} images")
    return {k: np.asarray(v, np.float64)[indices].mean(axis=1) for k, v in values.items()}


def _fd(real: np.ndarray, recon: np.ndarray) -> float:
    a, b = FeatureSet(), FeatureSet()
    a.update(real)
    b.update(recon)
    return fd_between(a, b)


def bootstrap_fd(real: np.ndarray, recons: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per model, the Fréchet distance between the resampled originals' and its reconstructions' features."""
    n = _same_length({"originals": real, **recons})
    if indices.max(initial=0) >= n:
        raise TextokError(f"resampled indices reach {indices.max()} for {n} images")
    x = np.asarray(real, np.float64)
    return {k: np.array([_fd(x[idx], np.asarray(v, np.float64)[idx]) for idx in indices]) for k, v in recons.items()}


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, idx: np.ndarray) -> float:
    same = idx[:, None] == idx[None, :]  # pairs of one source image, repeated by the resample
    n = idx.shape[0]
    off = ~same
    sub_xx, sub_yy = kxx[np.ix_(idx, idx)], kyy[np.ix_(idx, idx)]
    pairs = off.sum()
    return float(sub_xx[off].sum() / pairs + sub_yy[off].sum() / pairs - 2.0 * kxy[np.ix_(idx, idx)].sum() / (n * n))


def bootstrap_kid(real: np.ndarray, recons: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Per model, the unbiased KID (cubic polynomial kernel) between the resampled originals and reconstructions."""
    n = _same_length({"originals": real, **recons})
    if indices.max(initial=0) >= n:
        raise TextokError(f"resampled indices reach {indices.max()} for {n} images")
    x = np.asarray(real, np.float64)
    kxx = _kernel(x, x)
    out = {}
    for k, v in recons.items():
        y = np.asarray(v, np.float64)
        kyy, kxy = _kernel(y, y), _kernel(x, y)
        out[k] = np.array([_mmd2_from_kernels(kxx, kyy, kxy, idx) for idx in indices])
    return out


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values (NaNs ignored)."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(s, [tail, 100 - tail])
    return float(lo), float(hi)


__all__ = ["LEVEL", "bootstrap_fd", "bootstrap_kid", "bootstrap_means", "percentile_interval", "resample_indices"]
