"""Reference statistics computed once: ``textok eval generation`` keeps the reference side's features in a file
keyed by what they were computed from, so scoring new samples against the same reference reads that file.

Why: the reference is the slow side (thousands of images through the feature network, where the samples are
often a few dozen), and it does not change between evaluations. The key is the reference data's identity
(for a file its resolved path, size and modification time; for a folder the same for every file under it; for
the embedded scenes their split, seed and generator source), the split and number of images, the feature
network (its name holds the input size) and the image side. A changed reference has another key, so stale
statistics are never read.

A cache file is a statistics ``.npz`` like :meth:`GaussianStats.save` writes (``mu``, ``sigma``,
``num_samples``, ``feature``: pytorch-fid and ``--ref FILE`` read it) plus ``identity`` (the key as JSON) and,
when there were no more images than feature dimensions, the raw ``features`` (the exact low-rank Fréchet
route and a kernel distance need them), so a cached run gives the same number as the run that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.factory import SCENES, resolve_source
from ..data import scenes as scenes_module
from ..errors import TextokError
from ..io import atomic_file
from ..text.store import default_cache_dir
from .fid import FeatureSet, FeatureStats, GaussianStats

FORMAT = "textok-ref-stats-1"


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def data_identity(ref: str, *, split: str, seed: int = 0) -> dict[str, Any]:
    """What reference data ``ref`` ('scenes', an images ``.npz``, a folder, tar or shard directory) is, cheaply:
    paths with sizes and modification times (no content is read)."""
    if ref == SCENES:
        source = Path(scenes_module.__file__).read_bytes()
        return {"data": SCENES, "split": split, "seed": seed, "generator": hashlib.sha256(source).hexdigest()[:16]}
    path = Path(resolve_source(ref)).resolve()
    if path.is_file():
        return {"data": str(path), "split": split, "file": _file_identity(path)}
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(json.dumps([str(f.relative_to(path)), *_file_identity(f)]).encode())
    return {"data": str(path), "split": split, "tree": digest.hexdigest()}


def cache_identity(data: dict[str, Any], *, feature: str, image_size: int, ref_num: int | None) -> dict[str, Any]:
    """The whole key: the data, how many of its images, and the network and side their features come from."""
    return {"format": FORMAT, **data, "ref_num": ref_num or 0, "feature": feature, "image_size": image_size}


def default_path(identity: dict[str, Any]) -> Path:
    """``$TEXTOK_CACHE/ref-stats/<hash of the identity>.npz`` (``~/.cache/textok`` without the variable)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return default_cache_dir() / "ref-stats" / f"{digest}.npz"


def stored_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The identity a cache file was written for; None when the file holds statistics from elsewhere."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["identity"])) if "identity" in f.files else None
    except (ValueError, OSError) as err:
        raise TextokError(f"{path} is not a readable .npz statistics file ({err})") from None


def load(path: str | os.PathLike, identity: dict[str, Any]) -> FeatureSet | GaussianStats | None:
    """The statistics in ``path`` when it exists and was written for ``identity``, else None."""
    if not Path(path).is_file() or stored_identity(path) != identity:
        return None
    with np.load(path, allow_pickle=False) as f:
        features = f["features"] if "features" in f.files else None
    if features is None:
        return GaussianStats.load(path)
    ref = FeatureSet(identity["feature"])  # the raw features give the same Fréchet route as when they were computed
    ref.update(features)
    return ref


def save(path: str | os.PathLike, ref: FeatureStats, identity: dict[str, Any]) -> None:
    """Write ``ref`` with its identity, atomically (a reader never sees half a file)."""
    stats = ref.to_gaussian()
    extra: dict[str, np.ndarray] = {"identity": np.asarray(json.dumps(identity, sort_keys=True))}
    features = ref.features if isinstance(ref, FeatureSet) else None
    if features is not None:
        extra["features"] = features
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_samples=np.asarray(stats.num_samples, dtype=np.int64),
                 feature=np.asarray(stats.feature), **extra)


__all__ = ["cache_identity", "data_identity", "default_path", "load", "save", "stored_identity"]
