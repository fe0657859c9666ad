"""Verbs about one tokenizer: ``info`` (presets and parameter counts) and ``reconstruct`` (images through it)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.images import check_output_image, load_image, save_image
from ..errors import TextokError
from ..eval.image_metrics import psnr
from ..hub import CONFIG_NAME
from ..models.registry import TOKENIZERS, build_tokenizer, load_tokenizer, resolve_tokenizer_config
from ..report import print_table
from ..text.encoders import check_captions


def info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a tokenizer preset, config file or model directory (omit to list the "
                   "presets)")


def cmd_info(args: argparse.Namespace) -> None:
    if not args.preset:
        for model_cls in TOKENIZERS.values():
            print(f"{model_cls.__name__} presets:", ", ".join(model_cls.config_class.presets()))
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
