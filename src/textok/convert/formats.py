"""The table of published formats ``textok convert --from`` reads: one row per format."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from torch import nn

from .dit import build_dit, dit_diffusion, dit_record, dit_sampler
from .imagefolder import EMA_FIRST, build_imagefolder, teacher_state
from .manifest import Variant
from .maskgit import build_maskgit, maskgit_record, textok_sampler
from .sdvae import build_sdvae, drop_training_entries, release_settings
from .titok import build_tatitok, build_titok
from .var import (build_var, build_vqvae, imagefolder_var_record, prepare_imagefolder_var, var_record,
                  var_sampler)


class Format(NamedTuple):
    summary: str  # one line for --help: what the published files are and what textok makes of them
    kind: str  # "tokenizer" | "generator"
    build: Callable[..., nn.Module]  # (state, variant, **options) -> the textok model
    sampler: Callable[[Variant], dict] | None = None  # generators: the release's sampler in `textok sample` terms
    record: Callable[[Any, Path], dict] | None = None  # generators: (model, tokenizer dir) -> latents_meta, checked
    text_encoder: bool = False  # takes --text-encoder (the textok spec of the text tower it decodes with)
    containers: tuple[tuple[str, ...], ...] = ()  # key paths to the weights in a training checkpoint (first found)
    prepare: Callable[[dict], dict] | None = None  # state -> state before the layout check (training-only entries)
    teacher: Callable[[dict], dict] | None = None  # state -> a training teacher stored beside it (--teacher-out)
    settings: Callable[[Path, Variant], Variant] | None = None  # (weights file, variant) -> its release's own config
    diffusion: Callable[[Variant], dict] | None = None  # diffusion generators: the release's DiffusionConfig


FORMATS: dict[str, Format] = {
    "titok": Format("1d-tokenizer's TiTok tokenizers: VQ S-128, B-64, L-32 (tokenizer_titok_{s128,b64,l32}.bin), "
                    "VQ-8k BL-64, BL-128, SL-256 and VAE LL-32, BL-64, BL-128 (*_vq8k, *_vae_c16) -> a textok TiTok",
                    "tokenizer", build_titok),
    "tatitok": Format("1d-tokenizer's TA-TiTok (text in the decoder; VQ bl32/bl64/bl128, VAE bl32/bl64/sl128; "
                      "turkeyju/tokenizer_tatitok_*) -> a textok TiTok with CLIP text in its decoder; needs "
                      "--text-encoder clip:DIR", "tokenizer", build_tatitok, text_encoder=True),
    "titok-maskgit": Format("1d-tokenizer's MaskGIT generators for TiTok L-32, B-64 (BERT) and S-128 (U-ViT) "
                            "(generator_titok_{l32,b64,s128}.bin) -> a textok MaskGIT; needs --tokenizer",
                            "generator", build_maskgit, textok_sampler, maskgit_record),
    "var-vqvae": Format("FoundationVision VAR's multi-scale VQVAE (vae_ch160v4096z32.pth: 10 scales 1..16 of 4096 "
                        "codes at 256 px; --variant vae-ch160-v4096-z32-512 for VAR-d36's 1..32 at 512 px) -> a "
                        "textok VQVAE", "tokenizer", build_vqvae),
    "var": Format("FoundationVision VAR's class-conditional transformers VAR-d16/d20/d24/d30 and d36-s (var_d*.pth) "
                  "-> a textok VAR with one branch; needs --tokenizer (the converted VQVAE)", "generator", build_var,
                  var_sampler, var_record),
    "imagefolder": Format("ImageFolder's tokenizers (imagenet-{4096,8192,16384}.pt, ang9867/imagefolder; XQ-GAN's "
                          "MSVR10P2-{4096,8192,16384}/best_ckpt.pt): DINOv2-layout ViT-B encoder/decoder, 2 branches "
                          "x 10 scales to 11x11 -> a textok ImageFolder (its EMA weights when the file has them; also "
                          "the tokenizer inside the VAR's imagenet-var-4096.pt); --teacher-out FILE also writes its "
                          "DINOv2 teacher", "tokenizer", build_imagefolder, containers=EMA_FIRST,
                          teacher=teacher_state),
    "imagefolder-var": Format("ImageFolder's class-conditional folded VAR-d17 (imagenet-var-4096.pt, "
                              "ang9867/imagefolder; XQ-GAN's VAR-d17-MSVR10P2-4096/ar-ckpt-last.pth) -> a textok VAR "
                              "with two folded branches; needs --tokenizer (the converted ImageFolder tokenizer)",
                              "generator", build_var, var_sampler, imagefolder_var_record,
                              containers=(("trainer", "var_wo_ddp"),), prepare=prepare_imagefolder_var),
    "sd-vae": Format("Stable Diffusion's KL VAE as diffusers saves it (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse: "
                     "diffusion_pytorch_model.safetensors or .bin, the snapshot folder's config.json read when "
                     "there; DiT's latent space) or in the CompVis layout (sd-vae-ft-*-original: "
                     "vae-ft-*-ema-pruned.ckpt/.safetensors) -> a textok SDVAE of 32 x 32 x 4 latent tokens at 256 "
                     "px (--variant sd-vae-ft-512, sd-vae-ft-legacy-512 or sd-vae-ft-original-512: 64 x 64 at "
                     "512 px)", "tokenizer", build_sdvae, prepare=drop_training_entries, settings=release_settings),
    "dit": Format("facebookresearch DiT's class-conditional DiT-XL/2 over Stable Diffusion VAE latents "
                  "(DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) -> a textok DiT with 2 x 2 patches over the latent grid "
                  "and the release's sampler (250 DDPM steps, cfg 4.0; 1.5 for FID); needs --tokenizer (the "
                  "SD VAE converted with --from sd-vae; --variant sd-vae-ft-512 for XL/2-512)", "generator", build_dit,
                  dit_sampler, dit_record, diffusion=dit_diffusion),
}

__all__ = ["FORMATS", "Format"]
