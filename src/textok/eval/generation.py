"""Quality of generated samples against a reference: gFID + Inception Score, or FD-opennsfw offline.

Why this shape: generators write samples as a ``.npz`` (key ``arr_0``, uint8 NHWC, the ADM/DiT convention)
or as image files, and references come as saved statistics (pytorch-fid / ADM ``mu``/``sigma`` files, or
ours) or as a dataset. Everything streams: samples are read batch by batch (the npz member is read
incrementally, never loaded whole), features go into float64 sums.

* With the real pytorch-fid Inception weights (argument or ``$TEXTOK_INCEPTION_WEIGHTS``): ``gFID`` and
  ``IS`` (10 splits, logits without the fc bias, like the reference code).
* Without them: ``FD-opennsfw`` (open_nsfw's pooled features; ``@size`` in the name when the input side is
  not 224). It is not FID and is not compared with paper numbers; IS is not reported.

Samples and reference images are rounded to 8-bit levels (float inputs) and converted to RGB (grayscale,
gray+alpha and RGBA: alpha dropped, like pytorch-fid's ``convert("RGB")``). Image files of other sizes than
the first one (or ``image_size``) are centre-cropped to a square and resized bicubically.
"""

from __future__ import annotations

import itertools
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.folder import collate
from ..data.images import IMAGE_SUFFIXES, center_crop_resize
from ..data.shards import ShardSet
from ..errors import TextokError
from ..eta import Eta
from . import ref_cache
from .features import DEFAULT_FD_SIZE, OpenNSFWFeatures, maybe_inception, quantize_uint8
from .fid import FeatureSet, FeatureStats, GaussianStats, fd_between, inception_score
from .image_metrics import pil_to_rgb, to_rgb

SampleSource = Tensor | np.ndarray | str | os.PathLike | Iterable[Tensor]


# ---- reading samples -------------------------------------------------------------------------------------
def _nchw_pm1(arr: np.ndarray | Tensor, layout: str = "auto") -> Tensor:
    """uint8 (or float in [-1, 1]) images in NHWC, NCHW or NHW layout -> float (B, 3, H, W) in [-1, 1].

    ``layout="auto"`` takes channels-last when the last axis (and not axis 1) has 1-4 entries.
    """
    x = torch.as_tensor(arr)
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[:, None]
        layout = "nchw"
    if x.ndim != 4:
        raise TextokError(f"expected a batch of images (N, H, W, C) or (N, C, H, W); got shape {tuple(x.shape)}")
    if layout == "nhwc" or (layout == "auto" and x.shape[-1] in (1, 2, 3, 4) and x.shape[1] not in (1, 2, 3, 4)):
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] not in (1, 2, 3, 4):
        raise TextokError(f"cannot find the channel axis of images of shape {tuple(x.shape)}: expected 1, 3 or "
                          "4 channels first or last")
    x = to_rgb(x, channel_axis=1)
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0)
    if torch.is_floating_point(x):
        if not torch.isfinite(x).all():
            raise TextokError(f"the samples hold {int((~torch.isfinite(x)).sum())} NaN or inf values (a generator that "
                              "diverged, or a sampler that overflowed): sample again from a finite checkpoint, in "
                              "fp32 (--precision fp32)")
        return quantize_uint8(x.float())
    raise TextokError(f"images must be uint8 (0..255) or float in [-1, 1]; got {x.dtype}")


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    if x.shape[-2] != x.shape[-1]:
        s = min(x.shape[-2:])
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        x = x[..., top:top + s, left:left + s]
    shrink = x.shape[-1] > size
    return quantize_uint8(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                        antialias=shrink).clamp(-1, 1))


def _npz_member(path: Path) -> tuple[zipfile.ZipFile, str]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise TextokError(f"{path} is not a readable .npz file ({err})") from None
    names = zf.namelist()
    if "arr_0.npy" not in names:
        zf.close()
        keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
        raise TextokError(f"{path} has no 'arr_0' array of images (keys: {keys}); samples are saved as "
                          "np.savez(path, uint8_images_NHWC) like ADM/DiT's sample scripts")
    return zf, "arr_0.npy"


def _npz_header(f: Any, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            return fmt.read_array_header_1_0(f)
        return fmt.read_array_header_2_0(f)
    except ValueError as err:
        raise TextokError(f"{path}: arr_0 is not a valid .npy array ({err})") from None


def npz_info(path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """(number of images, shape of one image) of a samples ``.npz``, from its header only."""
    p = Path(path)
    zf, member = _npz_member(p)
    with zf, zf.open(member) as f:
        shape, _, _ = _npz_header(f, p)
    if len(shape) < 3:
        raise TextokError(f"{p}: arr_0 has shape {shape}, not a batch of images")
    return shape[0], tuple(shape[1:])


def iter_npz(path: str | os.PathLike, batch_size: int = 50, limit: int | None = None,
             image_size: int | None = None) -> Iterator[Tensor]:
    """Stream ``arr_0`` of a ``.npz`` as (B, 3, H, W) batches in [-1, 1], reading ``batch_size`` images at a time."""
    p = Path(path)
    zf, member = _npz_member(p)
    with zf, zf.open(member) as f:
        shape, fortran, dtype = _npz_header(f, p)
        if len(shape) not in (3, 4):
            raise TextokError(f"{p}: arr_0 has shape {shape}; expected images (N, H, W, C)")
        if dtype != np.uint8 and dtype.kind != "f":
            raise TextokError(f"{p}: arr_0 is {dtype}; expected uint8 images (or float in [-1, 1])")
        total = shape[0] if limit is None else min(shape[0], limit)
        layout = "nhwc" if len(shape) == 4 and shape[-1] in (1, 2, 3, 4) else "auto"  # ADM/DiT write NHWC
        if fortran:  # rare: no streaming layout, load it whole
            arr = np.load(p, allow_pickle=False)["arr_0"]
            for s in range(0, total, batch_size):
                yield _resize(_nchw_pm1(np.ascontiguousarray(arr[s:s + batch_size]), layout), image_size)
            return
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for s in range(0, total, batch_size):
            count = min(batch_size, total - s)
            buf = f.read(count * per_image)
            if len(buf) != count * per_image:
                raise TextokError(f"{p}: arr_0 is truncated (expected {shape[0]} images)")
            batch = np.frombuffer(buf, dtype=dtype).reshape(count, *shape[1:])
            yield _resize(_nchw_pm1(batch.copy(), layout), image_size)


def image_files(directory: str | os.PathLike) -> list[Path]:
    """Image files under ``directory`` (recursively), in sorted order."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TextokError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def _read_rgb(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise TextokError(f"sample image {path} cannot be decoded ({type(err).__name__}); remove or regenerate it") from None


def iter_image_dir(directory: str | os.PathLike, batch_size: int = 50, limit: int | None = None,
                   image_size: int | None = None) -> Iterator[Tensor]:
    """Images of a folder as (B, 3, S, S) batches in [-1, 1]; S = ``image_size`` or the first image's side.

    Any mode becomes RGB; images of another size are centre-cropped to a square and resized (bicubic).
    """
    files = image_files(directory)[:limit]
    size = image_size
    for s in range(0, len(files), batch_size):
        batch = []
        for path in files[s:s + batch_size]:
            img = _read_rgb(path)
            if size is None:
                size = min(img.size)
            if img.size != (size, size):
                img = center_crop_resize(img, size)
            batch.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
        yield torch.stack(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def iter_samples(samples: SampleSource, batch_size: int = 50, limit: int | None = None,
                 image_size: int | None = None) -> Iterator[Tensor]:
    """Any sample source -> (B, 3, H, W) float batches in [-1, 1] (8-bit levels).

    Sources: a tensor/array of images (uint8 NHWC/NCHW, or float NCHW in [-1, 1]); a ``.npz`` path
    (``arr_0``); a folder of images; or an iterable of float (B, 3, H, W) batches in [-1, 1].
    """
    if batch_size < 1:
        raise TextokError(f"batch_size must be at least 1; got {batch_size}")
    if isinstance(samples, (str, os.PathLike)):
        p = Path(samples)
        if p.is_dir():
            yield from iter_image_dir(p, batch_size, limit, image_size)
        elif p.is_file() and p.suffix == ".npz":
            yield from iter_npz(p, batch_size, limit, image_size)
        else:
            raise TextokError(f"samples {p} are neither a .npz file (arr_0 = uint8 NHWC images) nor a folder of images")
        return
    if isinstance(samples, (Tensor, np.ndarray)):
        total = samples.shape[0] if limit is None else min(samples.shape[0], limit)
        for s in range(0, total, batch_size):
            yield _resize(_nchw_pm1(samples[s:min(s + batch_size, total)]), image_size)
        return
    seen = 0
    for batch in samples:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if limit is not None and seen >= limit:
            return
        if limit is not None:
            batch = batch[: limit - seen]
        seen += batch.shape[0]
        yield _resize(_nchw_pm1(batch), image_size)


def peek_image_size(samples: SampleSource) -> int:
    """The side of the (first) sample image, reading as little as possible."""
    if isinstance(samples, (str, os.PathLike)):
        p = Path(samples)
        if p.is_file() and p.suffix == ".npz":
            _, shape = npz_info(p)  # (H, W), (H, W, C) as written by ADM/DiT, or (C, H, W)
            hw = shape[1:] if len(shape) == 3 and shape[-1] not in (1, 2, 3, 4) else shape[:2]
            return int(min(hw))
        if p.is_dir():
            return int(min(_read_rgb(image_files(p)[0]).size))
    first = next(iter_samples(samples, batch_size=1, limit=1))
    return int(first.shape[-1])


# ---- reference --------------------------------------------------------------------------------------------
def is_stats_file(path: str | os.PathLike) -> bool:
    """True for a ``.npz`` holding ``mu`` and ``sigma`` (pytorch-fid, ADM reference batches, ours)."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return {"mu.npy", "sigma.npy"} <= names


def _dataset_batches(dataset: Any, batch_size: int, limit: int | None) -> Iterator[Tensor]:
    total = len(dataset) if limit is None else min(len(dataset), limit)
    if isinstance(dataset, ShardSet):  # streamed front to back (a shard set is never indexed)
        stream = itertools.islice(dataset.samples(), total)
        groups: Iterable[list] = iter(lambda: list(itertools.islice(stream, batch_size)), [])
    else:
        groups = ([dataset[i] for i in range(s, min(s + batch_size, total))] for s in range(0, total, batch_size))
    for group in groups:
        batch = collate(group)
        if batch["image"].numel():
            yield quantize_uint8(batch["image"])


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, (torch.utils.data.Dataset, ShardSet))


# ---- the evaluation ---------------------------------------------------------------------------------------
class _Features:
    """The one feature network of a run: real Inception (gFID + IS logits) or open_nsfw (FD)."""

    def __init__(self, inception_weights: str | None, fd_size: int, device: torch.device) -> None:
        self.inception, self.why_no_inception = maybe_inception(inception_weights)
        if self.inception is not None:
            self.net = self.inception.to(device).eval()
            self.metric, self.feature = "gFID", "inception"
        else:
            self.net = OpenNSFWFeatures(fd_size).to(device).eval()
            self.metric, self.feature = f"FD-{self.net.name}", self.net.name
        self.device = device

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = x.to(self.device, torch.float32)
        if self.inception is not None:
            out = self.inception.net(x)
            return out.pool, out.logits_unbiased
        return self.net(x), None

    def stream(self, batches: Iterable[Tensor], keep_logits: bool = False, progress: bool = False,
               desc: str = "features", total: int | None = None) -> tuple[FeatureSet, np.ndarray | None, int]:
        """(features, logits or None, image side of the first batch)."""
        stats = FeatureSet(self.feature)
        logits: list[np.ndarray] = []
        side = 0
        it: Iterable[Tensor] = batches
        if progress:
            from ..progress import progress_bar

            it = progress_bar(batches, desc=desc, unit="batch", total=total)
        eta = Eta(total, f"eval generation, {desc}", "batches", write=getattr(it, "write", None)) if total else None
        for x in it:
            if eta is not None:
                eta.step()
            side = side or int(x.shape[-1])
            feats, lg = self(x)
            stats.update(feats)
            if keep_logits and lg is not None:
                logits.append(lg.float().cpu().numpy())
        return stats, (np.concatenate(logits) if logits else None), side


def _check_reference(ref: GaussianStats, feature: str, metric: str, source: str) -> None:
    if ref.feature is None and feature != "inception":
        raise TextokError(f"reference statistics {source} name no feature network, so they are Inception "
                          f"statistics (pytorch-fid/ADM); they cannot give {metric}: pass --inception-weights to "
                          "compute gFID, or give reference images/a dataset instead")
    if ref.feature is not None and ref.feature != feature:
        raise TextokError(f"reference statistics {source} were computed with {ref.feature!r} features, this run "
                          f"uses {feature!r}: recompute them with the same network and input size")


def _read_cached_reference(path: Path, identity: dict[str, Any], explicit: bool) -> FeatureSet | GaussianStats | None:
    """The statistics cached in ``path`` for ``identity``; None (after saying why, when a file is there) otherwise."""
    if not path.is_file():
        return None
    if explicit and ref_cache.stored_identity(path) is None:
        raise TextokError(f"--ref-stats {path} holds statistics that --ref-stats did not write (they name no "
                          "reference data): pass it as --ref, or give --ref-stats a new file")
    cached = ref_cache.load(path, identity)
    if cached is None:
        print(f"the reference statistics in {path} are of other reference data or settings: recomputing them")
    return cached


def evaluate_samples(samples: SampleSource, reference: Any, *, num: int | None = None, ref_num: int | None = None,
                     batch_size: int = 50, device: str | torch.device = "cpu", inception_weights: str | None = None,
                     fd_size: int = DEFAULT_FD_SIZE, image_size: int | None = None, is_splits: int = 10,
                     save_ref_stats: str | os.PathLike | None = None, progress: bool = True,
                     ref_identity: dict[str, Any] | None = None, ref_stats_file: str | os.PathLike | None = None,
                     ref_cache_dir: bool = False) -> dict[str, Any]:
    """Sample quality: ``gFID`` + ``IS`` with the real Inception weights, else ``FD-opennsfw[@size]``.

    ``samples``: see :func:`iter_samples` (``num`` limits them). ``reference``: a statistics ``.npz``
    (``mu``/``sigma``) or :class:`GaussianStats`; or reference images: a dataset (items with ``"image"``,
    first ``ref_num``), a ``.npz`` of images, a folder, a tensor or an iterable of batches. Reference images
    are resized to the samples' side. ``save_ref_stats`` writes the reference statistics computed from
    images (mu, sigma, feature, num_samples) for later runs.

    Reference statistics computed once (:mod:`.ref_cache`): with ``ref_identity`` (what the reference images are,
    :func:`ref_cache.data_identity`) they are read from, or else written to, ``ref_stats_file``, or with
    ``ref_cache_dir`` a file in the user's cache named by the identity, feature network, side and ``ref_num``.
    """
    device = torch.device(device)
    feats = _Features(inception_weights, fd_size, device)
    result: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    if feats.inception is None:
        skipped["gFID"] = skipped["IS"] = feats.why_no_inception
        notes[feats.metric] = ("Fréchet distance (samples vs reference) in open_nsfw pooled features at "
                               f"{fd_size} px input; not FID, not comparable with published FID numbers")
    else:
        notes["gFID"] = "FID (pytorch-fid Inception-v3 weights), samples vs reference"
        notes["IS"] = f"Inception Score over {is_splits} splits (fc logits without bias); IS_std across splits"

    # Reference statistics first when they are a file: a wrong file fails before any sample is read.
    ref_stats: GaussianStats | None = None
    if isinstance(reference, GaussianStats):
        ref_stats = reference
        _check_reference(ref_stats, feats.feature, feats.metric, "given")
    elif isinstance(reference, (str, os.PathLike)) and is_stats_file(reference):
        ref_stats = GaussianStats.load(reference)
        _check_reference(ref_stats, feats.feature, feats.metric, str(reference))
    if ref_stats is not None and save_ref_stats is not None:
        raise TextokError("the reference is already a statistics file: --save-ref-stats needs reference images")
    if ref_stats is not None and ref_stats_file is not None:
        raise TextokError("the reference is already a statistics file: --ref-stats needs reference images")

    total = None
    if isinstance(samples, (str, os.PathLike)) and Path(samples).suffix == ".npz" and Path(samples).is_file():
        n_all = npz_info(samples)[0]
        total = math.ceil((n_all if num is None else min(n_all, num)) / batch_size)
    sample_stats, logits, side = feats.stream(iter_samples(samples, batch_size, num, image_size),
                                              keep_logits=True, progress=progress, desc="samples", total=total)
    n = sample_stats.num_samples
    if n < 2:
        raise TextokError(f"need at least 2 samples to evaluate; got {n}")
    result["num_samples"] = n
    result["image_size"] = side

    ref: FeatureStats | GaussianStats | None = ref_stats
    cache_file, identity = None, None
    if ref is None and ref_identity is not None and (ref_stats_file is not None or ref_cache_dir):
        identity = ref_cache.cache_identity(ref_identity, feature=feats.feature, image_size=side, ref_num=ref_num)
        cache_file = Path(ref_stats_file) if ref_stats_file is not None else ref_cache.default_path(identity)
        ref = _read_cached_reference(cache_file, identity, explicit=ref_stats_file is not None)
        if ref is not None:
            result["ref_stats"] = f"read from {cache_file}"
            if save_ref_stats is not None:
                ref.save(save_ref_stats)
                result["saved_ref_stats"] = str(save_ref_stats)
    if ref is None:
        ref_total = None
        if _is_dataset(reference):
            batches: Iterable[Tensor] = (_resize(x, side) for x in _dataset_batches(reference, batch_size, ref_num))
            ref_total = math.ceil(min(len(reference), ref_num or len(reference)) / batch_size)
        else:
            batches = iter_samples(reference, batch_size, ref_num, side)
            if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
                ref_total = math.ceil(min(npz_info(reference)[0], ref_num or npz_info(reference)[0]) / batch_size)
        ref, _, _ = feats.stream(batches, progress=progress, desc="reference", total=ref_total)
        if ref.num_samples < 2:
            raise TextokError(f"need at least 2 reference images; got {ref.num_samples}")
        if save_ref_stats is not None:
            ref.save(save_ref_stats)
            result["saved_ref_stats"] = str(save_ref_stats)
        if cache_file is not None and identity is not None:
            ref_cache.save(cache_file, ref, identity)
            result["ref_stats"] = f"computed, written to {cache_file}"
    result["num_reference"] = ref.num_samples if ref.num_samples is not None else -1

    result[feats.metric] = fd_between(sample_stats, ref)
    if n < sample_stats.mu.shape[0]:
        notes[feats.metric] += f"; only {n} samples for {sample_stats.mu.shape[0]}-d features: biased and noisy"
    if feats.inception is not None and logits is not None:
        if n >= is_splits:
            result["IS"], result["IS_std"] = inception_score(logits, splits=is_splits)
        else:
            skipped["IS"] = f"the Inception Score needs at least {is_splits} samples ({is_splits} splits); got {n}"
            notes.pop("IS", None)
    result["skipped"] = skipped
    result["metric_notes"] = notes
    return result


__all__ = [
    "evaluate_samples",
    "image_files",
    "is_stats_file",
    "iter_image_dir",
    "iter_npz",
    "iter_samples",
    "npz_info",
    "peek_image_size",
]
