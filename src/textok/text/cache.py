"""A cache of text embeddings keyed by (encoder, caption), so training never encodes a caption twice.

Entries are stored trimmed to their real length (no padding) in float16 on the CPU; ``encode`` pads a batch
to its longest caption. The cache can be written to and read from a safetensors file so that a dataset's
captions are encoded once across runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from ..errors import TextokError
from .embeddings import TextEmbeddings
from .encoders import HFTextEncoder, check_captions


def caption_key(encoder_name: str, caption: str) -> str:
    return hashlib.sha1(f"{encoder_name}\x00{caption}".encode()).hexdigest()


class TextEmbeddingCache:
    """Memoises ``encoder.encode`` per caption. ``hits``/``misses`` count lookups."""

    def __init__(self, encoder: HFTextEncoder, batch_size: int = 256, dtype: torch.dtype = torch.float16) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.dtype = dtype
        self._store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, caption: str) -> bool:
        return caption_key(self.name, caption) in self._store

    def warm(self, captions: Iterable[str], progress: bool = False) -> None:
        """Encode every caption not yet cached, in batches."""
        todo = sorted({c for c in check_captions(list(captions)) if caption_key(self.name, c) not in self._store})
        if not todo:
            return
        it = range(0, len(todo), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"encoding captions ({self.name})", unit="batch")
        for start in it:
            chunk = todo[start : start + self.batch_size]
            emb = self.encoder.encode(chunk)
            lengths = emb.mask.sum(1).tolist()
            for caption, states, n in zip(chunk, emb.states, lengths):
                self._store[caption_key(self.name, caption)] = states[: int(n)].to("cpu", self.dtype).clone()
            self.misses += len(chunk)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        captions = check_captions(captions)
        missing = [c for c in captions if caption_key(self.name, c) not in self._store]
        self.hits += len(captions) - len(missing)
        self.warm(missing)
        rows = [self._store[caption_key(self.name, c)] for c in captions]
        lengths = torch.tensor([r.shape[0] for r in rows])
        states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).float()
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        return TextEmbeddings(states, mask)

    __call__ = encode

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(dict(self._store), str(tmp), metadata={"encoder": self.name, "dim": str(self.dim)})
        tmp.replace(path)

    def load(self, path: str | Path) -> int:
        """Merge entries from a file written by :meth:`save` for the same encoder; returns how many."""
        path = Path(path)
        if not path.is_file():
            return 0
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("encoder") != self.name:
            raise TextokError(f"text cache {path} was written for encoder {meta.get('encoder')!r}, not {self.name!r}; "
                              "delete it or point to another cache file")
        entries = load_file(str(path))
        self._store.update(entries)
        return len(entries)

    def stats(self) -> str:
        return json.dumps({"entries": len(self), "hits": self.hits, "misses": self.misses})
