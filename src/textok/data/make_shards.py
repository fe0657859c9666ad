"""``textok make-shards``: an image folder or tar + captions into webdataset shards with an index; or a directory
of (uncaptioned) webdataset shards + the captions.jsonl ``textok caption`` wrote for it into captioned shards.

Why: a folder is listed and a tar indexed up front, and both are read at random; shards are read front to back,
split across ranks and workers by file, and need no listing of the samples. Samples are written in a seeded
random order by default (an ImageNet folder is sorted by class: unshuffled, every shard would hold one class and
a window shuffle could not mix them). Image bytes are copied as they are unless ``image_size`` asks for a
center-cropped, resized JPEG. The directory is written atomically.

From shards, the same seeded shuffle over each whole split: the source's samples are indexed by (tar, offset)
(:mod:`textok.data.shard_source`), so each image is read with one seek and nothing but that index and the
captions is held in memory. A sample is matched to its caption by ``<tar name>/<key>``; one without a caption is
left out and counted (the first named), as a folder's images without a line in captions.jsonl are left out.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..errors import TextokError
from ..io import atomic_directory, atomic_write_text
from ..progress import progress_bar
from .folder import SPLIT_ALIASES, ImageCaptionFolder
from .images import center_crop_resize, to_rgb
from .shard_source import ShardSample, ShardSource, is_shard_source, read_captions, split_of_tar
from .shards import FORMAT, INDEX, IMAGE_EXTS


def _jpeg(data: bytes, size: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = center_crop_resize(to_rgb(img), size)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(samples: Iterator[dict[str, Any]], out_dir: Path, split: str, shard_size: int) -> list[dict]:
    """Write ``{"image": bytes, "ext", "captions", "label", "file"?}`` samples as ``<split>-NNNNNN.tar`` files of
    ``shard_size`` samples each; returns the index entries ``[{"name", "count"}]``."""
    entries: list[dict] = []
    writer, count, key = None, 0, 0
    try:
        for sample in samples:
            if writer is None or count == shard_size:
                if writer is not None:
                    writer.close()
                    entries.append({"name": name, "count": count})
                name = f"{split}-{len(entries):06d}.tar"
                writer, count = TarWriter(str(out_dir / name), encoder=False, mtime=0.0), 0
            meta = {"captions": list(sample["captions"]), "label": int(sample.get("label", -1))}
            if sample.get("file"):
                meta["file"] = sample["file"]
            writer.write({"__key__": f"{key:09d}", sample["ext"]: sample["image"], "json": json.dumps(meta).encode()})
            count += 1
            key += 1
    finally:
        if writer is not None:
            writer.close()
    if count:
        entries.append({"name": name, "count": count})
    return entries


def make_shards(source: str | Path, out: str | Path, *, splits: tuple[str, ...] = ("train", "val"),
                captions_file: str | None = None, caption_bank: str | None = None, shard_size: int = 1000,
                image_size: int = 0, shuffle: bool = True, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Convert ``source`` (folder or tar, as :class:`ImageCaptionFolder` reads it) into shards in ``out``.

    Splits the source does not have are left out (at least one must exist). Returns the index written.
    """
    if shard_size < 1:
        raise TextokError(f"shard size {shard_size} must be at least 1 sample")
    source = Path(source).expanduser()
    if not source.exists():
        raise TextokError(f"data {source} does not exist")
    if is_shard_source(source):
        return make_shards_from_shards(source, out, splits=splits, captions_file=captions_file,
                                       caption_bank=caption_bank, shard_size=shard_size, image_size=image_size,
                                       shuffle=shuffle, seed=seed, progress=progress)
    index: dict[str, Any] = {"format": FORMAT, "class_names": [], "splits": {}, "source": str(source)}
    skipped = 0
    written: set[str] = set()
    with atomic_directory(out, markers=(INDEX,)) as tmp:
        for split in dict.fromkeys(SPLIT_ALIASES.get(s, s) for s in splits):
            try:
                folder = ImageCaptionFolder(source, split=split, image_size=max(image_size, 1),
                                            captions_file=captions_file, caption_bank=caption_bank)
            except TextokError as err:
                if "no images of split" in str(err):
                    continue
                raise
            files = {rec["file"] for rec in folder.records}
            if files <= written:  # a source without splits lists every image under every split name
                continue
            written |= files
            order = list(range(len(folder)))
            if shuffle:
                order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
            index["class_names"] = index["class_names"] or list(folder.class_names)
            bar = None
            if progress:
                bar = progress_bar(total=len(order), desc=f"shards {split}", unit="img")

            def samples() -> Iterator[dict[str, Any]]:
                nonlocal skipped
                for i in order:
                    rec = folder.records[i]
                    data = folder.source.read(rec["file"])
                    ext = Path(rec["file"]).suffix.lower().lstrip(".")
                    if image_size:
                        try:
                            data, ext = _jpeg(data, image_size), "jpg"
                        except Exception:  # undecodable: left out of the shards, counted
                            skipped += 1
                            continue
                    if bar is not None:
                        bar.update(1)
                    yield {"image": data, "ext": ext if ext in IMAGE_EXTS else "jpg", "captions": rec["captions"],
                           "label": rec["label"], "file": rec["file"]}

            index["splits"][split] = write_shards(samples(), tmp, split, shard_size)
            if bar is not None:
                bar.close()
        if not index["splits"]:
            raise TextokError(f"{source} has none of the splits {', '.join(splits)}")
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    index["skipped"] = skipped
    return index


def make_shards_from_shards(source: Path, out: str | Path, *, splits: tuple[str, ...], captions_file: str | None,
                            caption_bank: str | None, shard_size: int, image_size: int, shuffle: bool, seed: int,
                            progress: bool) -> dict[str, Any]:
    """Captioned shards in ``out`` from the shard directory ``source`` and its captions (``--captions``, else
    ``source/captions.jsonl``); see the module docstring. Returns the index written, with ``skipped`` and
    ``uncaptioned`` (``{"count", "first"}``) added."""
    if caption_bank is not None:
        raise TextokError("--caption-bank gives class folders their captions; a shard directory takes the captions "
                          f"`textok caption {source} --vlm DIR` writes (--captions FILE)")
    captions_path = Path(captions_file).expanduser() if captions_file else source / "captions.jsonl"
    if not captions_path.is_file():
        raise TextokError(f"{captions_path} does not exist: caption the shards first (`textok caption {source} "
                          "--vlm DIR`) or give --captions FILE")
    wanted = tuple(dict.fromkeys(SPLIT_ALIASES.get(s, s) for s in splits))
    shards = ShardSource(source)  # every split: a caption is "matched" when it names any sample
    captions = read_captions(captions_path)
    matched = sum(shards.file_of(s) in captions for s in shards.samples)  # no second table of every name
    if matched < len(captions):
        files = {shards.file_of(s) for s in shards.samples}  # only to name the first stray caption
        first = next(f for f in captions if f not in files)
        del files
        if not matched:
            raise TextokError(f"none of the {len(captions)} captions in {captions_path} names a sample of {source} "
                              f"(first: {first!r}; samples are named <tar name>/<key>, e.g. "
                              f"{shards.file_of(shards.samples[0])!r}): caption these shards with `textok caption "
                              f"{source}`")
        warnings.warn(f"{len(captions) - matched} of the {len(captions)} captions in {captions_path} name no sample "
                      f"of {source} (first: {first!r}); they are left out", stacklevel=2)
    present = [s for s in wanted if any(split == s for _, split in shards.tars)]
    if not present:
        raise TextokError(f"{source} has none of the splits {', '.join(splits)}")
    label_of, class_names = _integer_labels(shards)
    index: dict[str, Any] = {"format": FORMAT, "class_names": class_names, "splits": {}, "source": str(source)}
    skipped, uncaptioned, first_uncaptioned = 0, 0, None
    with atomic_directory(out, markers=(INDEX,)) as tmp:
        for split in present:
            chosen: list[ShardSample] = []
            for sample in shards.samples:
                if shards.split_of(sample) != split:
                    continue
                if shards.file_of(sample) in captions:
                    chosen.append(sample)
                else:
                    uncaptioned += 1
                    first_uncaptioned = first_uncaptioned or shards.file_of(sample)
            if not chosen:
                continue
            order = range(len(chosen))
            if shuffle:
                order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed)).tolist()
            bar = progress_bar(total=len(chosen), desc=f"shards {split}", unit="img", disable=None if progress else True)

            def samples() -> Iterator[dict[str, Any]]:
                nonlocal skipped
                for i in order:
                    sample = chosen[i]
                    bar.update(1)
                    try:
                        data, ext = shards.read_sample(sample), sample.ext
                        if image_size:
                            data, ext = _jpeg(data, image_size), "jpg"
                    except Exception:  # unreadable or undecodable: left out of the shards, counted
                        skipped += 1
                        continue
                    file = shards.file_of(sample)
                    yield {"image": data, "ext": ext, "captions": captions[file], "label": label_of(sample),
                           "file": file}

            index["splits"][split] = write_shards(samples(), tmp, split, shard_size)
            bar.close()
        if not index["splits"]:
            raise TextokError(f"no sample of the splits {', '.join(present)} of {source} has a caption in "
                              f"{captions_path}")
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    index["skipped"] = skipped
    index["uncaptioned"] = {"count": uncaptioned, "first": first_uncaptioned}
    return index


def _integer_labels(shards: ShardSource) -> tuple[Callable[[ShardSample], int], list[str]]:
    """(sample -> integer label, class names): integer ids as they are (the shard index's class names kept), class
    names numbered after the index's names in sorted order."""
    names = list(shards.class_names)
    given = {s.label for s in shards.samples if s.label is not None}
    text = sorted(x for x in given if isinstance(x, str) and x not in names)
    if text and not names and any(isinstance(x, int) for x in given):
        raise TextokError(f"{shards.root}: some samples are labelled by class name ({text[0]!r}) and others by an "
                          "integer id; label them one way (the ids would be merged into the named classes)")
    ids = {name: i for i, name in enumerate(names + text)}

    def label(sample: ShardSample) -> int:
        if sample.label is None:
            return -1
        return ids[sample.label] if isinstance(sample.label, str) else sample.label

    return label, names + text


def index_shards(directory: str | Path) -> dict[str, Any]:
    """Write ``index.json`` for existing webdataset shards (``<split>-*.tar``; a tar without a split prefix counts
    as ``train``), counting each shard's samples by reading it once."""
    directory = Path(directory).expanduser()
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise TextokError(f"{directory} holds no .tar shards")
    splits: dict[str, list[dict]] = {}
    for tar in tars:
        split = split_of_tar(tar.name)
        count = sum(1 for _ in _keys(tar))
        splits.setdefault(split, []).append({"name": tar.name, "count": count})
    index = {"format": FORMAT, "class_names": [], "splits": splits, "source": str(directory)}
    atomic_write_text(directory / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def _keys(tar: Path) -> Iterator[str]:
    """The sample keys of one tar in order (webdataset's grouping; a truncated tar ends where it breaks)."""
    with open(tar, "rb") as f:
        files = tar_file_expander([{"url": str(tar), "stream": f}], handler=lambda e: True, eof_value=None)
        for sample in group_by_keys(files, handler=lambda e: True):
            yield sample["__key__"]


__all__ = ["make_shards", "make_shards_from_shards", "write_shards", "index_shards"]
