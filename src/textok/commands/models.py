"""Verbs about one model: ``info`` (presets, parameter counts; tokenizers and generators) and ``reconstruct``
(images through a tokenizer)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.images import check_output_image, load_image, save_image
from ..errors import TextokError
from ..eval.image_metrics import psnr
from ..hub import CONFIG_NAME, read_config_json
from ..models.registry import GENERATORS, TOKENIZERS, build_tokenizer, load_tokenizer, resolve_tokenizer_config
from ..report import print_table
from ..text.encoders import check_captions


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a tokenizer or generator preset, a tokenizer config file, or a model "
                   "directory (omit to list the presets)")


def cmd_info(args: argparse.Namespace) -> None:
    if not args.preset:
        for model_cls in [*TOKENIZERS.values(), *GENERATORS.values()]:
            print(f"{model_cls.__name__} presets:", ", ".join(model_cls.config_class.presets()))
        return
    if _generator_info(args.preset):
        return
    spec = Path(args.preset) / CONFIG_NAME if Path(args.preset).is_dir() else args.preset
    model_type, cfg = resolve_tokenizer_config(str(spec))
    with torch.device("meta"):
        model = build_tokenizer(model_type, cfg)
    counts = model.num_parameters()
    rows = [{"part": k, "parameters": f"{v:,}", "millions": f"{v / 1e6:.2f}"} for k, v in counts.items()]
    print(f"{args.preset}: {cfg.image_size}px, patch {cfg.patch_size}, {cfg.num_tokens} tokens x {cfg.token_channels} "
          f"channels, text in encoder={cfg.text_in_encoder} decoder={cfg.text_in_decoder} ({cfg.text_encoder})")
    print_table(rows)
    print(f"forward GFLOPs per image (32 text tokens): {model.flops_per_image(32) / 1e9:.2f}")


def _generator_info(spec: str) -> bool:
    """Print a generator preset's or directory's size, tokens and (for a directory) its tokenizer, stored sampler
    and origin; False when ``spec`` is not a generator."""
    record: dict = {}
    for kind, model_cls in GENERATORS.items():
        if spec in model_cls.config_class.presets():
            config = model_cls.config_class.preset(spec)
            break
    else:
        if not Path(spec).is_dir():
            return False
        record = read_config_json(spec)
        kind = record.get("model_type", "")
        if kind not in GENERATORS:
            return False
        model_cls = GENERATORS[kind]
        config = model_cls.config_class.from_dict(record["config"])
    with torch.device("meta"):
        model = model_cls(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{spec}: a {kind} generator, {params:,} parameters ({params / 1e6:.1f}M)")
    print_table([{"setting": k, "value": str(v)} for k, v in config.to_dict().items() if not isinstance(v, dict)])
    meta, origin = record.get("latents_meta", {}), record.get("converted_from", {})
    if meta.get("tokenizer_dir"):
        print(f"tokenizer: {meta['tokenizer_dir']}")
    if origin:
        print(f"converted from {origin.get('file')} (--from {origin.get('format')}, variant {origin.get('variant')})")
        if origin.get("textok_sampler"):
            print(f"its release's sampler: {origin['textok_sampler']}")
    return True


def reconstruct_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a tokenizer directory of any kind (config.json + model.safetensors)")
    p.add_argument("--image", required=True, nargs="+", help="one or more image files")
    p.add_argument("--caption", nargs="+", default=None, help="one caption per image (quote each)")
    p.add_argument("--out", required=True, help="output PNG (originals on the top row, reconstructions below)")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    check_output_image(args.out, inputs=[("--model", args.model), *(("--image", p) for p in args.image)])
    if args.caption is not None:
        check_captions(args.caption)
    model = load_tokenizer(args.model).eval()
    images = torch.stack([load_image(p, model.config.image_size) for p in args.image])
    captions = args.caption
    if model.config.uses_text and captions is None:
        raise TextokError("this tokenizer uses text: pass --caption with one caption per image")
    if captions is not None and len(captions) != len(args.image):
        raise TextokError(f"got {len(captions)} captions for {len(args.image)} images: give one --caption per image")
    with torch.no_grad():
        recon, z = model(images, captions)
    save_image(torch.cat([images, recon]), args.out, nrow=len(images))
    for path, p in zip(args.image, psnr(recon.clamp(-1, 1), images).tolist()):
        print(f"{path}: PSNR {p:.2f} dB, tokens {tuple(z.shape[1:])}")
    print(f"wrote {args.out}")
