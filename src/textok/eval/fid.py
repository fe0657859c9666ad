"""Fréchet distance between Gaussians of features, streaming feature statistics, Inception Score.

The distance is computed exactly like pytorch-fid's ``calculate_frechet_distance`` (scipy ``sqrtm`` of
``sigma1 @ sigma2``; if that is not finite, retry with ``eps * I`` added to both covariances; a complex
result is accepted only when the imaginary part of its diagonal is within 1e-3 of zero). Statistics are
accumulated in float64 as a sum and a sum of outer products, so 50k images never sit in memory, and are
stored as ``.npz`` with keys ``mu`` and ``sigma`` (the pytorch-fid / ADM reference-batch format).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from ..errors import TextokError
from ..io import atomic_file


def _as_numpy64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old scipy warns on near-singular input; we check finiteness
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)), with pytorch-fid's numerical safeguards."""
    mu1, mu2 = np.atleast_1d(_as_numpy64(mu1)), np.atleast_1d(_as_numpy64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_numpy64(sigma1)), np.atleast_2d(_as_numpy64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise TextokError(f"feature statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} dims): "
                          "compare statistics computed with the same feature network")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TextokError(f"Fréchet distance: sqrtm has an imaginary component of "
                              f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are degenerate (too few samples?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass
class GaussianStats:
    """Mean and covariance of a feature distribution (what a reference ``.npz`` holds)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None
    feature: str | None = None  # the feature network's name, when known

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``/``sigma`` (float64) plus our own metadata keys; pytorch-fid reads only mu/sigma."""
        extra: dict[str, np.ndarray] = {}
        if self.num_samples is not None:
            extra["num_samples"] = np.asarray(self.num_samples, dtype=np.int64)
        if self.feature is not None:
            extra["feature"] = np.asarray(self.feature)
        path = Path(path)
        if path.suffix != ".npz":  # what np.savez(path) does
            path = path.with_name(path.name + ".npz")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=np.asarray(self.mu, np.float64), sigma=np.asarray(self.sigma, np.float64), **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """Read ``mu``/``sigma`` from a pytorch-fid or ADM reference ``.npz`` (ADM's ``arr_0`` is ignored)."""
        p = Path(path)
        if not p.is_file():
            raise TextokError(f"statistics file not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as f:
                keys = set(f.files)
                if not {"mu", "sigma"} <= keys:
                    raise TextokError(f"{p} has no 'mu'/'sigma' arrays (keys: {sorted(keys)}); compute statistics "
                                      "from the images first (pytorch-fid/ADM reference batches hold mu and sigma)")
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                n = int(f["num_samples"]) if "num_samples" in keys else None
                feature = str(f["feature"]) if "feature" in keys else None
        except (ValueError, OSError) as e:
            raise TextokError(f"{p} is not a readable .npz statistics file ({e})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise TextokError(f"{p}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, n, feature)


def frechet_distance_stats(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance between two :class:`GaussianStats`."""
    if a.feature is not None and b.feature is not None and a.feature != b.feature:
        raise TextokError(f"statistics come from different feature networks ({a.feature!r} vs {b.feature!r})")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps=eps)


class FeatureStats:
    """Streaming mean/covariance of features: float64 sum and sum of outer products.

    Features are shifted by the first batch's mean before accumulating (the covariance does not change)
    so that ``E[xx^T] - mu mu^T`` does not lose precision when the mean is large. ``sigma`` uses ddof=1
    like ``np.cov``.
    """

    def __init__(self, feature: str | None = None) -> None:
        self.feature = feature
        self.num_samples = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a (B, D) batch of features."""
        x = _as_numpy64(features)
        if x.ndim != 2:
            raise TextokError(f"features must be (batch, dim); got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            d = x.shape[1]
            self._sum = np.zeros(d)
            self._outer = np.zeros((d, d))
        elif x.shape[1] != self._shift.shape[0]:
            raise TextokError(f"feature size changed from {self._shift.shape[0]} to {x.shape[1]}")
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._outer += xc.T @ xc
        self.num_samples += x.shape[0]

    def _need(self, n: int) -> None:
        if self.num_samples < n:
            raise TextokError(f"need at least {n} images to estimate feature statistics"
                              f"{' (a covariance)' if n > 1 else ''}; got {self.num_samples}")

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self._shift + self._sum / self.num_samples

    @property
    def sigma(self) -> np.ndarray:
        self._need(2)
        n = self.num_samples
        mean_c = self._sum / n
        return (self._outer - n * np.outer(mean_c, mean_c)) / (n - 1)

    def to_gaussian(self) -> GaussianStats:
        return GaussianStats(self.mu, self.sigma, self.num_samples, self.feature)

    def save(self, path: str | os.PathLike) -> None:
        self.to_gaussian().save(path)


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` contiguous chunks) from classifier logits.

    Same computation as the reference IS code (softmax, per split ``exp(E[KL(p(y|x) || p(y))])``, std with
    ddof=0). With the FID Inception the reference uses the fc output *without* bias
    (``InceptionOutput.logits_unbiased``). Log-probabilities come from ``log_softmax`` so saturated
    softmaxes do not produce ``0 * log 0`` NaNs.
    """
    x = torch.as_tensor(_as_numpy64(logits))
    if x.ndim != 2:
        raise TextokError(f"logits must be (N, classes); got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < splits:
        raise TextokError(f"Inception Score needs at least {splits} images for {splits} splits; got {n}")
    logp = torch.log_softmax(x, dim=1)
    p = logp.exp()
    scores = []
    for k in range(splits):
        lo, hi = k * n // splits, (k + 1) * n // splits
        part_p, part_logp = p[lo:hi], logp[lo:hi]
        log_py = torch.log(part_p.mean(dim=0))
        terms = torch.where(part_p > 0, part_p * (part_logp - log_py), torch.zeros_like(part_p))
        kl = terms.sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std())
