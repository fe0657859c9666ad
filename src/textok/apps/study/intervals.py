"""The study's noise estimates: paired bootstrap replicates of every cell's metrics over the held-out images, and
intervals on what each text cell loses with a swapped caption.

Every cell is evaluated on the same images, and one set of resamplings of those images is applied to all cells
(:mod:`textok.eval.bootstrap`), so a difference between two cells, a relative gain or an order has an interval
that holds only the noise of choosing these images. Training noise (another seed) is not in it: that is what
replicate studies (``--replicate``) add.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import TextokError
from ...eval.bootstrap import bootstrap_fd, bootstrap_kid, bootstrap_means, resample_indices
from ...eval.reconstruction import kid_metric_name
from .cells import PER_IMAGE, cell_changes, cell_name, load_per_image, numeric
from .claims import compare

BOOTSTRAP_SEED = 0
FD_REPS = 50  # a Fréchet distance per resampling costs an SVD (0.2 s at 819 images): the first 50 resamplings
PER_IMAGE_METRICS = ("PSNR", "SSIM")
REPLICATE_MAY_DIFFER = ("seed", "init_from", "data.source", "data.captions_file", "data.caption_bank")
SWAPS = {"next": "next image's caption", "other": "another class's caption"}


def load_cells(out: Path, tokens, modes) -> dict[str, dict[str, np.ndarray]] | None:
    """Every cell's per-image arrays, or None when a cell has none (evaluated before they were kept)."""
    arrays = {}
    for n in tokens:
        for m in modes:
            a = load_per_image(out / "cells" / cell_name(n, m) / PER_IMAGE)
            if a is None:
                return None
            arrays[cell_name(n, m)] = a
    return arrays


def replicates(arrays: dict[str, dict[str, np.ndarray]], tokens, modes, metrics, reps: int,
               seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """``[metric][mode][N]`` -> the metric of that cell over ``reps`` shared resamplings of the images (PSNR, SSIM,
    every Fréchet distance whose features were kept — over the first ``FD_REPS`` of them — and its KID)."""
    first = next(iter(arrays.values()))
    n_images = len(first["PSNR"])
    idx = resample_indices(n_images, reps, seed)
    names = {(n, m): cell_name(n, m) for n in tokens for m in modes}
    out: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for metric in metrics:
        if metric in PER_IMAGE_METRICS and all(metric in a for a in arrays.values()):
            values = bootstrap_means({k: arrays[k][metric] for k in names.values()}, idx)
        elif all(f"reconstructions/{metric}" in a for a in arrays.values()):
            real = first[f"originals/{metric}"]
            values = bootstrap_fd(real, {k: arrays[k][f"reconstructions/{metric}"] for k in names.values()},
                                  idx[:FD_REPS])
        else:
            fd = next((f for f in first if f.startswith("reconstructions/")
                       and kid_metric_name(f.split("/", 1)[1]) == metric), None)
            if fd is None:
                continue
            fd_metric = fd.split("/", 1)[1]
            real = first[f"originals/{fd_metric}"]
            values = bootstrap_kid(real, {k: arrays[k][fd] for k in names.values()}, idx)
        out[metric] = {m: {n: values[names[(n, m)]] for n in tokens} for m in modes}
    return out


def seed_values(dirs, configs: dict) -> dict[str, dict[int, dict[str, list[float]]]]:
    """``[mode][N][metric]`` -> the values of the same cells in finished replicate studies ``dirs`` (each trained
    with another seed and nothing else changed; anything else is an error, never silently mixed)."""
    values: dict[str, dict[int, dict[str, list[float]]]] = {}
    for d in dirs:
        root = Path(d)
        for (n, mode), cfg in configs.items():
            name = cell_name(n, mode)
            path = root / "cells" / name / "eval.json"
            if not path.is_file():
                raise TextokError(f"--replicate {d}: it has no evaluated cell {name} ({path} is missing); run that "
                                  "study with the same --tokens and --modes and another --seed first")
            record = json.loads(path.read_text())
            changed = [c for c in cell_changes(record["train_config"], cfg.to_dict())
                       if c.split(":")[0] not in REPLICATE_MAY_DIFFER]
            if changed:
                raise TextokError(f"--replicate {d}: cell {name} differs in more than the seed ({'; '.join(changed)})")
            if record["train_config"].get("seed") == cfg.seed:
                raise TextokError(f"--replicate {d}: cell {name} was trained with the same seed ({cfg.seed}); a "
                                  "replicate needs another --seed")
            per = values.setdefault(mode, {}).setdefault(n, {})
            for metric, v in numeric(record["metrics"]).items():
                per.setdefault(metric, []).append(v)
    return values


def swap_costs(arrays: dict[str, dict[str, np.ndarray]], reps: int, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Per text cell, metric and swap: the right caption's value minus the swapped one's, with its paired bootstrap
    interval and whether the right caption is decidedly better (``compare``'s outcome)."""
    result: dict[str, Any] = {}
    for cell, a in arrays.items():
        for metric in PER_IMAGE_METRICS:
            for swap in SWAPS:
                key = f"{metric}/{swap}"
                if metric not in a or key not in a:
                    continue
                idx = resample_indices(len(a[metric]), reps, seed)
                r = bootstrap_means({"right": a[metric], "swapped": a[key]}, idx)
                o = compare(float(a[metric].mean()), float(a[key].mean()), True, r["right"], r["swapped"])
                result.setdefault(cell, {}).setdefault(metric, {})[swap] = o
    return result


__all__ = ["BOOTSTRAP_SEED", "FD_REPS", "SWAPS", "load_cells", "replicates", "seed_values", "swap_costs"]
