"""A directory of webdataset tar shards read as a source of images: for ``textok caption`` and for
``make-shards`` writing captioned shards from uncaptioned ones (ImageNet as ``{key}.jpg`` + ``{key}.cls``, or
textok's own shards).

Each tar's headers are read once into an index of its samples: the webdataset grouping (consecutive members with
the same key), each sample's image member as (offset, size) in its tar, and its label (``{key}.cls``, or
``"label"`` of ``{key}.json``). Only that index stays in memory (about 250 bytes a sample, measured by
benchmarks/reshard_memory.py); images are read one at a time with a seek, so a global seeded shuffle costs no
more memory than the source order. A directory with textok's ``index.json`` is read in its order and splits;
another ``index.json`` is not textok's and is ignored (the ``.tar`` files are read by name).

A sample is named ``<tar name>/<key>`` (e.g. ``train-000003.tar/n01440764_10026``): the ``file`` of its line in
captions.jsonl, which ``make-shards`` matches back. The split of a tar is the one ``index.json`` gives it, else
its name's prefix (``train-``, ``val_``, ...); a tar without one counts as ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..errors import TextokError
from .folder import SPLIT_ALIASES
from .images import IMAGE_SUFFIXES
from .shards import IMAGE_EXTS, INDEX, is_shard_dir

KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/suffix split of a member name


@dataclasses.dataclass(frozen=True, slots=True)
class ShardSample:
    tar: int  # index into ShardSource.tars
    key: str
    ext: str  # the image member's suffix (lower case)
    offset: int  # of the image's bytes in its tar
    size: int
    label: int | str | None  # from {key}.cls or {key}.json's "label"; None when it has none


def is_shard_source(path: str | Path) -> bool:
    """A directory of shards: it holds textok's ``index.json``, or ``.tar`` files at its top and neither images nor
    (non-hidden) sub-folders there (an image folder has class folders or images)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return False
    if is_shard_dir(root):
        return True
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return (any(p.is_file() and p.suffix == ".tar" for p in entries)
            and not any(p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES) for p in entries))


def split_of_tar(name: str) -> str:
    head = name.split("-", 1)[0].split("_", 1)[0].lower()
    return SPLIT_ALIASES.get(head, "train")


class ShardSource:
    """The shards of a directory (those of ``splits``, default all) and the index of their samples."""

    def __init__(self, root: str | Path, splits: tuple[str, ...] = ()) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise TextokError(f"shard directory {self.root} does not exist")
        self.class_names: list[str] = []
        tars = self._listed_tars()
        wanted = {SPLIT_ALIASES.get(s, s) for s in splits}
        if wanted:
            tars = [(name, split) for name, split in tars if split in wanted]
            if not tars:
                raise TextokError(f"{self.root} has no shards of the splits {', '.join(sorted(wanted))}")
        self.tars: list[tuple[str, str]] = tars  # (name, split), in reading order
        self.samples: list[ShardSample] = []
        self._by_file: dict[str, ShardSample] = {}
        for t, (name, _) in enumerate(tars):
            found = self._index_tar(t, name)
            if not found:
                raise TextokError(f"{self.root / name} is not a webdataset shard: it holds no image member "
                                  f"({{key}}.{', {key}.'.join(IMAGE_EXTS)}); move it out of the shard directory")
            self.samples += found

    def _listed_tars(self) -> list[tuple[str, str]]:
        index_path = self.root / INDEX
        if is_shard_dir(self.root):
            try:
                index = json.loads(index_path.read_text())
                entries = [(str(e["name"]), split) for split, shards in index["splits"].items() for e in shards]
            except (KeyError, TypeError, AttributeError):
                raise TextokError(f"{index_path} is corrupt (its splits are not lists of {{\"name\", \"count\"}}); "
                                  f"write it again: `textok make-shards {self.root} --out - --index-only`") from None
            self.class_names = [str(c) for c in index.get("class_names") or []]
            real_root = self.root.resolve()
            for name, _ in entries:
                path = self.root / name
                if not path.resolve().is_relative_to(real_root):
                    raise TextokError(f"{index_path}: shard {name!r} is outside the shard directory; a data set "
                                      "reads only files inside it: copy the shard in")
                if not path.is_file():
                    raise TextokError(f"{self.root}: shard {name} is listed in {INDEX} but missing; copy it back or "
                                      "write the index again (make-shards --index-only)")
            return entries
        names = sorted(p.name for p in self.root.glob("*.tar") if not p.name.startswith("."))
        if not names:
            raise TextokError(f"{self.root} holds no .tar shards")
        return [(name, split_of_tar(name)) for name in names]

    def _index_tar(self, t: int, name: str) -> list[ShardSample]:
        """The samples of one tar: headers read in order, labels read from their small members."""
        path = self.root / name
        groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    match = KEY_EXT.match(member.name) if member.isfile() else None
                    if match is None:
                        continue
                    key, ext = match[1], match[2].lower()
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}))
                    groups[-1][1].setdefault(ext, member)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise TextokError(f"{path} is not a readable tar ({err}); a shard is an uncompressed tar of "
                              "{key}.jpg (+ {key}.cls or {key}.json) members: copy it again or move it out") from None
        seen: set[str] = set()
        samples = []
        with open(path, "rb") as f:
            for key, members in groups:
                image = next((e for e in IMAGE_EXTS if e in members), None)
                if image is None:
                    continue
                if key in seen:
                    raise TextokError(f"{path}: the key {key!r} appears twice (members of one sample must lie "
                                      "together); write the shard with unique keys")
                seen.add(key)
                member = members[image]
                samples.append(ShardSample(t, key, image, member.offset_data, member.size, _label(f, members)))
        return samples

    # ---- reading -------------------------------------------------------------------------------
    def file_of(self, sample: ShardSample) -> str:
        """The sample's name in captions.jsonl: ``<tar name>/<key>``."""
        return f"{self.tars[sample.tar][0]}/{sample.key}"

    def split_of(self, sample: ShardSample) -> str:
        return self.tars[sample.tar][1]

    def sample(self, file: str) -> ShardSample:
        if not self._by_file:
            self._by_file = {self.file_of(s): s for s in self.samples}
        return self._by_file[file]

    def read(self, file: str) -> bytes:
        """The image bytes of the sample named ``file`` (``<tar name>/<key>``)."""
        return self.read_sample(self.sample(file))

    def read_sample(self, sample: ShardSample) -> bytes:
        with open(self.root / self.tars[sample.tar][0], "rb") as f:
            f.seek(sample.offset)
            data = f.read(sample.size)
        if len(data) != sample.size:
            raise OSError(f"{self.tars[sample.tar][0]} ends inside {sample.key}.{sample.ext}")
        return data


def _label(f: BinaryIO, members: dict[str, tarfile.TarInfo]) -> int | str | None:
    """``"label"`` of ``{key}.json`` (an integer id or a class name), else the integer in ``{key}.cls``; ``None``
    (no label) for -1, a missing or unreadable one."""
    label: int | str | None = None
    if "json" in members:
        try:
            meta = json.loads(_member_bytes(f, members["json"]))
            value = meta.get("label") if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            value = None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            label = value
    if label is None and "cls" in members:
        try:
            label = int(_member_bytes(f, members["cls"]).decode().strip())
        except (UnicodeDecodeError, ValueError):
            label = None
    return None if label == -1 or label == "" else label


def _member_bytes(f: BinaryIO, member: tarfile.TarInfo) -> bytes:
    f.seek(member.offset_data)
    return f.read(member.size)


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """``file`` -> captions of a captions.jsonl (``{"file", "captions" | "caption", ...}`` per line); a bad line is
    named with its number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextokError(f"captions file {path} does not exist")
    captions: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file = row["file"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise TextokError(f"{path} line {lineno} is not a JSON object with a 'file' key: {line[:80]!r}") from None
        caps = row.get("captions", row.get("caption"))
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(file, str) or not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise TextokError(f"{path} line {lineno}: 'file' must be a string and 'captions' a list of strings "
                              f"(or 'caption' one string): {line[:80]!r}")
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            raise TextokError(f"{path} line {lineno} ({file}) has no caption: every image needs at least one")
        captions[file] = caps
    return captions


__all__ = ["ShardSample", "ShardSource", "is_shard_source", "read_captions", "split_of_tar"]
