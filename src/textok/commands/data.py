"""Verbs that prepare data at scale: ``make-shards`` (images -> streaming shards) and ``encode-captions``
(captions -> the memory-mapped text-state store)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.factory import build_dataset
from ..data.make_shards import index_shards, make_shards
from ..data.shards import INDEX, ShardSet, is_shard_dir, read_shard
from ..devices import resolve_device
from ..errors import TextokError
from ..io import check_output
from ..report import print_table
from ..text.encoders import encoder_name, load_text_encoder
from ..text.store import TextStateStore, default_store_dir
from ..train.data_source import captions_of


def make_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an image folder or tar (captions.jsonl inside, or --captions, or class folders), "
                                  "or a directory of webdataset shards with the captions `textok caption` wrote for "
                                  "it (SOURCE/captions.jsonl, or --captions)")
    p.add_argument("--out", required=True, help="the shard directory to write (<split>-NNNNNN.tar + index.json)")
    p.add_argument("--captions", default=None, help="a captions.jsonl outside the data")
    p.add_argument("--caption-bank", default=None, help="a {class_name: [captions]} JSON for class folders")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write (those present)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="center-crop and resize to this many pixels, stored as JPEG (default: copy the bytes)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: a seeded shuffle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-only", action="store_true",
                   help="SOURCE is a directory of existing webdataset shards: count them and write its index.json")
    p.add_argument("--no-progress", action="store_true")


def cmd_make_shards(args: argparse.Namespace) -> None:
    if args.image_size is not None and args.image_size < 1:
        raise TextokError(f"--image-size {args.image_size} must be at least 1 pixel (leave it out to copy the images' "
                          "bytes as they are)")
    if not args.index_only:
        check_output(args.out, [("SOURCE", args.source), ("--captions", args.captions),
                                ("--caption-bank", args.caption_bank)], kind="directory", markers=(INDEX,),
                     what="shard directory")
    if args.index_only:
        index = index_shards(args.source)
        out = args.source
    else:
        index = make_shards(args.source, args.out, splits=tuple(s for s in args.splits.split(",") if s),
                            captions_file=args.captions, caption_bank=args.caption_bank, shard_size=args.shard_size,
                            image_size=args.image_size or 0, shuffle=not args.no_shuffle, seed=args.seed,
                            progress=not args.no_progress)
        out = args.out
    rows = [{"split": split, "shards": len(entries), "samples": sum(e["count"] for e in entries)}
            for split, entries in index["splits"].items()]
    print_table(rows)
    if index.get("skipped"):
        print(f"left out {index['skipped']} images that could not be decoded")
    if index.get("uncaptioned", {}).get("count"):
        print(f"left out {index['uncaptioned']['count']} images without a caption (first: "
              f"{index['uncaptioned']['first']})")
    print(f"wrote {out}/index.json; train with data.source={out}")


def encode_captions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a shard directory, an image folder / tar, 'scenes', or a captions.jsonl file")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to read (those present)")
    p.add_argument("--encoder", default="minilm", help="text encoder spec: minilm | t5:/dir | hf:/dir (as model.text_encoder)")
    p.add_argument("--max-length", type=int, default=64, help="text tokens per caption (as model.text_max_length)")
    p.add_argument("--store", default=None, help="store directory (default: the user-level one for this encoder)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--pooled", action="store_true", help="store one pooled vector per caption (models with text_pooled)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def caption_stream(source: str, splits: list[str]):
    """Every caption of ``source``'s splits, read without decoding images (shards: front to back)."""
    if source.endswith(".jsonl") and Path(source).is_file():
        for lineno, line in enumerate(Path(source).read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict):
                raise TextokError(f"{source} line {lineno} is not a JSON object (UTF-8): {line[:80]!r}; fix or remove "
                                  "that line")
            caps = row.get("captions", row.get("caption"))
            caps = [caps] if isinstance(caps, str) else (caps or [])
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise TextokError(f"{source} line {lineno}: 'captions' must be a list of strings (or 'caption' one "
                                  f"string), not {caps!r:.80}")
            yield from caps
        return
    found = False
    for split in splits:
        try:
            data = ShardSet(source, split) if is_shard_dir(source) else build_dataset(source, split, 8)
        except TextokError as err:
            if "split" in str(err):
                continue
            raise
        found = True
        if isinstance(data, ShardSet):
            for shard in data.shards:
                for record in read_shard(shard):
                    if record is not None:
                        yield from record["captions"]
        else:
            for i in range(len(data)):
                yield from captions_of(data, i)
    if not found:
        raise TextokError(f"{source} has none of the splits {', '.join(splits)}")


def cmd_encode_captions(args: argparse.Namespace) -> None:
    for flag in ("max_length", "batch_size"):
        if getattr(args, flag) < 1:
            raise TextokError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    device = str(resolve_device(args.device))
    name = encoder_name(args.encoder)
    root = Path(args.store) if args.store else default_store_dir(name, args.max_length, args.pooled)
    check_output(root, [("SOURCE", args.source)], flag="--store", kind="run", markers=("store.json",),
                 what="text-state store")
    captions = set(caption_stream(args.source, [s for s in args.splits.split(",") if s]))  # read before the encoder
    encoder = None

    def encode(captions):
        nonlocal encoder
        encoder = encoder or load_text_encoder(args.encoder, args.max_length, device)
        return encoder.encode(captions)

    dim = None if (root / "store.json").is_file() else load_text_encoder(args.encoder, args.max_length, device).dim
    store = TextStateStore(root, encoder=name, max_length=args.max_length, pooled=args.pooled, dim=dim,
                           dtype=args.dtype)
    before = len(store)
    encoded = store.fill(captions, encode, batch_size=args.batch_size, progress=not args.no_progress)
    size = sum(p.stat().st_size for p in store.root.iterdir() if p.is_file())
    print_table([{"captions": len(captions), "already stored": len(captions) - encoded, "encoded now": encoded,
                  "store entries": len(store), "store MB": f"{size / 2**20:.1f}"}])
    print(f"store: {store.root} ({name}, {store.meta['dtype']}{', pooled' if store.pooled else ''}; "
          f"{before} entries before this run)")
