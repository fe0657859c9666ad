"""Streaming webdataset shards: data sets larger than memory, read sequentially, resumable exactly.

Format (the webdataset convention, written by ``textok make-shards``): tar files ``<split>-000000.tar`` whose
members are ``{key}.jpg`` (or another image suffix) and ``{key}.json`` = ``{"captions": [...], "label": int}``,
and ``index.json`` = ``{"format", "class_names", "splits": {split: [{"name", "count"}, ...]}}``. The index is what
makes positions addressable without reading the data: a sample's global index is its shard's offset plus its
place in the shard. Tars are read with webdataset's tar iterator and key grouping.

Reading order, a pure function of (seed, world size, workers, micro-batch) so that a resumed run reads what the
uninterrupted run would have read, with nothing but the step in the checkpoint:

* every epoch the shards are permuted (seed, epoch); rank ``r`` takes ``perm[r::world]`` and its reading stream
  ``w`` (one per DataLoader worker) takes ``rank_shards[w::workers]``: ranks and workers read disjoint shards;
* each stream is read in order and shuffled in windows of ``shuffle_buffer`` consecutive samples (a seeded
  permutation per window). Unlike a reservoir buffer, whose output depends on the whole history, a window starts
  afresh at known positions, so resuming seeks to the window's start (skipping tar members, decoding nothing)
  and replays it: exact resume without saving buffer contents;
* every stream yields the same number of batches per epoch (the smallest stream's), so ranks stay in step;
* the rank's micro-batch ``k`` comes from stream ``k % workers``, which is the order a DataLoader returns them in.

Bad input never stops a run: a truncated shard (its missing samples) and a member without an image or a caption
are skipped, counted in ``batch["skipped"]`` and reported once per shard and pass in ``batch["problems"]``, with
the shard named. Memory is bounded by the window: ``shuffle_buffer`` encoded samples per stream.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import TextokError
from .folder import SPLIT_ALIASES, collate
from .images import decode_image

FORMAT = "textok-shards-1"
INDEX = "index.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def is_shard_dir(path: str | Path) -> bool:
    """True for a directory holding a shard index written by ``textok make-shards``."""
    index = Path(path).expanduser() / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


@dataclasses.dataclass(frozen=True)
class Shard:
    path: Path
    count: int  # samples (key groups) the index lists for it
    offset: int  # global index of its first sample

    @property
    def name(self) -> str:
        return self.path.name


class ShardSet:
    """One split of a shard directory: the shard list and per-shard counts, never the samples themselves."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 64, captions_per_image: int = 0) -> None:
        self.root = Path(root).expanduser()
        if not is_shard_dir(self.root):
            raise TextokError(f"{self.root} is not a shard directory ({INDEX} of format {FORMAT} is missing); "
                              "write one with `textok make-shards`")
        index = json.loads((self.root / INDEX).read_text())
        self.split = SPLIT_ALIASES.get(split, split)
        splits = index.get("splits", {})
        if self.split not in splits:
            raise TextokError(f"shard directory {self.root} has no {split!r} split (it has: {', '.join(splits) or 'none'}); "
                              "choose one of those (e.g. data.val_split=...) or add it with `textok make-shards`")
        shards, offset = [], 0
        real_root = self.root.resolve()
        for entry in splits[self.split]:
            try:
                path, count = self.root / str(entry["name"]), int(entry["count"])
            except (KeyError, TypeError, ValueError):
                raise TextokError(f"{self.root / INDEX} is corrupt (a shard entry is not {{\"name\", \"count\"}}: "
                                  f"{entry!r:.80}); write it again with `textok make-shards --index-only`") from None
            if not path.resolve().is_relative_to(real_root):
                raise TextokError(f"{self.root / INDEX}: shard {entry['name']!r} is outside the shard directory (it "
                                  f"leads to {path.resolve()}); a data set reads only files inside it: copy the shard in")
            shards.append(Shard(path, count, offset))
            offset += count
        if not shards or offset == 0:
            raise TextokError(f"split {self.split!r} of {self.root} has no samples")
        missing = [s.name for s in shards if not s.path.is_file()]
        if missing:
            raise TextokError(f"{self.root}: shard {missing[0]} is listed in {INDEX} but missing "
                              f"({len(missing)} missing in all); copy it back or write the shards again")
        self.shards: list[Shard] = shards
        self.class_names: list[str] = list(index.get("class_names", []))
        self.image_size = image_size
        self.captions_per_image = captions_per_image

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def stream(self, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0, seed: int = 0,
               shuffle_buffer: int = 1000) -> "ShardStream":
        return ShardStream(self, batch_size, rank=rank, world=world, workers=workers, seed=seed,
                           shuffle_buffer=shuffle_buffer)

    def samples(self, shards: list[Shard] | None = None, problems: list[str] | None = None) -> Iterator[dict | None]:
        """Every sample of ``shards`` (default: all, in index order) as an item, or ``None`` when skipped."""
        for shard in shards or self.shards:
            for record in read_shard(shard, 0, problems):
                yield self.item(record)

    def take(self, n: int) -> "ShardHead":
        """The first ``n`` samples in index order, kept encoded in memory (a small validation set)."""
        records = []
        for shard in self.shards:
            for record in read_shard(shard, 0):
                if record is not None:
                    records.append(record)
                if len(records) >= n:
                    return ShardHead(self, records)
        return ShardHead(self, records)

    def item(self, record: dict | None) -> dict[str, Any] | None:
        """A decoded item (``image``, ``captions``, ``label``, ``index``) from a raw record, or ``None``."""
        if record is None:
            return None
        try:
            image = decode_image(record["image"], self.image_size)
        except Exception:  # an undecodable image: skipped and counted like any bad member
            return None
        captions = record["captions"][: self.captions_per_image] if self.captions_per_image else record["captions"]
        return {"image": image, "captions": captions, "label": record["label"], "index": record["index"]}


class ShardHead(torch.utils.data.Dataset):
    """A few samples of a shard set as a map-style dataset (encoded bytes in memory, decoded on access)."""

    def __init__(self, shards: ShardSet, records: list[dict]) -> None:
        self.shards, self.records = shards, records
        self.class_names = shards.class_names

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        return self.shards.item(self.records[i])

    def captions_of(self, i: int) -> list[str]:
        caps = self.records[i]["captions"]
        return caps[: self.shards.captions_per_image] if self.shards.captions_per_image else caps


def parse_record(sample: dict[str, Any], index: int) -> tuple[dict | None, str]:
    """webdataset sample (``__key__`` + one entry per suffix) -> raw record, or (None, why it is skipped)."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        return None, "no image"
    if "json" not in sample:
        return None, "no caption"
    try:
        meta = json.loads(sample["json"])
        caps = meta.get("captions", meta.get("caption"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None, "no caption"
    caps = [caps] if isinstance(caps, str) else (caps or [])
    caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
    if not caps:
        return None, "no caption"
    label = meta.get("label", -1)
    return {"image": image, "captions": caps, "label": int(label) if isinstance(label, (int, float)) else -1,
            "index": index, "key": sample["__key__"]}, ""


def read_shard(shard: Shard, skip: int = 0, problems: list[str] | None = None) -> Iterator[dict | None]:
    """Exactly ``shard.count - skip`` positions of one shard, in order: a raw record or ``None`` (skipped).

    The first ``skip`` samples are passed over without being parsed. A shard that ends early (truncated, or
    unreadable) yields ``None`` for its missing samples; what was skipped and why is appended to ``problems``
    as one line naming the shard, before its last position is yielded (so a batch holding that position
    carries the report).
    """
    pending, have = None, False
    for record in _shard_positions(shard, skip, problems):
        if have:
            yield pending
        pending, have = record, True
    if have:
        yield pending


def _shard_positions(shard: Shard, skip: int, problems: list[str] | None) -> Iterator[dict | None]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        return True  # skip and go on; what is missing is counted below

    reasons: dict[str, int] = {}
    n = 0
    try:
        with open(shard.path, "rb") as f:
            files = tar_file_expander([{"url": str(shard.path), "stream": f}], handler=handler, eof_value=None)
            for sample in group_by_keys(files, handler=handler):
                if n >= shard.count:
                    break
                if n >= skip:
                    record, why = parse_record(sample, shard.offset + n)
                    if record is None:
                        reasons[why] = reasons.get(why, 0) + 1
                    yield record
                n += 1
    except OSError as err:
        errors.append(f"{type(err).__name__}: {err}")
    lost = shard.count - n
    if lost > 0:
        reasons[f"truncated after {n} of {shard.count} samples"] = lost
        for _ in range(max(n, skip), shard.count):
            yield None
    if reasons and problems is not None:
        why = ", ".join(f"{k}: {v}" for k, v in reasons.items())
        detail = f" ({errors[0][:120]})" if errors and lost > 0 else ""
        problems.append(f"shard {shard.path}: skipped {sum(reasons.values())} samples ({why}){detail}")


@dataclasses.dataclass
class _Epoch:
    streams: list[list[list[Shard]]]  # [rank][stream] -> shards in reading order
    batches: int  # batches every stream yields in this epoch


class ShardStream:
    """The micro-batches of one rank over a shard set, addressed by position (see the module docstring)."""

    def __init__(self, shards: ShardSet, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000) -> None:
        if batch_size < 1 or shuffle_buffer < 1:
            raise TextokError(f"batch size ({batch_size}) and data.shuffle_buffer ({shuffle_buffer}) must be positive")
        self.shards, self.batch_size, self.rank, self.world = shards, batch_size, rank, world
        self.workers = workers  # DataLoader processes (0: read in this process)
        self.num_streams = max(1, workers)
        self.seed, self.window = seed, shuffle_buffer
        need = world * self.num_streams
        if len(shards.shards) < need:
            raise TextokError(f"{shards.root} split {shards.split!r} has {len(shards.shards)} shards, fewer than "
                              f"ranks x reading streams = {world} x {self.num_streams}: every stream reads whole "
                              "shards, so write smaller shards (make-shards --shard-size) or use fewer workers")
        self._cum: list[int] = []  # batches per stream before each planned epoch

    @functools.lru_cache(maxsize=4)
    def _plan(self, epoch: int) -> _Epoch:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = [self.shards.shards[i] for i in torch.randperm(len(self.shards.shards), generator=g).tolist()]
        streams = [[order[r::self.world][w::self.num_streams] for w in range(self.num_streams)]
                   for r in range(self.world)]
        fewest = min(sum(s.count for s in stream) for rank in streams for stream in rank)
        if fewest < self.batch_size:
            raise TextokError(f"{self.shards.root}: a reading stream holds only {fewest} samples in epoch {epoch}, "
                              f"fewer than one batch of {self.batch_size}; use a smaller batch, fewer workers or "
                              "ranks, or more (smaller) shards")
        return _Epoch(streams, fewest // self.batch_size)

    def batches_per_epoch(self) -> int:
        """Micro-batches of this rank in the first epoch (later epochs differ only if shard sizes do)."""
        return self._plan(0).batches * self.num_streams

    def locate(self, local: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a stream's ``local``-th batch."""
        epoch, before = 0, 0
        while True:
            n = self._plan(epoch).batches
            if local < before + n:
                return epoch, local - before
            before += n
            epoch += 1

    def position(self, micro: int) -> dict[str, int]:
        """Where micro-batch ``micro`` of this rank reads: recorded in checkpoints for inspection."""
        epoch, batch = self.locate(micro // self.num_streams)
        return {"micro_batch": micro, "epoch": epoch, "batch_in_epoch": batch, "stream": micro % self.num_streams,
                "world": self.world, "streams": self.num_streams, "shuffle_buffer": self.window}

    def stream_batches(self, stream: int, start: int) -> Iterator[dict[str, Any]]:
        """Batches ``start``, ``start + 1``, ... of reading stream ``stream`` of this rank, forever (epoch after epoch)."""
        epoch, batch = self.locate(start)
        problems: list[str] = []
        while True:
            plan = self._plan(epoch)
            items = self._window_items(plan.streams[self.rank][stream], epoch, stream, batch * self.batch_size,
                                       plan.batches * self.batch_size, problems)
            for _ in range(batch, plan.batches):
                out = collate([self.shards.item(next(items)) for _ in range(self.batch_size)])
                out["problems"] = list(problems)
                problems.clear()
                yield out
            items.close()
            epoch, batch = epoch + 1, 0

    def _window_items(self, shards: list[Shard], epoch: int, stream: int, first: int, last: int,
                      problems: list[str]) -> Iterator[dict | None]:
        """Raw records of output positions ``first`` .. ``last - 1`` of one stream in one epoch."""
        total = sum(s.count for s in shards)
        q = first // self.window
        reader = _sequential(shards, q * self.window, problems)
        out = q * self.window
        while out < last:
            size = min(self.window, total - q * self.window)
            window = [next(reader) for _ in range(size)]
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 65_537 + self.rank * 4099 + stream)
                                              * 1_000_033 + q)
            for j in torch.randperm(size, generator=g).tolist():
                if first <= out < last:
                    yield window[j]
                out += 1
            q += 1

    def batches(self, start: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from ``start`` on: in this process, or from ``workers`` DataLoader processes
        (process ``i`` plays stream ``(start + i) % workers`` so the round-robin order is the same on resume)."""
        if self.workers == 0:
            yield from self.stream_batches(0, start)
            return
        loader = torch.utils.data.DataLoader(_StreamWorkers(self, start), batch_size=None, num_workers=self.workers,
                                             prefetch_factor=2)
        yield from loader


def _sequential(shards: list[Shard], start: int, problems: list[str]) -> Iterator[dict | None]:
    """Records of a concatenation of shards from position ``start`` on (earlier shards are not opened)."""
    for shard in shards:
        if start >= shard.count:
            start -= shard.count
            continue
        yield from read_shard(shard, start, problems)
        start = 0


class _StreamWorkers(torch.utils.data.IterableDataset):
    def __init__(self, stream: ShardStream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        i = info.id if info is not None else 0
        k = self.start + i
        yield from self.stream.stream_batches(k % self.stream.num_streams, k // self.stream.num_streams)


__all__ = ["ShardSet", "ShardStream", "ShardHead", "Shard", "is_shard_dir", "read_shard", "FORMAT", "INDEX"]
