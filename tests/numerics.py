"""Tolerances sized to the computation, so that a comparison holds on any CPU and thread count.

Two routes to the same maths (a batch of 6 vs two batches of 3, padded vs trimmed text, our network vs a
reference implementation) differ by rounding, and how much depends on the kernels the CPU dispatches to
(AVX-512, AVX2, none) and on how a reduction is split across threads. Those differences are a few units
of ``eps`` relative to the magnitudes involved; a logic error (a wrong channel guided, a padded token
attended to) is of the order of the values themselves. So every such comparison allows ``sqrt(eps)`` of
the reference's largest magnitude: far above rounding, far below any bug. Tests that compare different
routes run in float64 where they can, which makes the gap between the two wider still.

Same computation, same shapes, same process (determinism, save/load, exact resume) stays ``torch.equal``.
"""

from __future__ import annotations

import numpy as np
import torch


def rounding_tolerance(dtype: torch.dtype | np.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: the relative tolerance for two routes to the same result."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) ** 0.5
    return float(np.finfo(dtype).eps) ** 0.5


def assert_same_maths(actual, expected, dtype: torch.dtype | np.dtype | None = None, what: str = "") -> None:
    """``max|actual - expected| <= sqrt(eps) * max|expected|`` (norm-wise, so near-zero entries do not fail).

    ``dtype`` is the precision the two routes computed in (default: the lower of the two inputs').
    """
    a = torch.as_tensor(np.asarray(actual)) if not isinstance(actual, torch.Tensor) else actual
    e = torch.as_tensor(np.asarray(expected)) if not isinstance(expected, torch.Tensor) else expected
    assert a.shape == e.shape, f"{what}: shapes {tuple(a.shape)} != {tuple(e.shape)}"
    if dtype is None:
        dtype = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(e.dtype).eps else e.dtype
    a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
    assert torch.isfinite(a64).all() and torch.isfinite(e64).all(), f"{what}: non-finite values"
    scale = float(e64.abs().max()) if e64.numel() else 0.0
    allowed = rounding_tolerance(dtype) * max(scale, torch.finfo(torch.float64).tiny)
    diff = float((a64 - e64).abs().max()) if e64.numel() else 0.0
    assert diff <= allowed, (f"{what or 'values'} differ by {diff:.3g}, more than rounding allows "
                             f"({allowed:.3g} = sqrt(eps of {dtype}) x max|expected| {scale:.3g})")


def fd_tolerance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """How far a sqrtm-based Fréchet distance between two feature sets can be from the exact value.

    ``sqrtm(S_a S_b)`` of a rank-deficient product (fewer images than dimensions) is accurate only to
    ``sqrt(eps * ||S_a S_b||)`` per (zero) eigenvalue, so a reference computed that way carries that error.
    """
    ca, cb = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    return features_a.shape[1] * float(np.sqrt(np.finfo(np.float64).eps * np.linalg.norm(ca @ cb, 2)))
