"""Real data: an image folder or tar archive with captions or class labels.

Layouts understood:

* ``captions.jsonl`` at the root (or given by path): one ``{"file", "caption" | "captions", "label"?,
  "split"?}`` per line. Flickr8k's five human captions per photo use ``"captions"``.
* class folders: ``[split/]<class>/<image>``; captions then come from per-class caption banks (a JSON
  ``{class_name: [captions]}``), or from generic templates when no bank is given.
* the split is the top-level folder (``train/``, ``val/``, ``dev/``, ``test/``) or the JSONL ``split``
  field; ``dev`` and ``val`` are the same split.

A plain ``.tar`` is read member by member through a header index (only names and offsets stay in memory);
a compressed one (``.tar.gz``, ``.tgz``) is read once into memory. For data sets too large for either, write
streaming shards (``textok make-shards``, :mod:`textok.data.shards`). A file that
cannot be decoded is skipped: the item comes back as ``None``, :func:`collate` drops it and counts it in
``batch["skipped"]``.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Any

import torch

from ..errors import TextokError
from .images import IMAGE_SUFFIXES, decode_image

SPLIT_ALIASES = {"val": "val", "dev": "val", "valid": "val", "validation": "val", "train": "train", "test": "test"}
DEFAULT_TEMPLATES = ("a photo of {a} {c}.", "a picture of {a} {c}.", "an image showing {a} {c}.",
                     "a close-up photo of {a} {c}.", "{A} {c} in a natural setting.")


class _Source:
    """Uniform access to a directory or a tar archive: names and bytes.

    A plain ``.tar`` is indexed by its headers (name -> byte offset and size) and read member by member with a
    seek, so a large archive never sits in RAM; a compressed one (``.tar.gz``) cannot seek and is read whole.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs: dict[str, bytes] | None = None
        self._offsets: dict[str, tuple[int, int]] | None = None
        if root.is_dir():
            self.names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        elif root.is_file() and tarfile.is_tarfile(root):
            with tarfile.open(root) as tar:
                if _is_plain_tar(root):
                    self._offsets = {_member_name(m): (m.offset_data, m.size) for m in tar if m.isfile()}
                else:
                    self._blobs = {}
                    for m in tar:
                        if m.isfile():
                            f = tar.extractfile(m)
                            self._blobs[_member_name(m)] = f.read() if f else b""
            self.names = sorted(self._offsets if self._offsets is not None else self._blobs)
        else:
            raise TextokError(f"data {root} is neither a directory nor a tar archive")

    def read(self, name: str) -> bytes:
        if self._blobs is not None:
            return self._blobs[name]
        if self._offsets is not None:
            offset, size = self._offsets[name]
            with open(self.root, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        if self._blobs is not None:
            return name in self._blobs
        if self._offsets is not None:
            return name in self._offsets
        return (self.root / name).is_file()


def _member_name(member: tarfile.TarInfo) -> str:
    return member.name[2:] if member.name.startswith("./") else member.name


def _is_plain_tar(path: Path) -> bool:
    """An uncompressed tar (seekable member by member): not gzip/bz2/xz magic bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    return not (head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ"))


def _template(template: str, name: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(a=article, A=article.capitalize(), c=name)


def _split_of(name: str) -> str | None:
    head = name.split("/", 1)[0]
    return SPLIT_ALIASES.get(head.lower()) if "/" in name else None


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images + captions + labels from a folder or tar. Items: ``{"image", "captions", "label", "index"}``."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 64,
                 captions_file: str | Path | None = None, caption_bank: str | Path | dict | None = None,
                 limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise TextokError(f"data {self.root} does not exist")
        self.split = SPLIT_ALIASES.get(split, split)
        self.image_size = image_size
        self.source = _Source(self.root)
        records = self._records_from_jsonl(captions_file)
        if records is None:
            records = self._records_from_folders(caption_bank)
        if not records:
            raise TextokError(f"no images of split {split!r} found in {self.root}")
        if limit is not None:
            records = records[:limit]
        self.records = records
        self.skipped = 0

    # ---- discovery -----------------------------------------------------------------------------
    def _records_from_jsonl(self, captions_file: str | Path | None) -> list[dict] | None:
        if captions_file is not None:
            path = Path(captions_file)
            if not path.is_file():
                raise TextokError(f"captions file {path} does not exist")
            where, raw = str(path), path.read_bytes()
        elif self.source.exists("captions.jsonl"):
            where, raw = f"{self.root}/captions.jsonl", self.source.read("captions.jsonl")
        else:
            return None
        records, labels, top_int_label = [], {}, -1
        for lineno, line_bytes in enumerate(raw.splitlines(), 1):
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TextokError(f"{where} line {lineno} is not UTF-8 text (byte {line_bytes[err.start]:#04x} at "
                                  f"column {err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TextokError(f"captions line {lineno} is not a JSON object with a 'file' key: {line[:80]!r}") from None
            if not isinstance(name, str) or not name.strip():
                raise TextokError(f"captions line {lineno}: 'file' must be a path (a string), not {name!r}")
            name = self._inside_root(name, lineno)
            row_split = SPLIT_ALIASES.get(str(row.get("split", "")), None) or _split_of(name)
            if type(row.get("label")) is int:  # integer ids count over every split, so all splits agree
                top_int_label = max(top_int_label, row["label"])
            if row_split is not None and row_split != self.split:
                continue
            caps = row.get("captions", row.get("caption"))
            caps = [caps] if isinstance(caps, str) else (caps or [])
            if not isinstance(caps, list) or any(not isinstance(c, str) for c in caps):
                raise TextokError(f"captions line {lineno} ({name}): 'captions' must be a list of strings (or "
                                  f"'caption' one string), not {caps!r:.80}")
            caps = [c.strip() for c in caps if c.strip()]
            if not caps:
                raise TextokError(f"captions line {lineno} ({name}) has no caption: every image needs at least one")
            label = row.get("label", -1)
            if isinstance(label, str):
                label = labels.setdefault(label, len(labels))
            elif isinstance(label, float) and label.is_integer():
                label = int(label)
            elif isinstance(label, bool) or not isinstance(label, int):
                raise TextokError(f"captions line {lineno} ({name}): 'label' must be a class name or an integer "
                                  f"id, not {label!r:.80}")
            records.append({"file": name, "captions": caps, "label": label})
        # Class names: the names given, else the ids 0..max as strings (Flowers-102 labels 0-101).
        self.class_names = (sorted(labels, key=labels.get) if labels
                            else [str(k) for k in range(top_int_label + 1)])
        return records

    def _inside_root(self, name: str, lineno: int) -> str:
        """``name`` relative to the dataset root, refused when it points outside it (absolute, or ``..``)."""
        norm = posixpath.normpath(name.replace("\\", "/"))
        if norm.startswith("./"):
            norm = norm[2:]
        if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or re.match(r"^[A-Za-z]:", norm):
            raise TextokError(f"captions line {lineno}: file {name!r} is outside the dataset {self.root}; "
                              "paths in captions.jsonl are relative to the dataset's root and stay inside it")
        return norm

    def _records_from_folders(self, caption_bank: str | Path | dict | None) -> list[dict]:
        images = [n for n in self.source.names if n.lower().endswith(IMAGE_SUFFIXES)]
        has_splits = any(_split_of(n) for n in images)
        if has_splits:
            images = [n for n in images if _split_of(n) == self.split]
        class_of = {}
        for n in images:
            parts = n.split("/")
            parts = parts[1:] if has_splits else parts
            class_of[n] = parts[-2] if len(parts) > 1 else None
        names = sorted({c for c in class_of.values() if c is not None})
        self.class_names = names
        bank = self._load_bank(caption_bank, names)
        return [{"file": n, "captions": bank[class_of[n]] if class_of[n] else ["a photo."],
                 "label": names.index(class_of[n]) if class_of[n] else -1} for n in images]

    @staticmethod
    def _load_bank(caption_bank: str | Path | dict | None, names: list[str]) -> dict[str, list[str]]:
        if caption_bank is None:
            return {c: [_template(t, c.replace("_", " ")) for t in DEFAULT_TEMPLATES] for c in names}
        bank = caption_bank if isinstance(caption_bank, dict) else json.loads(Path(caption_bank).read_text())
        missing = [c for c in names if not bank.get(c)]
        if missing:
            raise TextokError(f"caption bank has no captions for class {missing[0]!r}: add a list of captions for it")
        return {c: list(bank[c]) for c in names}

    # ---- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        try:
            image = decode_image(self.source.read(rec["file"]), self.image_size)
        except Exception:  # a corrupt or unreadable file: skipped by collate, counted, never a crash
            self.skipped += 1
            return None
        return {"image": image, "captions": rec["captions"], "label": rec["label"], "index": index}

    def captions_of(self, index: int) -> list[str]:
        """The captions of item ``index`` without decoding its image."""
        return self.records[index]["captions"]

    def label_of(self, index: int) -> int:
        """The class id of item ``index`` (-1 = none) without decoding its image."""
        return int(self.records[index]["label"])

    def caption_bank(self) -> dict[int, list[str]]:
        bank: dict[int, list[str]] = {}
        for rec in self.records:
            if rec["label"] >= 0:
                bank.setdefault(rec["label"], []).extend(rec["captions"])
        return bank


def collate(items: list[dict | None]) -> dict[str, Any]:
    """Stack a batch, dropping items that failed to decode; ``skipped`` counts them."""
    good = [it for it in items if it is not None]
    if not good:
        return {"image": torch.empty(0), "captions": [], "label": torch.empty(0, dtype=torch.long),
                "index": torch.empty(0, dtype=torch.long), "skipped": len(items)}
    return {
        "image": torch.stack([it["image"] for it in good]),
        "captions": [it["captions"] for it in good],
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": len(items) - len(good),
    }
