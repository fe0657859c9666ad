"""The package top is the library's front door: every model with its config, and the two loaders."""

from __future__ import annotations

import torch

import textok

PUBLIC = ["TexTok", "TexTokConfig", "TiTok", "TiTokConfig", "ImageFolder", "ImageFolderConfig", "DiT", "DiTConfig",
          "MaskGIT", "MaskGITConfig", "VAR", "VARConfig", "load_tokenizer", "load_generator", "TextEmbeddings"]


def test_the_public_names_import_from_the_top_with_docstrings() -> None:
    from textok import (DiT, DiTConfig, ImageFolder, ImageFolderConfig, MaskGIT, MaskGITConfig,  # noqa: F401
                        TexTok, TexTokConfig, TextEmbeddings, TiTok, TiTokConfig, VAR, VARConfig, load_generator,
                        load_tokenizer)

    for name in PUBLIC:
        assert name in textok.__all__
        assert (getattr(textok, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_each_model_builds_from_its_tiny_preset_and_a_tokenizer_round_trips(tmp_path) -> None:
    for model, config, preset in [(textok.TiTok, textok.TiTokConfig, "titok-tiny"),
                                  (textok.ImageFolder, textok.ImageFolderConfig, "imagefolder-tiny"),
                                  (textok.DiT, textok.DiTConfig, "dit-tiny"),
                                  (textok.MaskGIT, textok.MaskGITConfig, "maskgit-tiny")]:
        assert isinstance(model(config.preset(preset)), torch.nn.Module)
    tok = textok.TiTok(textok.TiTokConfig.preset("titok-tiny"))
    tok.save_pretrained(tmp_path / "tok")
    assert type(textok.load_tokenizer(tmp_path / "tok")) is textok.TiTok
