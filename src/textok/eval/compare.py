"""Which way is better for a metric textok reports, and by how much one value beats another.

Why one place: the demos, the study and their reports all rank tokenizers by these metrics, and a table that
calls a worse FD "better" is wrong in a way nobody notices. A metric name may carry an input size after ``@``
(``FD-opennsfw@64``); the direction is that of the name before it.
"""

from __future__ import annotations

import math

from ..errors import TextokError

HIGHER_IS_BETTER = ("PSNR", "SSIM", "IS")
LOWER_IS_BETTER = ("FID", "rFID", "gFID", "LPIPS", "KID", "rKID")  # and every "FD-<network>", "KID-<network>"


def higher_is_better(metric: str) -> bool:
    """PSNR, SSIM and IS: higher is better; FID, rFID, gFID, FD-<network>, KID, KID-<network> and LPIPS: lower."""
    base = metric.split("@")[0]
    if base in HIGHER_IS_BETTER:
        return True
    if base in LOWER_IS_BETTER or base.startswith(("FD-", "KID-")):
        return False
    raise TextokError(f"metric {metric!r} has no known direction (higher: {', '.join(HIGHER_IS_BETTER)}; lower: "
                      f"{', '.join(LOWER_IS_BETTER)}, FD-<network>)")


def is_better(a: float, b: float, higher: bool) -> bool:
    """``a`` strictly better than ``b`` (ties and NaNs are not better)."""
    return a > b if higher else a < b


def relative_gain(value: float, base: float, higher: bool) -> float:
    """How much better ``value`` is than ``base``, as a fraction of ``base`` (positive = better)."""
    if base == 0 or not (math.isfinite(value) and math.isfinite(base)):
        return float("nan")
    return ((value - base) if higher else (base - value)) / abs(base)


__all__ = ["HIGHER_IS_BETTER", "LOWER_IS_BETTER", "higher_is_better", "is_better", "relative_gain"]
