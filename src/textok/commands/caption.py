"""``textok caption``: captions for an uncaptioned image folder, tar or directory of webdataset shards, written by a
local VLM as captions.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.captioning import PROMPT_FIELDS, caption_dataset, find_class_map, read_class_names
from ..devices import resolve_device
from ..distributed import distributed_session
from ..errors import TextokError
from ..report import print_table
from ..text.captioner import FAMILIES, VLMCaptioner, vlm_family

DEFAULT_PROMPTS = {"blip": "a photography of", "llava": "Describe this image in one sentence."}


def caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an image folder or tar: [split/]<class>/<image> (class folders give the labels); "
                                  "or a directory of webdataset shards ({key}.jpg + {key}.cls or {key}.json with a "
                                  "label; each image is named <tar name>/<key>)")
    p.add_argument("--vlm", required=True,
                   help=f"a local directory holding a saved VLM ({', '.join(FAMILIES)}); chosen by its config.json")
    p.add_argument("--out", default=None,
                   help="captions.jsonl to write (default: SOURCE/captions.jsonl for a folder or shard directory, which "
                        "make-shards and data.source read by themselves); a kill leaves a work folder .NAME.caption beside it, and "
                        "the same command again finishes the job")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt template, given once per prompt (caption k uses prompt k modulo their number); "
                        f"fields: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)} (default: "
                        + "; ".join(f"{k}: {v!r}" for k, v in DEFAULT_PROMPTS.items()) + ")")
    p.add_argument("--captions-per-image", type=int, default=1,
                   help="captions per image (default 1): one sampling seed per caption")
    p.add_argument("--class-names", default=None,
                   help="a class-name map for {class_name}: JSON {folder: name}, imagenet_class_index.json, or "
                        "lines '<folder> <name>' (LOC_synset_mapping.txt); a shard's integer label n is the map's "
                        "entry \"n\", else its n-th entry; default: classes.txt / synsets.txt / "
                        "LOC_synset_mapping.txt / imagenet_class_index.json at SOURCE's root, else the folder names")
    p.add_argument("--splits", default="", help="comma-separated splits to caption (default: every image)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--on-empty", choices=("error", "skip"), default="error",
                   help="when the VLM writes an empty caption (after two more draws): stop (keeping the work), or "
                        "leave the image out and name it in the report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the VLM's weights (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--no-progress", action="store_true")


def _print_report(report: dict, out: Path) -> None:
    per, words = report["captions_per_image"], report["words"]
    print_table([{"images": report["images"], "captions": report["captions"],
                  "per image": f"{per['min']}-{per['max']} (mean {per['mean']:.2f})",
                  "words (min/p10/median/p90/max)": "/".join(str(words[k]) for k in ("min", "p10", "median", "p90",
                                                                                       "max")),
                  "distinct": report["distinct_captions"], "failed": len(report["failed"])}])
    print("most frequent captions (a VLM stuck on one sentence shows here):")
    for row in report["most_frequent"]:
        print(f"  {row['count']:6d}  {row['caption']}")
    if report["failed"]:
        print(f"{len(report['failed'])} images have no captions:")
        for row in report["failed"][:20]:
            print(f"  {row['file']}: {row['why']}")
        if len(report["failed"]) > 20:
            print(f"  ... and {len(report['failed']) - 20} more")
    print(f"wrote {out}")


def cmd_caption(args: argparse.Namespace) -> None:
    source = Path(args.source).expanduser()
    if args.out is None and not source.is_dir():
        raise TextokError(f"{source} is not a folder: give --out captions.jsonl (and pass it to make-shards with "
                          "--captions)")
    out = Path(args.out).expanduser() if args.out else source / "captions.jsonl"
    family = vlm_family(args.vlm)
    templates = args.prompt or [DEFAULT_PROMPTS[family]]
    class_map = args.class_names or find_class_map(source)
    class_names = read_class_names(class_map) if class_map else None
    with distributed_session(args.device) as info:
        device = info.device if info.enabled else resolve_device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
        captioner = VLMCaptioner(args.vlm, device=device, dtype=dtype, max_new_tokens=args.max_new_tokens)
        settings = {"vlm": str(Path(args.vlm).expanduser().resolve()), "source": str(source.resolve()),
                    "max_new_tokens": args.max_new_tokens, "class_names": str(class_map or ""),
                    "splits": args.splits, "dtype": str(dtype)}
        generate = {} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p}
        report = caption_dataset(source, out, captioner, templates, captions_per_image=args.captions_per_image,
                                 sample=not args.greedy, seed=args.seed, batch_size=args.batch_size,
                                 class_names=class_names, splits=tuple(s for s in args.splits.split(",") if s),
                                 on_empty=args.on_empty, settings=settings, info=info,
                                 progress=not args.no_progress, **generate)
        if report is not None:
            _print_report(report, out)
