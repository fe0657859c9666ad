"""Captioning a data set with a VLM, resumable and shared across processes (``textok caption``).

The images of a folder or tar (``[split/]<class>/<image>``, as :mod:`textok.data.folder` reads them), or of a
directory of webdataset shards (:mod:`textok.data.shard_source`: each sample named ``<tar name>/<key>``), are cut
into fixed batches in path order; batch ``j`` belongs to process ``j % world``. Every process appends its
finished batches to its own part file (one write and an fsync per batch) in a work directory beside the
output, so a kill at any moment loses at most the batch in flight: a re-run reads every part, skips the images
they hold and redoes only the rest. Batches do not depend on the number of processes, and each is seeded by
its own index, so any split of the work writes the same captions. When every image is done one merge step
writes ``captions.jsonl`` (path order, atomically) and removes the work directory.

Each output line is ``{"file", "captions": [...], "label"?}`` with the class folder's name as the label (a
shard sample's own label): exactly what :class:`textok.data.folder.ImageCaptionFolder` and ``make-shards`` read.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import shutil
import string
from pathlib import Path
from typing import Any, Iterable, Protocol

from PIL import Image

from ..distributed import DistInfo, any_rank, barrier
from ..errors import TextokError
from ..io import atomic_write_text
from ..progress import progress_bar
from .folder import SPLIT_ALIASES, _Source, _split_of
from .images import IMAGE_SUFFIXES, to_rgb
from .shard_source import ShardSource, is_shard_source

PROMPT_FIELDS = {"class_name": "the class's name (from the class-name map, else the folder name)",
                 "class_id": "the class folder's name (e.g. an ImageNet synset id)",
                 "file": "the image's path (<tar name>/<key> in shards)"}
CLASS_MAP_NAMES = ("classes.txt", "synsets.txt", "LOC_synset_mapping.txt", "imagenet_class_index.json")
SETTINGS = "settings.json"


@dataclasses.dataclass(frozen=True)
class ImageItem:
    file: str  # path inside the source (<tar name>/<key> in shards)
    class_id: str | None  # the class folder, None for an image outside class folders
    label: int | str | None = None  # written as the line's label: a shard sample's own; else the class folder


def list_images(source: str | Path, splits: tuple[str, ...] = (),
                class_names: dict[str, str] | None = None) -> tuple[_Source | ShardSource, list[ImageItem]]:
    """The images of a folder, tar or shard directory in path order, with their classes; ``splits`` keeps only
    those. ``class_names`` resolves the integer labels of shards (see :func:`shard_class_id`)."""
    root = Path(source).expanduser()
    if not root.exists():
        raise TextokError(f"data {root} does not exist")
    if is_shard_source(root):
        shards = ShardSource(root, splits)
        return shards, [ImageItem(shards.file_of(s), shard_class_id(s.label, shards.class_names, class_names), s.label)
                        for s in shards.samples]
    src = _Source(root)
    wanted = {SPLIT_ALIASES.get(s, s) for s in splits}
    names = [n for n in src.names if n.lower().endswith(IMAGE_SUFFIXES) and not _hidden(n)]
    has_splits = any(_split_of(n) for n in names)
    items = []
    for name in names:
        parts = name.split("/")
        if has_splits:
            if wanted and _split_of(name) not in wanted:
                continue
            parts = parts[1:]
        items.append(ImageItem(name, parts[-2] if len(parts) > 1 else None))
    if root.is_dir():
        _check_class_folders(root, has_splits, wanted, {i.class_id for i in items})
    if not items:
        raise TextokError(f"{root} holds no images{' in the splits ' + ', '.join(sorted(wanted)) if wanted else ''} "
                          f"(looked for {', '.join(IMAGE_SUFFIXES)}, or a directory of webdataset .tar shards)")
    return src, items


def shard_class_id(label: int | str | None, index_names: list[str], class_names: dict[str, str] | None) -> str | None:
    """The class a shard label stands for: a class name as it is; an integer id through the shard index's class
    names, else the class-name map's own entry for it (``"3"``), else the map's entry at that place (ImageNet's
    LOC_synset_mapping.txt and imagenet_class_index.json list the classes in id order), else the id itself."""
    if label is None or isinstance(label, str):
        return label
    if 0 <= label < len(index_names):
        return index_names[label]
    if class_names and str(label) not in class_names and 0 <= label < len(class_names):
        return list(class_names)[label]
    return str(label)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _check_class_folders(root: Path, has_splits: bool, wanted: set[str], found: set[str | None]) -> None:
    """A class folder without a single image is a mistake worth a line (an ImageNet class lost in a copy)."""
    parents = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if has_splits:
        parents = [d for d in parents if SPLIT_ALIASES.get(d.name.lower()) and
                   (not wanted or SPLIT_ALIASES[d.name.lower()] in wanted)]
        folders = [c for d in parents for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    else:
        folders = parents
    for folder in sorted(folders):
        if not any(p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) for p in folder.rglob("*")):
            raise TextokError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add its "
                              "images or remove the folder")


def read_class_names(path: str | Path) -> dict[str, str]:
    """A class-name map: JSON ``{folder: name}`` or ``{"0": [folder, name]}`` (imagenet_class_index.json), or
    text lines ``<folder> <name>`` (LOC_synset_mapping.txt). ImageNet names list synonyms; the first is kept."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextokError(f"class-name map {path} does not exist")
    text = path.read_text(encoding="utf-8")
    names: dict[str, str] = {}
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TextokError(f"class-name map {path} is not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise TextokError(f"class-name map {path} must be a JSON object {{folder: name}}")
        for key, value in data.items():
            if isinstance(value, list) and len(value) == 2:
                key, value = value
            if not isinstance(value, str):
                raise TextokError(f"class-name map {path}: entry {key!r} is not a name (a string)")
            names[str(key)] = value
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                folder, _, name = line.strip().partition(" ")
                if not name.strip():
                    raise TextokError(f"class-name map {path} line {lineno} is not '<folder> <name>': {line[:80]!r}")
                names[folder] = name.strip()
    return {k: v.split(",")[0].strip() for k, v in names.items()}


def find_class_map(source: str | Path) -> Path | None:
    """A class-name map at the root of a source folder (``classes.txt``, ``synsets.txt``, ...), if any."""
    root = Path(source).expanduser()
    if root.is_dir():
        for name in CLASS_MAP_NAMES:
            if (root / name).is_file():
                return root / name
    return None


def check_templates(templates: list[str], items: list[ImageItem], class_names: dict[str, str] | None) -> None:
    """Refuse a template with a field that does not exist, or that needs a class the images do not have."""
    if not templates:
        raise TextokError("give at least one --prompt")
    for template in templates:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as err:
            raise TextokError(f"prompt template {template!r} is malformed ({err}); write fields as {{class_name}} "
                              "and a literal brace as {{ or }}") from None
        unknown = sorted(f for f in fields if f not in PROMPT_FIELDS)
        if unknown:
            raise TextokError(f"prompt template {template!r} uses the field {{{unknown[0]}}}, which does not exist; "
                              f"the fields are {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
        if fields & {"class_name", "class_id"}:
            loose = next((i.file for i in items if i.class_id is None), None)
            if loose is not None:
                raise TextokError(f"prompt template {template!r} needs a class, but {loose} is not in a class folder "
                                  "(nor a shard sample with a label); use a template without "
                                  "{class_name}/{class_id} or keep to class folders (--splits)")
    if class_names is not None:
        folders = sorted({i.class_id for i in items if i.class_id is not None})
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise TextokError(f"the class-name map does not name the class folder {missing[0]!r} ({len(missing)} of "
                              f"{len(folders)} folders missing); add a line for each folder or fix the map")


def render_prompt(template: str, item: ImageItem, class_names: dict[str, str] | None) -> str:
    class_id = item.class_id or ""
    name = class_names[class_id] if class_names and class_id in class_names else class_id.replace("_", " ")
    return template.format(class_name=name, class_id=class_id, file=item.file)


def open_image(data: bytes) -> Image.Image:
    """Encoded bytes -> an RGB PIL image at its own size (the VLM's processor resizes)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img).copy()


def caption_seed(seed: int, batch: int, k: int, attempt: int = 0) -> int:
    """The sampling seed of caption ``k`` of batch ``batch``: the same in any process, on any re-run."""
    digest = hashlib.sha256(f"{seed}/{batch}/{k}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


# ---- the work directory: settings + append-only part files --------------------------------------------------
def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.caption"


def read_part(path: Path) -> list[dict]:
    """The complete lines of a part file; a torn last line (a kill during its write) is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # only the unfinished tail can fail: every complete line was written whole
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("file"), str)]


def done_records(work: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for part in sorted(work.glob("part-*.jsonl")):
        for row in read_part(part):
            records.setdefault(row["file"], row)
    return records


class PartWriter:
    """One process's append-only part file: whole lines, one write + fsync per batch."""

    def __init__(self, path: Path) -> None:
        if path.is_file():  # cut a torn tail so the next line starts on a line of its own
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rows: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        if data:
            os.write(self.fd, data)
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def open_work_dir(out: Path, settings: dict) -> Path:
    """Create the work directory with its settings, or reopen it when they match (a resumed run)."""
    work = work_dir_for(out)
    if work.is_dir() and (work / SETTINGS).is_file():
        before = json.loads((work / SETTINGS).read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise TextokError(f"an unfinished captioning run in {work} used other settings ({', '.join(changed)}); "
                              f"run it with the same settings to finish it, or delete {work} to start over")
        return work
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / SETTINGS, json.dumps(settings, indent=1) + "\n")
    return work


def merge(items: list[ImageItem], work: Path, out: Path) -> dict:
    """Every part into ``out`` in path order (atomically), then the work directory is removed; returns the report."""
    records = done_records(work)
    missing = [i.file for i in items if i.file not in records]
    if missing:
        raise TextokError(f"{len(missing)} images have no captions yet (first: {missing[0]}); a process stopped "
                          "early: run the same command again to finish")
    lines, failed = [], []
    for item in items:
        row = records[item.file]
        if "error" in row:
            failed.append((item.file, row["error"]))
            continue
        line = {"file": item.file, "captions": row["captions"]}
        label = item.label if item.label is not None else item.class_id
        if label is not None:
            line["label"] = label
        lines.append(line)
    if not lines:
        raise TextokError(f"no image could be captioned ({len(failed)} failed, first: {failed[0][0]}: "
                          f"{failed[0][1]}); {work} keeps the record")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    shutil.rmtree(work, ignore_errors=True)
    return caption_report(lines, failed)


def caption_report(lines: list[dict], failed: list[tuple[str, str]], top: int = 5) -> dict:
    """What a glance should catch: captions per image, their lengths, a VLM stuck on one sentence, failures."""
    per_image = [len(r["captions"]) for r in lines]
    words = sorted(len(c.split()) for r in lines for c in r["captions"])
    counts = collections.Counter(c for r in lines for c in r["captions"])

    def q(p: float) -> int:
        return words[min(len(words) - 1, int(p * len(words)))]

    return {"images": len(lines), "captions": len(words),
            "captions_per_image": {"min": min(per_image), "mean": sum(per_image) / len(per_image),
                                   "max": max(per_image)},
            "words": {"min": words[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": words[-1]},
            "distinct_captions": len(counts),
            "most_frequent": [{"caption": c, "count": n} for c, n in counts.most_common(top)],
            "failed": [{"file": f, "why": why} for f, why in failed]}


def caption_batches(items: list[ImageItem], batch_size: int, rank: int, world: int,
                    done: set[str]) -> list[tuple[int, list[ImageItem]]]:
    """This process's unfinished batches: batch ``j`` (a fixed slice in path order) when ``j % world == rank``."""
    out = []
    for j in range(rank, (len(items) + batch_size - 1) // batch_size, world):
        batch = items[j * batch_size:(j + 1) * batch_size]
        if any(i.file not in done for i in batch):
            out.append((j, batch))
    return out


class Captioner(Protocol):
    def caption(self, images: list[Image.Image], prompts: list[str], *, sample: bool = ..., seed: int | None = ...,
                **kw: Any) -> list[str]: ...


def caption_dataset(source: str | Path, out: str | Path, captioner: Captioner, templates: list[str], *,
                    captions_per_image: int = 1, sample: bool = True, seed: int = 0, batch_size: int = 8,
                    class_names: dict[str, str] | None = None, splits: tuple[str, ...] = (),
                    on_empty: str = "error", settings: dict | None = None, info: DistInfo | None = None,
                    progress: bool = True, **generate: Any) -> dict | None:
    """Caption every image of ``source`` into ``out`` (see the module docstring); returns the report on the
    main process (``None`` on the others). ``settings`` identify the run: a re-run with others is refused."""
    info = info or DistInfo()
    out = Path(out).expanduser()
    if batch_size < 1 or captions_per_image < 1:
        raise TextokError("--batch-size and --captions-per-image must be at least 1")
    if not sample and captions_per_image > len(templates):
        raise TextokError(f"greedy decoding writes the same caption for the same prompt: {captions_per_image} "
                          f"captions per image need as many --prompt (got {len(templates)}), or sampling")
    work = work_dir_for(out)
    if out.exists() and not work.is_dir():
        raise TextokError(f"{out} already exists (captions written before, or a file of yours); give another --out "
                          "or move it away")
    src, items = list_images(source, splits, class_names)
    check_templates(templates, items, class_names)
    work = open_work_dir(out, dict(settings or {}, captions_per_image=captions_per_image, sample=sample, seed=seed,
                                   prompts=list(templates), **generate))
    done = done_records(work)
    batches = caption_batches(items, batch_size, info.rank, info.world, set(done))
    writer = PartWriter(work / f"part-{info.rank:05d}.jsonl")
    bar = progress_bar(total=sum(len(b) for _, b in batches), desc="caption", unit="img",
                       disable=None if (progress and info.is_main) else True)
    failure = None
    try:
        for j, batch in batches:
            rows, failure = _caption_batch(captioner, src, j, batch, templates, class_names, captions_per_image,
                                           sample, seed, on_empty, generate)
            writer.write(r for r in rows if r["file"] not in done)
            bar.update(len(batch))
            if failure:
                break
    finally:
        writer.close()
        bar.close()
    if any_rank(failure is not None, info):
        if failure:
            file, prompt = failure
            raise TextokError(f"the VLM wrote an empty caption for {file} (prompt {prompt!r}); the images captioned "
                              f"so far are kept in {work}; re-run with --on-empty skip to leave such images out, or "
                              "change the prompt or --max-new-tokens")
        raise TextokError("another process stopped on an empty caption (see its message); what was captioned is kept")
    barrier(info)
    return merge(items, work, out) if info.is_main else None


def _caption_batch(captioner: Captioner, src: _Source | ShardSource, j: int, batch: list[ImageItem],
                   templates: list[str], class_names: dict[str, str] | None, per_image: int, sample: bool, seed: int,
                   on_empty: str, generate: dict) -> tuple[list[dict], tuple[str, str] | None]:
    """Rows for one batch (captions, or the reason an image has none) and the first empty caption, if that stops
    the run. An empty sampled caption is drawn again, alone, up to twice."""
    rows, images, good = [], [], []
    for item in batch:
        try:
            images.append(open_image(src.read(item.file)))
            good.append(item)
        except Exception:  # a corrupt or unreadable file: named in the report, never a crash
            rows.append({"file": item.file, "error": "cannot be decoded"})
    captions: list[list[str]] = [[] for _ in good]
    empty: list[str | None] = [None] * len(good)
    for k in range(per_image if good else 0):
        prompts = [render_prompt(templates[k % len(templates)], item, class_names) for item in good]
        drawn = captioner.caption(images, prompts, sample=sample, seed=caption_seed(seed, j, k), **generate)
        for i, caption in enumerate(drawn):
            for attempt in range(1, 3 if sample else 1):
                if caption:
                    break
                caption = captioner.caption([images[i]], [prompts[i]], sample=True,
                                            seed=caption_seed(seed, j, k, attempt), **generate)[0]
            if not caption and empty[i] is None:
                empty[i] = prompts[i]
            captions[i].append(caption)
    failure = None
    for item, caps, prompt in zip(good, captions, empty):
        if prompt is None:
            rows.append({"file": item.file, "captions": caps})
        elif on_empty == "skip":
            rows.append({"file": item.file, "error": f"empty caption (prompt {prompt!r})"})
        elif failure is None:
            failure = (item.file, prompt)
    return rows, failure


__all__ = ["ImageItem", "PartWriter", "caption_batches", "caption_dataset", "caption_report", "caption_seed", "check_templates",
           "done_records", "find_class_map", "list_images", "merge", "open_image", "open_work_dir",
           "read_class_names", "render_prompt", "shard_class_id", "work_dir_for"]
