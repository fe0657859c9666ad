"""KID against a direct float64 computation, the paired bootstrap against direct resampled computations, and the
per-image values and KID that ``evaluate_tokenizer`` keeps for them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from textok.data import CaptionedScenes
from textok.errors import TextokError
from textok.eval.bootstrap import (bootstrap_fd, bootstrap_kid, bootstrap_means, percentile_interval,
                                   resample_indices)
from textok.eval.fid import FeatureSet, fd_between, frechet_distance
from textok.eval.kid import kernel_distance, polynomial_mmd2
from textok.eval.reconstruction import evaluate_tokenizer, kid_metric_name


def _kid_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² with k(a, b) = (a·b / d + 1)^3, pair by pair in Python floats."""
    d = x.shape[1]
    k = lambda a, b: (sum(float(p) * float(q) for p, q in zip(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.5, 1.2, size=(7, 5))
    assert polynomial_mmd2(x, y) == pytest.approx(_kid_loops(x, y), rel=1e-12)
    mean, std = kernel_distance(x[:7], y)  # both sets within one subset: the full-sample estimate
    assert mean == pytest.approx(_kid_loops(x[:7], y), rel=1e-12) and std == 0.0
    # subsets: the mean over the same random subsets the references draw
    mean, std = kernel_distance(x, y, subset_size=4, subsets=5, seed=3)
    r = np.random.default_rng(3)
    want = [_kid_loops(x[r.choice(9, 4, replace=False)], y[r.choice(7, 4, replace=False)]) for _ in range(5)]
    assert mean == pytest.approx(np.mean(want), rel=1e-12) and std == pytest.approx(np.std(want), rel=1e-9)
    # float32 torch input is read as float64
    assert kernel_distance(torch.tensor(x[:7], dtype=torch.float32), y)[0] == pytest.approx(
        _kid_loops(x[:7].astype(np.float32).astype(np.float64), y), rel=1e-12)
    with pytest.raises(TextokError, match="at least 2"):
        polynomial_mmd2(x[:1], y)


def test_kid_is_unbiased_where_the_plug_in_estimate_is_not():
    rng = np.random.default_rng(1)
    unbiased, plug_in = [], []
    for _ in range(300):  # two samples of one distribution: the true MMD is 0
        x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        unbiased.append(polynomial_mmd2(x, y))
        k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
        plug_in.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    spread = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * spread
    assert np.mean(plug_in) > 10 * spread


def test_paired_bootstrap_means_and_intervals():
    rng = np.random.default_rng(2)
    a = rng.normal(20, 3, size=50)
    b = a + 0.1  # the same images, uniformly 0.1 better: the paired difference has no noise at all
    idx = resample_indices(50, 400, seed=5)
    reps = bootstrap_means({"a": a, "b": b}, idx)
    assert reps["a"][7] == pytest.approx(a[idx[7]].mean(), rel=1e-14)
    diff = reps["b"] - reps["a"]
    assert np.allclose(diff, 0.1, rtol=1e-9)
    lo, hi = percentile_interval(reps["a"])
    assert lo < a.mean() < hi and hi - lo > 0.5  # one model's mean is noisy over images
    assert percentile_interval(np.array([1.0, np.nan, 3.0]), level=1.0) == (1.0, 3.0)
    assert np.array_equal(idx, resample_indices(50, 400, seed=5))
    with pytest.raises(TextokError, match="same images"):
        bootstrap_means({"a": a, "b": b[:10]}, idx)
    with pytest.raises(TextokError, match="at least 2"):
        resample_indices(1, 10)


def test_bootstrap_fd_and_kid_are_the_metrics_of_the_resampled_images():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(12, 4))  # 12 > 4 dims: the sqrtm route; 12 < 16 below: the low-rank one
    recon = {"good": real + rng.normal(0, 0.1, size=real.shape), "bad": real * 0.5 + 1.0}
    idx = resample_indices(12, 3, seed=0)
    fds = bootstrap_fd(real, recon, idx)
    for r, rows in enumerate(idx):
        for k, v in recon.items():
            xa, xb = real[rows], v[rows]
            want = frechet_distance(xa.mean(0), np.cov(xa, rowvar=False), xb.mean(0), np.cov(xb, rowvar=False))
            assert fds[k][r] == pytest.approx(want, rel=1e-6, abs=1e-9)
    wide_real = rng.normal(size=(12, 16))
    wide = {"m": wide_real + 0.3}
    low = bootstrap_fd(wide_real, wide, idx)["m"]
    a, b = FeatureSet(), FeatureSet()
    a.update(wide_real[idx[1]])
    b.update(wide["m"][idx[1]])
    assert low[1] == pytest.approx(fd_between(a, b), rel=1e-12)
    # KID: a permutation is the full-sample estimate; with repeats, pairs of one source image are left out
    kids = bootstrap_kid(real, recon, np.stack([np.arange(12)[::-1], np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])]))
    assert kids["bad"][0] == pytest.approx(_kid_loops(real, recon["bad"]), rel=1e-12)
    rows = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    x, y = real[rows], recon["bad"][rows]
    k = lambda p, q: (p @ q / 4 + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(12) for j in range(12) if rows[i] != rows[j]]
    want = (sum(k(x[i], x[j]) for i, j in pairs) + sum(k(y[i], y[j]) for i, j in pairs)) / len(pairs) - 2 * np.mean(
        [k(p, q) for p in x for q in y])
    assert kids["bad"][1] == pytest.approx(want, rel=1e-12)
    assert np.all(kids["bad"] > kids["good"])


class _Darken(torch.nn.Module):
    def forward(self, x):
        return x * 0.8 - 0.1


class _Toy(torch.nn.Module):
    name = "toy6"

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


def test_evaluate_tokenizer_keeps_per_image_values_and_reports_kid():
    data = CaptionedScenes(16, "val", size=10)
    toy = _Toy()
    plain = evaluate_tokenizer(_Darken(), data, num=10, batch_size=4, fd_networks=(toy,), progress=False)
    res = evaluate_tokenizer(_Darken(), data, num=10, batch_size=4, fd_networks=(toy,), progress=False, kid=True,
                             per_image=True)
    assert "KID-toy6" not in plain and "per_image" not in plain
    assert {k: plain[k] for k in ("PSNR", "SSIM", "FD-toy6")} == {k: res[k] for k in ("PSNR", "SSIM", "FD-toy6")}
    assert len(res["per_image"]["PSNR"]) == 10
    assert res["per_image"]["PSNR"].mean() == pytest.approx(res["PSNR"], rel=1e-12)
    assert res["per_image"]["SSIM"].mean() == pytest.approx(res["SSIM"], rel=1e-12)
    originals, recons = res["features"]["FD-toy6"]
    assert originals.shape == recons.shape == (10, 6)
    assert res["KID-toy6"] == pytest.approx(_kid_loops(originals, recons), rel=1e-9)
    assert kid_metric_name("FD-opennsfw@64") == "KID-opennsfw@64" and kid_metric_name("rFID") == "rKID"
