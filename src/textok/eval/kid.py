"""Kernel Inception Distance: the unbiased squared MMD between two feature sets with the cubic polynomial kernel.

Why beside the Fréchet distance: FD from a few hundred images is biased (it grows as the sample shrinks) and
its bias depends on the distributions compared, so two FDs from small samples can rank wrongly; the KID
estimator is unbiased at any sample size (Bińkowski et al. 2018, "Demystifying MMD GANs").

The standard definition (as in the reference implementations of that paper, torch-fidelity and clean-fid):
``k(x, y) = (x·y / d + 1)^3`` for d-dimensional features, and per subset of ``m`` images from each side

    MMD²_u = [sum_{i≠j} k(x_i, x_j) + sum_{i≠j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m²

averaged over ``subsets`` random subsets of ``subset_size`` images (1000 in the references; capped at the
smaller set, where every subset holds all images and the average is the full-sample estimate). Computed in
float64. It can be slightly negative when the two distributions are equal.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import TextokError

SUBSET_SIZE = 1000
SUBSETS = 100


def _as_numpy64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """The unbiased squared MMD between all of ``x`` (m, d) and all of ``y`` (n, d) with the kernel
    ``(x·y / d + coef0)^degree``."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise TextokError(f"KID needs at least 2 images per side; got {m} and {n}")
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_distance(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, *,
                    subset_size: int = SUBSET_SIZE, subsets: int = SUBSETS, seed: int = 0) -> tuple[float, float]:
    """KID between two feature sets (N, d): the mean and standard deviation of the unbiased MMD² over random
    subsets (see the module doc). With both sets no larger than ``subset_size`` it is the one full-sample
    estimate (standard deviation 0)."""
    x, y = _as_numpy64(real), _as_numpy64(fake)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise TextokError(f"KID compares (N, d) features of one network; got shapes {x.shape} and {y.shape}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise TextokError(f"KID needs at least 2 images per side; got {x.shape[0]} and {y.shape[0]}")
    if m == x.shape[0] == y.shape[0]:
        return polynomial_mmd2(x, y), 0.0
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


__all__ = ["SUBSETS", "SUBSET_SIZE", "kernel_distance", "polynomial_mmd2"]
