"""``textok convert``: a published checkpoint -> a textok model directory (the library: :mod:`textok.convert`)."""

from __future__ import annotations

import argparse

from ..convert import FORMATS, convert, load_manifest


def formats_help() -> str:
    """The --help epilog: every format, its published variants, and what it becomes."""
    lines = ["formats (--from):"]
    for name, fmt in FORMATS.items():
        published = [v for v in load_manifest(name).values() if not v.test_only]
        lines.append(f"  {name}: {fmt.summary}")
        lines.append(f"      variants: {', '.join(v.name for v in published)}")
    return "\n".join(lines)


def convert_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = formats_help()
    p.add_argument("--from", dest="fmt", required=True, choices=sorted(FORMATS), metavar="FORMAT",
                   help=f"the checkpoint's source layout: {', '.join(FORMATS)}")
    p.add_argument("source", help="the published checkpoint file (.bin/.pth/.pt/.safetensors) or the folder holding it")
    p.add_argument("--out", required=True, help="the textok model directory to write (refused if it holds anything "
                   "other than a saved model)")
    p.add_argument("--tokenizer", default=None, help="generators: the converted tokenizer directory whose codes "
                   "the generator models (recorded as the one `textok sample` decodes with)")
    p.add_argument("--text-encoder", default=None, help="TA-TiTok: its CLIP text tower as a textok text encoder "
                   "spec, clip:/path/to/a local openai/clip-vit-large-patch14-336")
    p.add_argument("--teacher-out", default=None, metavar="FILE", help="imagefolder: also write the DINOv2 teacher "
                   "stored in the file (.safetensors), a semantic_teacher=dinov2:FILE for ImageFolder training")
    p.add_argument("--variant", default=None, help="insist on one published variant (default: the one whose keys "
                   "and shapes the file has)")


def cmd_convert(args: argparse.Namespace) -> None:
    done = convert(args.fmt, args.source, args.out, variant=args.variant, tokenizer=args.tokenizer,
                   text_encoder=args.text_encoder, teacher_out=args.teacher_out)
    params = sum(p.numel() for p in done.model.parameters())
    print(f"{args.source}: {done.format} {done.variant.name} -> {done.directory} "
          f"({type(done.model).__name__}, {params / 1e6:.1f}M parameters)")
    if args.teacher_out is not None:
        print(f"teacher: {args.teacher_out} (train an ImageFolder with it: model.semantic_teacher=dinov2:"
              f"{args.teacher_out} model.teacher_size=256)")
    if FORMATS[args.fmt].kind == "tokenizer":
        print(f"evaluate it: textok eval reconstruction --model {done.directory} --data DIR")
        return
    sampler = FORMATS[args.fmt].sampler(done.variant)  # type: ignore[misc]
    if "fid_cfg" in sampler:  # a DiT
        print(f"sample it: textok sample --generator {done.directory} --class 0 --out samples.png (the release's "
              f"sampler, textok's DiT defaults: {sampler['steps']} {sampler['sampler'].upper()} steps, --cfg "
              f"{sampler['cfg']:g}; --npz samples for FID at {sampler['fid_cfg']:g}; guidance on latent channels "
              f"0-{sampler['guided_channels'] - 1} as the official forward_with_cfg)")
        return
    if "top_k" in sampler:  # a VAR
        print(f"sample it: textok sample --generator {done.directory} --class 0 --out samples.png (its stored sampler "
              f"is the release's FID sampler: --cfg {sampler['cfg']:g} --top-k {sampler['top_k']} --top-p "
              f"{sampler['top_p']})")
        return
    print(f"sample it: textok sample --generator {done.directory} --class 0 --out samples.png (its stored sampler is "
          f"the release's: {sampler['steps']} steps, guidance {sampler['guidance_scale']} "
          f"{sampler['guidance_schedule']}, temperature {sampler['temperature']})")
