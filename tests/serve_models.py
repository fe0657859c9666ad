"""Tiny models for the ``textok serve`` tests, made on the spot: a text tokenizer (MiniLM text in encoder and
decoder), a no-text one, a directory that does not load, and tiny class-conditional DiTs on the no-text tokens
(and, when asked, on the text tokens)."""

from __future__ import annotations

from pathlib import Path

import torch

from textok.models.textok import TexTok, TexTokConfig

NO_TEXT = ["text_in_encoder=false", "text_in_decoder=false"]
SMALL_DIT = ["model.width=32", "model.depth=1", "model.heads=2", "batch_size=8", "log_every=1",
             "optim.warmup_steps=2", "optim.lr=1e-3", "max_steps=2", "diffusion=flow"]


def make_models(root: Path, generator: bool = True, text_generator: bool = False) -> dict[str, Path]:
    """Random-weight ``textok-tiny`` tokenizers (their reconstructions are noise, but deterministic and
    caption-dependent, which is what the page's plumbing needs) and, optionally, 2-step DiTs."""
    torch.manual_seed(0)
    text = root / "text"
    TexTok(TexTokConfig.preset("textok-tiny")).save_pretrained(text)
    notext = root / "notext"
    TexTok(TexTokConfig.preset("textok-tiny").override(NO_TEXT)).save_pretrained(notext)
    bad = root / "broken"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "config.json").write_text("{ not json")
    out = {"text": text, "notext": notext, "bad": bad}
    if generator:
        from textok.generate import extract_latents
        from textok.train.config import load_generator_config
        from textok.train.generator import train_generator

        extract_latents(notext, "scenes", root / "lat", num=16, batch_size=16, progress=False)
        cfg = load_generator_config("dit-tiny", [f"latents={root / 'lat'}", *SMALL_DIT])
        out["generator"] = train_generator(cfg, root / "dit", progress=False)
        if text_generator:
            extract_latents(text, "scenes", root / "lat-text", num=16, batch_size=16, progress=False)
            cfg = load_generator_config("dit-tiny", [f"latents={root / 'lat-text'}", *SMALL_DIT])
            out["generator_text"] = train_generator(cfg, root / "dit-text", progress=False)
    return out
