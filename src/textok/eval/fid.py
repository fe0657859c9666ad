"""Fréchet distance between Gaussians of features, streaming feature statistics, Inception Score.

The distance is computed exactly like pytorch-fid's ``calculate_frechet_distance`` (scipy ``sqrtm`` of
``sigma1 @ sigma2``; if that is not finite, retry with ``eps * I`` added to both covariances; a complex
result is accepted only when the imaginary part of its diagonal is within 1e-3 of zero). Statistics are
accumulated in float64 as a sum and a sum of outer products, so 50k images never sit in memory, and are
stored as ``.npz`` with keys ``mu`` and ``sigma`` (the pytorch-fid / ADM reference-batch format).

Fréchet distances from fewer images than feature dimensions have rank-deficient covariances; there
``Tr sqrt(S1 S2)`` is computed exactly from the singular values of the n1 x n2 cross-Gram matrix of the
centred features (:func:`fd_between`: the same value as ``sqrtm``, which is slow and unstable on singular
matrices).
"""

from __future__ import annotations

import dataclasses
import math
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


# ---- from streamed features: the exact low-rank route when there are few images ----------------------------
class FeatureSet(FeatureStats):
    """:class:`FeatureStats` that also keeps the raw features while there are no more of them than dims.

    Why: with n <= D the covariance has rank < D and the exact low-rank route of :func:`fd_between` is both
    faster and more accurate than ``sqrtm`` of a singular D x D matrix. Past D rows only the sums are kept.
    """

    def __init__(self, feature: str | None = None) -> None:
        super().__init__(feature)
        self._rows: list[np.ndarray] | None = []

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        x = features.detach().to("cpu", torch.float64).numpy() if isinstance(features, torch.Tensor) else \
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
    (the distance is symmetric); otherwise pytorch-fid's ``sqrtm`` computation (:func:`frechet_distance_stats`).
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
