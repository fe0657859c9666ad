"""A cache of text embeddings keyed by (encoder, caption), so training never encodes a caption twice.

Entries are stored trimmed to their real length (no padding) in float16 on the CPU; ``encode`` pads a batch
to its longest caption. The cache can be written to and read from a safetensors file so that a dataset's
captions are encoded once across runs.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import TextokError
from ..io import atomic_file
from ..progress import progress_bar
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

    def warm(self, captions: Iterable[str], progress: bool = False, save_to: str | Path | None = None,
             save_every_s: float = 60.0) -> None:
        """Encode every caption not yet cached, in batches.

        With ``save_to``, what is encoded is saved there every ``save_every_s`` seconds, when done, and when the
        encoding is interrupted (Ctrl-C / SIGTERM), so a long encode killed part-way keeps what it did.
        """
        todo = sorted({c for c in check_captions(list(captions)) if caption_key(self.name, c) not in self._store})
        if not todo:
            return
        it = range(0, len(todo), self.batch_size)
        if progress:
            it = progress_bar(it, desc=f"encoding captions ({self.name})", unit="batch")
        last_save = time.monotonic()
        try:
            for start in it:
                chunk = todo[start : start + self.batch_size]
                emb = self.encoder.encode(chunk)
                lengths = emb.mask.sum(1).tolist()
                for caption, states, n in zip(chunk, emb.states, lengths):
                    self._store[caption_key(self.name, caption)] = states[: int(n)].to("cpu", self.dtype).clone()
                self.misses += len(chunk)
                if save_to is not None and time.monotonic() - last_save > save_every_s:
                    self.save(save_to)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            if save_to is not None:
                self.save(save_to)
            raise
        if save_to is not None:
            self.save(save_to)

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
        """Write every entry to ``path`` atomically (a temporary file renamed into place)."""
        with atomic_file(path) as tmp:
            save_file(dict(self._store), str(tmp), metadata={"encoder": self.name, "dim": str(self.dim)})

    def load(self, path: str | Path) -> int:
        """Merge entries from a file written by :meth:`save` for the same encoder; returns how many.

        A damaged file (truncated by a kill or a full disk) is reported and ignored: its captions are encoded
        again and the file is rewritten.
        """
        path = Path(path)
        if not path.is_file():
            return 0
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("encoder") == self.name:
                entries = load_file(str(path))
        except (SafetensorError, OSError) as err:
            if path.suffix != ".safetensors":  # maybe not a cache at all: never overwrite what textok did not write
                raise TextokError(f"text cache {path} is not a textok text cache; point text_cache= to a "
                                  ".safetensors file (a new one is created)") from None
            warnings.warn(f"text cache {path} is corrupt ({str(err).split(': ', 1)[-1]}); its captions are encoded "
                          "again and the file is rewritten", stacklevel=2)
            return 0
        if meta.get("encoder") != self.name:
            raise TextokError(f"text cache {path} was written for encoder {meta.get('encoder')!r}, not {self.name!r}; "
                              "delete it or point to another cache file")
        self._store.update(entries)
        return len(entries)

    def stats(self) -> str:
        return json.dumps({"entries": len(self), "hits": self.hits, "misses": self.misses})
