"""A sharded, memory-mapped store of caption text states, written once and shared by every run.

Why: :class:`~textok.text.cache.TextEmbeddingCache` keeps every caption's states in RAM and in one file; with the
paper's data (1.28M captions, T5-XL, 2048 channels) that is ~157 GB. The store keeps them on disk in segments
that are memory-mapped, so a lookup touches only the rows it returns and a process's memory does not grow with
the number of captions. ``textok encode-captions`` fills it; training runs read it; a caption already stored is
never encoded again.

Layout of a store directory (one per encoder, max length and pooling; by default under
``$TEXTOK_CACHE`` or ``~/.cache/textok/text-states/``, like the Hugging Face cache)::

    store.json                 {"format", "encoder", "max_length", "pooled", "dim", "dtype"}: refused if another
                               encoder (or length, or pooling) opens it
    seg-<id>.keys.npy          uint64 caption hashes, sorted       (memory-mapped)
    seg-<id>.rows.npy          int64 (first token row, tokens) per key (memory-mapped)
    seg-<id>.states            float16/bfloat16 token rows (tokens x dim), raw   (memory-mapped)
    seg-<id>.json              the segment's counts, written last: a segment without it is ignored

Captions are stripped and hashed (64-bit BLAKE2b: at 1.28M captions a collision has odds of ~1e-7). Per-token
states are stored trimmed to each caption's real length; ``pooled`` stores one masked-mean row per caption (for
models with ``text_pooled``, when per-token states are too large to keep). Writers never modify a segment: a run
adds new ones, so concurrent readers only ever see complete segments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import TextokError
from ..io import atomic_write_text
from .cache import TextEmbeddingCache
from .embeddings import TextEmbeddings
from .encoders import check_captions, encoder_name, load_text_encoder

FORMAT = "textok-text-states-1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """``$TEXTOK_CACHE``, else ``$XDG_CACHE_HOME/textok``, else ``~/.cache/textok``."""
    if os.environ.get("TEXTOK_CACHE"):
        return Path(os.environ["TEXTOK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "textok"


def default_store_dir(encoder: str, max_length: int, pooled: bool = False) -> Path:
    """The user-level store of one encoder identity: readable name + a hash of the full encoder name."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.rstrip("/").split("/")[-1].split(":")[-1])[:40] or "encoder"
    digest = hashlib.sha1(encoder.encode()).hexdigest()[:8]
    return default_cache_dir() / "text-states" / f"{tail}-{digest}-len{max_length}{'-pooled' if pooled else ''}"


def caption_keys(captions: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") for c in captions],
                    dtype=np.uint64)


class _Segment:
    def __init__(self, root: Path, seg_id: str, dim: int) -> None:
        meta = json.loads((root / f"{seg_id}.json").read_text())
        self.keys = np.load(root / f"{seg_id}.keys.npy", mmap_mode="r")
        self.rows = np.load(root / f"{seg_id}.rows.npy", mmap_mode="r")
        self.states = np.memmap(root / f"{seg_id}.states", dtype=np.uint16, mode="r", shape=(int(meta["tokens"]), dim))

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in this segment, -1 where absent."""
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)


class TextStateStore:
    """Caption -> text states of one encoder identity, in memory-mapped segments (see the module docstring)."""

    def __init__(self, root: str | Path, *, encoder: str, max_length: int, pooled: bool | None = False,
                 dim: int | None = None, dtype: str = "float16") -> None:
        """Open the store at ``root`` (``pooled=None``: whichever it holds), or create it when ``dim`` is given."""
        self.root = Path(root).expanduser()
        if dtype not in DTYPES:
            raise TextokError(f"text-state dtype {dtype!r} must be float16 or bfloat16")
        meta_path = self.root / "store.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise TextokError(f"{self.root} is not a text-state store (store.json format {meta.get('format')!r})")
            if meta["encoder"] != encoder:
                raise TextokError(f"text-state store {self.root} was built with encoder {meta['encoder']!r}, not "
                                  f"{encoder!r}; use that encoder, or another store (text_store=... / --store)")
            for key, want in (("max_length", max_length), ("pooled", pooled)):
                if want is not None and meta[key] != want:
                    raise TextokError(f"text-state store {self.root} holds {key}={meta[key]} states of {encoder!r}, "
                                      f"this run needs {key}={want}; use another store")
        else:
            if dim is None:
                raise TextokError(f"no text-state store at {self.root}: write one with `textok encode-captions`")
            meta = {"format": FORMAT, "encoder": encoder, "max_length": max_length, "pooled": bool(pooled),
                    "dim": int(dim), "dtype": dtype}
            atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        self.meta = meta
        self.encoder, self.dim, self.pooled = encoder, int(meta["dim"]), bool(meta["pooled"])
        self.dtype = DTYPES[meta["dtype"]]
        self._segments: dict[str, _Segment] = {}
        self.refresh()

    def refresh(self) -> None:
        """Map segments written since this store was opened (by this or another process)."""
        for marker in sorted(self.root.glob("seg-*.json")):
            seg_id = marker.name[: -len(".json")]
            if seg_id not in self._segments:
                self._segments[seg_id] = _Segment(self.root, seg_id, self.dim)

    def __len__(self) -> int:
        return sum(len(s.keys) for s in self._segments.values())

    def _locate(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        keys = caption_keys(captions)
        seg = np.full(len(keys), -1)
        pos = np.full(len(keys), -1)
        for i, s in enumerate(self._segments.values()):
            todo = seg < 0
            if not todo.any():
                break
            found = s.find(keys[todo])
            hit = np.flatnonzero(todo)[found >= 0]
            seg[hit], pos[hit] = i, found[found >= 0]
        return seg, pos

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions (stripped) that the store does not hold, sorted."""
        unique = sorted(set(check_captions(list(captions))))
        if not unique:
            return []
        seg, _ = self._locate(unique)
        return [c for c, s in zip(unique, seg) if s < 0]

    def rows(self, captions: list[str]) -> list[torch.Tensor | None]:
        """Each caption's states ``(tokens, dim)`` as float32 (``None`` where it is not stored)."""
        captions = check_captions(captions)
        seg, pos = self._locate(captions)
        segments = list(self._segments.values())
        out: list[torch.Tensor | None] = []
        for s, p in zip(seg.tolist(), pos.tolist()):
            if s < 0:
                out.append(None)
                continue
            first, length = (int(v) for v in segments[s].rows[p])
            raw = np.array(segments[s].states[first : first + length])  # a copy: the map stays read-only
            out.append(torch.from_numpy(raw.view(np.int16)).view(self.dtype).float())
        return out

    def lookup(self, captions: list[str]) -> TextEmbeddings:
        """Padded states of stored captions; a caption not in the store is an error naming the fix."""
        rows = self.rows(captions)
        absent = [c for c, r in zip(captions, rows) if r is None]
        if absent:
            raise TextokError(f"{len(absent)} captions are not in the text-state store {self.root} (e.g. "
                              f"{absent[0][:60]!r}); run `textok encode-captions` on the data first")
        return pad_rows(rows)  # type: ignore[arg-type]

    def fill(self, captions: Iterable[str], encode: Callable[[list[str]], TextEmbeddings], batch_size: int = 256,
             progress: bool = False, segment_captions: int = 1_000_000) -> int:
        """Encode and store every caption not stored yet; returns how many were encoded.

        Within a segment the captions are encoded shortest first: an encoder pads each batch to its longest
        caption, so batches of similar lengths waste little work on padding (where each lands in the store does
        not depend on the order)."""
        todo = self.missing(captions)
        bar = None
        if progress and todo:
            from ..progress import progress_bar

            bar = progress_bar(total=len(todo), desc=f"encoding captions ({self.encoder})", unit="caption")
        for seg_start in range(0, len(todo), segment_captions):
            segment = sorted(todo[seg_start : seg_start + segment_captions], key=len)
            with _SegmentWriter(self) as writer:
                for start in range(0, len(segment), batch_size):
                    chunk = segment[start : start + batch_size]
                    writer.add(chunk, encode(chunk))
                    if bar is not None:
                        bar.update(len(chunk))
        if bar is not None:
            bar.close()
        self.refresh()
        return len(todo)


class _SegmentWriter:
    """Appends token rows to a new segment; on a clean exit writes its sorted index and marker, else removes it."""

    def __init__(self, store: TextStateStore) -> None:
        self.store = store
        self.seg_id = f"seg-{uuid.uuid4().hex[:12]}"
        self.keys: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.tokens = 0

    def __enter__(self) -> "_SegmentWriter":
        self.file = open(self.store.root / f".{self.seg_id}.states.tmp", "wb")
        return self

    def add(self, captions: list[str], emb: TextEmbeddings) -> None:
        if self.store.pooled:
            emb = emb.pooled()
        lengths = emb.mask.sum(1).clamp_min(1).tolist()
        for states, n in zip(emb.states, lengths):
            row = states[: int(n)].detach().to("cpu", self.store.dtype).contiguous()
            self.file.write(row.view(torch.int16).numpy().tobytes())
            self.lengths.append(int(n))
            self.tokens += int(n)
        self.keys.append(caption_keys(check_captions(captions)))

    def __exit__(self, exc_type, exc, tb) -> None:
        root, tmp_states = self.store.root, self.store.root / f".{self.seg_id}.states.tmp"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc_type is not None or not self.lengths:
            tmp_states.unlink(missing_ok=True)
            return
        keys = np.concatenate(self.keys)
        lengths = np.array(self.lengths, dtype=np.int64)
        firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        order = np.argsort(keys, kind="stable")
        for name, array in (("keys", keys[order]), ("rows", np.stack([firsts, lengths], 1)[order])):
            tmp = root / f".{self.seg_id}.{name}.tmp.npy"
            np.save(tmp, array)
            tmp.replace(root / f"{self.seg_id}.{name}.npy")
        tmp_states.replace(root / f"{self.seg_id}.states")
        atomic_write_text(root / f"{self.seg_id}.json",
                          json.dumps({"captions": len(keys), "tokens": self.tokens}) + "\n")


def pad_rows(rows: list[torch.Tensor]) -> TextEmbeddings:
    lengths = torch.tensor([r.shape[0] for r in rows])
    states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return TextEmbeddings(states, torch.arange(states.shape[1])[None, :] < lengths[:, None])


class StoreTextCache:
    """What a training loop encodes captions with: the store first; a caption it lacks is encoded on the fly
    (memoised in RAM and counted in ``misses``, never written) so a run on data the store does not cover works."""

    def __init__(self, store: TextStateStore, encoder_factory: Callable[[], object]) -> None:
        self.store, self._factory = store, encoder_factory
        self._extra = None
        self.hits = self.misses = 0

    @property
    def name(self) -> str:
        return self.store.encoder

    @property
    def dim(self) -> int:
        return self.store.dim

    def encode(self, captions: list[str]) -> TextEmbeddings:
        captions = check_captions(captions)
        rows = self.store.rows(captions)
        absent = [c for c, r in zip(captions, rows) if r is None]
        self.hits += len(captions) - len(absent)
        if absent:
            if self._extra is None:
                self._extra = TextEmbeddingCache(self._factory())
            self.misses += len(absent)
            extra = self._extra.encode(absent)
            if self.store.pooled:
                extra = extra.pooled()
            fill = iter(s[: int(n)].half().float() if self.store.dtype == torch.float16 else
                        s[: int(n)].bfloat16().float() for s, n in zip(extra.states, extra.mask.sum(1).clamp_min(1)))
            rows = [r if r is not None else next(fill) for r in rows]
        return pad_rows(rows)  # type: ignore[arg-type]

    __call__ = encode


def open_text_states(spec: str, max_length: int, device: str, *, text_store: str, text_cache: Path,
                     streaming: bool, captions: Iterable[str] | None, pooled_model: bool = False,
                     is_main: bool = True, barrier: Callable[[], None] = lambda: None, progress: bool = False):
    """The caption encoder of a training run: a :class:`StoreTextCache` or the one-file TextEmbeddingCache.

    ``text_store``: ``"auto"`` (the user-level store when the data streams from shards, else the one-file cache at
    ``text_cache``), ``"off"`` (the one-file cache), ``"on"`` (the user-level store) or a store directory. A pooled
    model uses the pooled store of its encoder when one exists. ``captions`` (a map-style data set's, or ``None``
    for shards) are encoded up front by the main process, and the others wait at ``barrier``.
    """
    mode = ("on" if streaming else "off") if text_store == "auto" else text_store
    factory = lambda: load_text_encoder(spec, max_length, device)  # noqa: E731
    if mode == "off":
        cache = TextEmbeddingCache(factory())
        cache.load(text_cache)
        # saved as it goes (and on an interrupt) by the main process, so a killed encode keeps what it did
        cache.warm(captions or (), progress=progress and is_main, save_to=text_cache if is_main else None)
        return cache
    name = encoder_name(spec)
    pooled = pooled_model and mode == "on" and (default_store_dir(name, max_length, True) / "store.json").is_file()
    root = default_store_dir(name, max_length, pooled) if mode == "on" else Path(mode)
    want = pooled if mode == "on" else None  # a store named by path: whichever it holds, checked below
    if is_main:
        known = (root / "store.json").is_file()
        store = TextStateStore(root, encoder=name, max_length=max_length, pooled=want,
                               dim=None if known else factory().dim)
        if captions is not None:
            store.fill(captions, factory().encode, progress=progress)
        elif len(store) == 0:
            print(f"the text-state store {root} is empty: captions are encoded as they come; encode them once "
                  "with `textok encode-captions` so that no run encodes them again")
    barrier()
    store = TextStateStore(root, encoder=name, max_length=max_length, pooled=want)
    if store.pooled and not pooled_model:
        raise TextokError(f"text-state store {root} holds pooled states only, but this model reads one text token "
                          "per word; use a per-token store or model.text_pooled=true")
    return StoreTextCache(store, factory)


__all__ = ["TextStateStore", "StoreTextCache", "open_text_states", "default_cache_dir", "default_store_dir", "caption_keys", "FORMAT"]
