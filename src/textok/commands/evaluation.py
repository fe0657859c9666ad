"""``textok eval reconstruction|generation``: one verb, two modes.

Thin layers over :func:`textok.eval.reconstruction.evaluate_tokenizer` and
:func:`textok.eval.generation.evaluate_samples`: parse, call, print a table, write JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..data.factory import build_dataset
from ..devices import resolve_device
from ..errors import TextokError
from ..eval.generation import evaluate_samples, is_stats_file, peek_image_size
from ..eval.features import DEFAULT_FD_SIZE
from ..eval.ref_cache import data_identity
from ..eval.reconstruction import evaluate_tokenizer
from ..io import atomic_write_text, check_output_file
from ..models.registry import load_tokenizer
from ..report import print_table

MODES = ("reconstruction", "generation")


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=MODES, help="reconstruction: a tokenizer on a dataset; generation: samples vs a reference")
    g = p.add_argument_group("reconstruction")
    g.add_argument("--model", help="a tokenizer directory (config.json + model.safetensors)")
    g.add_argument("--data", default="scenes", help="'scenes' (embedded) or an image folder / tar (default: scenes)")
    g.add_argument("--split", default=None, help="data split (default: val for reconstruction, train for --ref data)")
    g.add_argument("--seed", type=int, default=0, help="the scenes' generator seed")
    g.add_argument("--captions-file", default="", help="a captions.jsonl for a folder outside it")
    g.add_argument("--caption-bank", default="", help="a {class: [captions]} JSON for class folders")
    g.add_argument("--vgg16-weights", default=None, help="torchvision vgg16 weights for LPIPS (else $TEXTOK_VGG16_WEIGHTS; "
                                                        "LPIPS is skipped without them)")
    g = p.add_argument_group("generation")
    g.add_argument("--samples", help="a .npz of samples (arr_0: uint8 NHWC) or a folder of images")
    g.add_argument("--ref", help="reference: a statistics .npz (mu/sigma), a .npz/folder of images, 'scenes' or a dataset folder")
    g.add_argument("--ref-num", type=int, default=0, help="reference images to use (0 = all)")
    g.add_argument("--image-size", type=int, default=0, help="resize samples to this side (0 = as they are)")
    g.add_argument("--save-ref-stats", default=None, help="write the reference statistics to this .npz")
    g.add_argument("--ref-stats", default=None, metavar="FILE",
                   help="read the reference statistics from this .npz when it holds those of --ref with these "
                        "settings, else compute and write them there (default: a file per reference in "
                        "$TEXTOK_CACHE/ref-stats, ~/.cache/textok without it)")
    g.add_argument("--no-ref-cache", action="store_true", help="compute the reference statistics, neither reading "
                                                                 "nor writing a cached copy")
    g.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    g = p.add_argument_group("both")
    g.add_argument("--num", type=int, default=0, help="images (reconstruction) or samples (generation) to use (0 = all)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--inception-weights", default=None,
                   help="pytorch-fid pt_inception-2015-12-05-6726825d.pth (else $TEXTOK_INCEPTION_WEIGHTS); "
                        "without it rFID/gFID/IS are skipped and FD-opennsfw is reported")
    g.add_argument("--fd-size", type=int, default=DEFAULT_FD_SIZE,
                   help=f"open_nsfw input side for FD-opennsfw (default {DEFAULT_FD_SIZE}, as `textok demo` reports; "
                        "224 as open_nsfw was trained)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    g.add_argument("--out", default=None, help="write the results as JSON here")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4f}"
    return str(v)


def _report(result: dict[str, Any], settings: dict[str, Any], out: str | None) -> None:
    notes = result.get("metric_notes", {})
    rows = [{"metric": k, "value": _fmt(v), "note": notes.get(k, "")} for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    print_table(rows, ["metric", "value", "note"])
    for name, why in result.get("skipped", {}).items():
        print(f"skipped {name}: {why}")
    if out:
        # PSNR of a perfect reconstruction is inf: written as Infinity, which Python's json reads back.
        atomic_write_text(out, json.dumps({**result, "settings": settings}, indent=2) + "\n")
        print(f"wrote {out}")


def _need(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        if not getattr(args, n.replace("-", "_")):
            raise TextokError(f"eval {args.mode} needs --{n}")


def run_reconstruction(args: argparse.Namespace) -> dict[str, Any]:
    _need(args, "model")
    model = load_tokenizer(args.model)
    size = int(model.config.image_size)
    split = args.split or "val"
    # Item i of a split does not depend on the split's size, so asking for `num` items is the same as taking
    # the first `num` of the whole split (and only those are read or rendered).
    data = build_dataset(args.data, split, size, size=max(args.num, 0), captions_file=args.captions_file,
                         caption_bank=args.caption_bank, seed=args.seed)
    device = str(resolve_device(args.device))
    print(f"eval reconstruction: {args.model} on {args.data}/{split}, {len(data)} images at {size} px, {device}")
    result = evaluate_tokenizer(model, data, batch_size=args.batch_size, device=device,
                                inception_weights=args.inception_weights, vgg16_weights=args.vgg16_weights,
                                progress=not args.quiet, fd_size=args.fd_size, eta_label="eval reconstruction")
    settings = {"mode": "reconstruction", "model": args.model, "data": args.data, "split": split,
                "image_size": size, "num": args.num, "fd_size": args.fd_size, "seed": args.seed,
                "caption": "first caption of each image"}
    _report(result, settings, args.out)
    return result


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    _need(args, "samples", "ref")
    if not Path(args.samples).exists():
        raise TextokError(f"samples {args.samples} do not exist (a .npz with arr_0 or a folder of images)")
    ref_path = Path(args.ref)
    reference: Any = args.ref
    split = args.split or "train"
    if not is_stats_file(ref_path) and not (ref_path.is_file() and ref_path.suffix == ".npz"):
        if args.ref != "scenes" and not ref_path.exists():
            raise TextokError(f"reference {args.ref} is neither a statistics/images .npz, 'scenes', nor an "
                              "existing folder or tar")
        side = args.image_size or peek_image_size(args.samples)
        reference = build_dataset(args.ref, split, side, size=max(args.ref_num, 0),
                                  captions_file=args.captions_file, caption_bank=args.caption_bank, seed=args.seed)
    identity = None if is_stats_file(ref_path) or args.no_ref_cache else data_identity(args.ref, split=split,
                                                                                      seed=args.seed)
    device = str(resolve_device(args.device))
    print(f"eval generation: {args.samples} against {args.ref}, {device}")
    result = evaluate_samples(args.samples, reference, num=args.num or None, ref_num=args.ref_num or None,
                              batch_size=args.batch_size, device=device, inception_weights=args.inception_weights,
                              fd_size=args.fd_size, image_size=args.image_size or None, is_splits=args.is_splits,
                              save_ref_stats=args.save_ref_stats, progress=not args.quiet, ref_identity=identity,
                              ref_stats_file=args.ref_stats, ref_cache_dir=args.ref_stats is None)
    if "ref_stats" in result:
        print(f"reference statistics: {result['ref_stats']}")
    settings = {"mode": "generation", "samples": args.samples, "ref": args.ref, "fd_size": args.fd_size,
                "num": args.num, "ref_num": args.ref_num}
    if not isinstance(reference, str):
        settings["ref_split"] = split
    _report(result, settings, args.out)
    return result


def cmd_eval(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise TextokError(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.num < 0:
        raise TextokError(f"--num must be 0 (all) or positive; got {args.num}")
    inputs = [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in (
        "model", "data", "captions_file", "caption_bank", "samples", "ref", "inception_weights", "vgg16_weights")]
    if args.out:
        check_output_file(args.out, "--out", inputs)
    if args.mode == "generation" and args.save_ref_stats:
        check_output_file(args.save_ref_stats, "--save-ref-stats", inputs, outputs=[("--out", args.out)])
    if args.mode == "generation" and args.ref_stats is not None:
        if not args.ref_stats.endswith(".npz") or args.no_ref_cache:
            raise TextokError("--ref-stats names a .npz file to read or write the reference statistics (and cannot "
                              f"go with --no-ref-cache); got {args.ref_stats}")
        if args.ref and is_stats_file(args.ref):
            raise TextokError("--ref is already a statistics file: --ref-stats needs reference images as --ref")
    if args.mode == "reconstruction":
        run_reconstruction(args)
    else:
        run_generation(args)
