"""Evaluation metrics: Fréchet distances (FID / FD-<net>), Inception Score, PSNR, SSIM, CLIP score.

Only numbers computed with the real pytorch-fid Inception weights are called FID or IS; a distance in any
other feature space is reported as ``FD-<network>`` (see :func:`textok.eval.features.metric_name`).
"""

from .clip_score import ClipScoreAccumulator, ClipScorer
from .features import (
    FeatureExtractor,
    InceptionFeatures,
    compute_stats,
    frechet_distance_between,
    metric_name,
    quantize_uint8,
)
from .fid import FeatureStats, GaussianStats, frechet_distance, frechet_distance_stats, inception_score
from .image_metrics import pil_to_rgb, psnr, ssim, ssim_pm1, to_rgb

__all__ = [
    "ClipScoreAccumulator",
    "ClipScorer",
    "FeatureExtractor",
    "FeatureStats",
    "GaussianStats",
    "InceptionFeatures",
    "compute_stats",
    "frechet_distance",
    "frechet_distance_between",
    "frechet_distance_stats",
    "inception_score",
    "metric_name",
    "pil_to_rgb",
    "psnr",
    "quantize_uint8",
    "ssim",
    "ssim_pm1",
    "to_rgb",
]
