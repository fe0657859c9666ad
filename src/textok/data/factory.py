"""One entry point from a data spec (``"scenes"`` or a path) to a dataset, shared by training and evaluation.

Why: the training loop, ``textok eval`` and the generators all name their data the same way
(``source``, ``split``, ``size``, captions options), so they must all resolve it the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TextokError
from .folder import SPLIT_ALIASES, ImageCaptionFolder
from .scenes import CaptionedScenes, captions_for
from .shards import ShardSet, is_shard_dir

SCENES = "scenes"
DATA_ENV = "TEXTOK_DATA"  # the folder that relative data names (a recipe's ``flowers102-128.tar``) are found in


def resolve_source(source: str) -> str:
    """Where a data spec points: ``scenes``; an existing path (absolute or relative to the working directory);
    else a name inside the folder ``$TEXTOK_DATA``. Anything else is one line naming the path and the variable."""
    if source == SCENES or is_shard_dir(source):
        return source
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    root = os.environ.get(DATA_ENV, "")
    if path.is_absolute():
        raise TextokError(f"data {source!r} not found: it is neither 'scenes' (the embedded captioned scenes) nor an "
                          "existing folder or tar archive; pass its path (--data PATH or data.source=PATH)")
    if not root:
        raise TextokError(f"data {source!r} not found in the working directory, and {DATA_ENV} is not set: set "
                          f"{DATA_ENV} to the folder that holds it, or pass its path (--data PATH or "
                          "data.source=PATH)")
    if not Path(root).expanduser().is_dir():
        raise TextokError(f"{DATA_ENV}={root} is not a folder: point {DATA_ENV} at the folder that holds {source!r}")
    found = Path(root).expanduser() / path
    if not found.exists():
        raise TextokError(f"data {source!r} not found in the working directory nor in {DATA_ENV}={root}: put it there "
                          "or pass its path (--data PATH or data.source=PATH)")
    return str(found)


SWAPS = ("next", "other")  # the caption of the next item; of another class (or a far, random item)


def class_labels(dataset: Any, num: int) -> list[int] | None:
    """The class ids of items 0..num-1 read without loading images, or None when the data has no classes
    (no ``label_of``, an item without a class, or fewer than two classes)."""
    label_of = getattr(dataset, "label_of", None)
    if label_of is None:
        return None
    labels = [int(label_of(i)) for i in range(num)]
    if min(labels) < 0 or len(set(labels)) < 2:
        return None
    return labels


def swap_partners(num: int, labels: list[int] | None = None, seed: int = 0) -> list[int]:
    """For each item 0..num-1, whose caption it is scored with in the "other" swap.

    With class ``labels``: an item drawn uniformly from the other classes. Without: an item drawn uniformly
    from those at least a quarter of the set away (cyclically), so that a set stored in runs of similar photos
    (a species, a photographer's session) never swaps within a run. Deterministic for a ``seed``.
    """
    if num < 2:
        raise TextokError("mismatched captions need at least 2 images")
    rng = np.random.default_rng(seed)
    if labels is not None:
        by_class: dict[int, list[int]] = {}
        for i, c in enumerate(labels[:num]):
            by_class.setdefault(c, []).append(i)
        others = {c: np.asarray([i for i in range(num) if labels[i] != c]) for c in by_class}
        return [int(rng.choice(others[labels[i]])) for i in range(num)]
    low, high = max(1, -(-num // 4)), max(1, num - -(-num // 4))  # offsets in [ceil(num/4), num - ceil(num/4)]
    return [(i + int(rng.integers(low, high + 1))) % num for i in range(num)]


class MismatchedCaptions(torch.utils.data.Dataset):
    """The first ``num`` items of a captioned dataset, each with the captions of another one.

    Why: evaluating a text tokenizer with another image's caption measures how much it relies on the text
    (the drop from the right caption); a tokenizer that ignores its text loses nothing. ``swap="next"`` takes
    the next item's captions (cyclically); in a set grouped by class that is mostly a photo of the same class,
    whose caption fits nearly as well. ``swap="other"`` takes those of an item of another class when the data
    has classes, else of a far, random item (:func:`swap_partners`); ``kind`` says which it was.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num: int | None = None, swap: str = "next",
                 seed: int = 0) -> None:
        if swap not in SWAPS:
            raise TextokError(f"unknown caption swap {swap!r}: choose one of {', '.join(SWAPS)}")
        self.dataset = dataset
        self.num = min(len(dataset), num or len(dataset))  # type: ignore[arg-type]
        if self.num < 2:
            raise TextokError("mismatched captions need at least 2 images")
        if swap == "next":
            self.partners = [(i + 1) % self.num for i in range(self.num)]
            self.kind = "next image"
        else:
            labels = class_labels(dataset, self.num)
            self.partners = swap_partners(self.num, labels, seed)
            self.kind = "another class" if labels is not None else "a far, random image"

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not 0 <= index < self.num:
            raise IndexError(index)
        item = self.dataset[index]
        if item is None:
            return None
        return {**item, "captions": list(self.dataset.captions_of(self.partners[index]))}  # type: ignore[attr-defined]


class FirstCaptions(torch.utils.data.Dataset):
    """A view of a captioned dataset that keeps only the first ``k`` captions of every item.

    Everything else (``class_names``, ``image_size``, ``split``, ...) is read through to the wrapped dataset.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, k: int) -> None:
        if k < 1:
            raise TextokError(f"captions_per_image must be at least 1 (or 0 for all captions); got {k}")
        self.dataset = dataset
        self.k = k

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:  # an undecodable file: collate drops and counts it
            return None
        return {**item, "captions": list(item["captions"])[: self.k]}

    def captions_of(self, index: int) -> list[str]:
        """The kept captions of item ``index`` without loading its image."""
        return list(self.dataset.captions_of(index))[: self.k]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "k"):  # not set yet (e.g. during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def caption_bank(self) -> dict[int, list[str]]:
        """Per-class captions, built from the kept captions only (for the two built-in dataset types)."""
        inner = self.dataset
        bank: dict[int, list[str]] = {}
        if isinstance(inner, CaptionedScenes):
            bank = {k: [] for k in range(len(inner.class_names))}
            for i in range(len(inner)):
                s = inner.scene(i)
                bank[s.label].extend(captions_for(s)[: self.k])
            return bank
        if isinstance(inner, ImageCaptionFolder):
            for rec in inner.records:
                if rec["label"] >= 0:
                    bank.setdefault(rec["label"], []).extend(rec["captions"][: self.k])
            return bank
        return inner.caption_bank()  # type: ignore[attr-defined]  # another dataset type: its own bank


class DecodedOnce(torch.utils.data.Dataset):
    """Every image of a dataset decoded once and kept in memory (as uint8 when that is lossless, which it is for
    8-bit sources), so a training step only indexes a tensor.

    Why: decoding JPEGs every step costs more CPU time than a small model's GPU step; Flowers-102 at 64 px is
    90 MB decoded. Undecodable items stay ``None`` (collate skips and counts them).
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        n = len(dataset)  # type: ignore[arg-type]
        self.items: list[dict[str, Any] | None] = []
        pixels: torch.Tensor | None = None
        for i in range(n):
            item = dataset[i]
            if item is None:
                self.items.append(None)
                continue
            image = item["image"]
            if pixels is None:
                lossless = torch.equal(image.add(1).mul(127.5).round().div(127.5).sub(1), image)
                pixels = torch.zeros((n, *image.shape), dtype=torch.uint8 if lossless else torch.float32)
            if pixels.dtype == torch.uint8:
                pixels[i] = image.add(1).mul(127.5).round().to(torch.uint8)
            else:
                pixels[i] = image
            self.items.append({k: v for k, v in item.items() if k != "image"})
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        meta = self.items[index]
        if meta is None:
            return None
        x = self.pixels[index]
        image = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.clone()
        return {**meta, "image": image}

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "items", "pixels"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_dataset(source: str, split: str, image_size: int, *, size: int = 0, captions_file: str = "",
                  caption_bank: str = "", seed: int = 0, captions_per_image: int = 0,
                  decode_once: bool = False) -> torch.utils.data.Dataset:
    """``"scenes"`` -> :class:`CaptionedScenes` (``size`` images, 0 = its default per split); a shard directory
    (``textok make-shards``) -> a streaming :class:`ShardSet` (not a map-style dataset; with ``size`` > 0, its first
    ``size`` samples as one); any other ``source`` is a folder or tar read by :class:`ImageCaptionFolder`
    (``size`` = a limit, 0 = all).

    ``captions_file``/``caption_bank`` (folders only; "" = none) and ``seed`` (scenes only) are passed on;
    ``captions_per_image`` > 0 keeps only the first k captions of each item; ``decode_once`` decodes every image
    up front and keeps the pixels in memory (:class:`DecodedOnce`).
    """
    if size < 0:
        raise TextokError(f"dataset size {size} is negative: use 0 for the default/all images")
    if captions_per_image < 0:
        raise TextokError(f"captions_per_image {captions_per_image} is negative: use 0 for all captions")
    if source == SCENES:
        scene_split = SPLIT_ALIASES.get(split, split)
        if captions_file or caption_bank:
            raise TextokError("captions_file / caption_bank apply to image folders, not to the embedded scenes "
                              "(which carry their own captions): leave them empty")
        dataset: torch.utils.data.Dataset = CaptionedScenes(image_size, split=scene_split, size=size or None,
                                                            seed=seed)
    elif is_shard_dir(source := resolve_source(source)):
        if captions_file or caption_bank:
            raise TextokError("captions_file / caption_bank apply to image folders; shards carry their captions "
                              "(give them to `textok make-shards`): leave them empty")
        shards = ShardSet(source, split, image_size, captions_per_image=captions_per_image)
        if not size:
            if decode_once:
                raise TextokError("data.decode_once keeps every image in memory, which a shard set is meant to avoid; "
                                  "set data.decode_once=false (or data.train_size=N to decode the first N)")
            return shards  # type: ignore[return-value]
        head = shards.take(size)
        return DecodedOnce(head) if decode_once else head
    else:
        root = Path(source)
        dataset = ImageCaptionFolder(root, split=split, image_size=image_size,
                                     captions_file=captions_file or None, caption_bank=caption_bank or None,
                                     limit=size or None)
    if captions_per_image > 0:
        dataset = FirstCaptions(dataset, captions_per_image)
    if decode_once:
        dataset = DecodedOnce(dataset)
    return dataset


__all__ = ["DATA_ENV", "build_dataset", "resolve_source", "class_labels", "DecodedOnce", "FirstCaptions", "MismatchedCaptions", "SCENES", "SWAPS",
           "swap_partners"]
