"""Real data: an image folder or tar archive with captions or class labels.

Layouts understood:

* ``captions.jsonl`` at the root (or given by path): one ``{"file", "caption" | "captions", "label"?,
  "split"?}`` per line. Flickr8k's five human captions per photo use ``"captions"``.
* class folders: ``[split/]<class>/<image>``; captions then come from per-class caption banks (a JSON
  ``{class_name: [captions]}``), or from generic templates when no bank is given.
* the split is the top-level folder (``train/``, ``val/``, ``dev/``, ``test/``) or the JSONL ``split``
  field; ``dev`` and ``val`` are the same split.

A plain ``.tar`` is read member by member through a header index (only names and offsets stay in memory);
a compressed one (``.tar.gz``, ``.tgz``) is read once into memory.

A data set reads only what lies inside it: a file whose path, symbolic links followed, leaves the folder, and
an archive member whose name or link target leaves the archive, are refused in one line (a link between two
members of the archive is followed). For data sets too large for either, write
streaming shards (``textok make-shards``, :mod:`textok.data.shards`). A listed file that does not exist is
left out when the data set is opened, with a warning that counts them (``missing``); a file that cannot be
decoded is skipped: the item comes back as ``None``, :func:`collate` drops it and counts it in
``batch["skipped"]``.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import TextokError
from ..io import read_json
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
            try:
                self._index_tar(root)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                raise TextokError(f"data {root} is a truncated or damaged tar archive ({err}); copy it again, or "
                                  "write it anew") from None
            self.names = sorted(self._offsets if self._offsets is not None else self._blobs)
        else:
            raise TextokError(f"data {root} is neither a directory nor a tar archive")

    def _index_tar(self, root: Path) -> None:
        """Member name -> (offset, size) of a plain tar, or -> bytes of a compressed one. A link between
        members reads its target; a name or link that leaves the archive is refused."""
        plain = _is_plain_tar(root)
        links: dict[str, str] = {}
        with tarfile.open(root) as tar:
            if plain:
                self._offsets = {}
            else:
                self._blobs = {}
            for m in tar:
                name = _member_name(m, root)
                if m.issym() or m.islnk():
                    base = posixpath.dirname(name) if m.issym() else ""
                    links[name] = _inside_archive(posixpath.join(base, m.linkname), root, f"link {name!r} -> ")
                elif m.isfile() and plain:
                    self._offsets[name] = (m.offset_data, m.size)
                elif m.isfile():
                    f = tar.extractfile(m)
                    self._blobs[name] = f.read() if f else b""
        table = self._offsets if plain else self._blobs
        for name, target in links.items():
            for _ in range(len(links)):  # a link to a link: follow it (a cycle ends unresolved)
                target = links.get(target, target)
            if target in table:
                table[name] = table[target]  # type: ignore[index]

    def check_inside(self, names: list[str]) -> None:
        """Refuse a name whose file, symbolic links followed, lies outside the data folder (an archive's names
        and links were checked when it was indexed)."""
        if not self.root.is_dir():
            return
        real_root = self.root.resolve()
        parents: dict[str, Path] = {}
        for name in names:
            head, _, base = name.rpartition("/")
            if head not in parents:
                parents[head] = (self.root / head).resolve()
            path = parents[head] / base
            if path.is_symlink():
                path = path.resolve()
            if not path.is_relative_to(real_root):
                raise TextokError(f"data {self.root}: file {name!r} is outside the dataset (a symbolic link leads to "
                                  f"{path}); a data set reads only files inside its folder: copy the file in instead "
                                  "of linking to it")

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


def _member_name(member: tarfile.TarInfo, archive: Path) -> str:
    return _inside_archive(member.name, archive, "member ")


def _inside_archive(name: str, archive: Path, what: str) -> str:
    """``name`` normalised relative to the archive's root, refused when it leaves it (absolute, or ``..``)."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or re.match(r"^[A-Za-z]:", norm):
        raise TextokError(f"data {archive}: {what}{name!r} is outside the archive; a data set reads only what lies "
                          "inside it: write the archive with relative names and no links out of it")
    return norm


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
        self.source.check_inside([rec["file"] for rec in records])
        missing = [rec["file"] for rec in records if not self.source.exists(rec["file"])]
        if missing:  # told apart from undecodable files: the fix differs (the paths, not the images)
            if len(missing) == len(records):
                raise TextokError(f"none of the {len(records)} images listed for split {self.split!r} of {self.root} "
                                  f"exist (first: {missing[0]!r}); check the paths in captions.jsonl")
            warnings.warn(f"{len(missing)} of the {len(records)} images listed for split {self.split!r} of "
                          f"{self.root} do not exist (first: {missing[0]!r}); they are left out", stacklevel=2)
            gone = set(missing)
            records = [rec for rec in records if rec["file"] not in gone]
        self.missing = len(missing)
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
            self.source.check_inside(["captions.jsonl"])
            where, raw = f"{self.root}/captions.jsonl", self.source.read("captions.jsonl")
        else:
            return None
        records, labels, top_int_label = [], {}, -1
        first_of_kind: dict[str, tuple[int, object]] = {}  # "a class name" / "an integer id" -> (line, label)
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
            # Labels are read over every split, so that all splits agree on the ids: class names are numbered in
            # the order they first appear in the file; names and integer ids in one file are refused (a name
            # numbered 0 and the id 0 would be merged into one class).
            label = row.get("label", -1)
            if isinstance(label, float) and label.is_integer():
                label = int(label)
            if isinstance(label, str):
                first_of_kind.setdefault("a class name", (lineno, label))
                label = labels.setdefault(label, len(labels))
            elif isinstance(label, bool) or not isinstance(label, int):
                raise TextokError(f"captions line {lineno} ({name}): 'label' must be a class name or an integer "
                                  f"id, not {label!r:.80}")
            elif label != -1:
                first_of_kind.setdefault("an integer id", (lineno, label))
                top_int_label = max(top_int_label, label)
            if len(first_of_kind) == 2:
                (kind_a, (line_a, value_a)), (kind_b, (line_b, value_b)) = sorted(
                    first_of_kind.items(), key=lambda kv: kv[1][0])
                raise TextokError(f"captions line {line_b} ({name}): label {value_b!r} is {kind_b}, but line {line_a} "
                                  f"gave {kind_a} ({value_a!r}); use class names or integer ids throughout the file, "
                                  "not both (they would be merged into the same classes)")
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
        where = "caption bank" if isinstance(caption_bank, dict) else f"caption bank {caption_bank}"
        if isinstance(caption_bank, dict):
            bank = caption_bank
        elif not Path(caption_bank).is_file():
            raise TextokError(f"{where} does not exist: give a JSON file {{class name: [captions]}}")
        else:
            bank = read_json(caption_bank, where)
        if not isinstance(bank, dict) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in bank.values()):
            raise TextokError(f"{where} must be a JSON object {{class name: [captions, ...]}}, not {bank!r:.80}; "
                              "write one list of caption strings per class folder")
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
