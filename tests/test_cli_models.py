"""`textok info` and `textok reconstruct` take every tokenizer kind through the registry; command-line flags
reach the training configs as typed overrides."""

from __future__ import annotations

import argparse

import pytest
import torch

from textok.cli import main
from textok.commands.train import with_flags
from textok.data import CaptionedScenes
from textok.data.images import save_image
from textok.errors import ConfigError
from textok.models.registry import TOKENIZERS, build_tokenizer, resolve_tokenizer_config
from textok.train.config import load_generator_config, load_train_config

TINY = {"titok": "titok-tiny", "imagefolder": "imagefolder-tiny", "textok": "textok-tiny", "vqvae": "vqvae-tiny",
        "sdvae": "sdvae-tiny"}


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
def test_reconstruct_loads_every_tokenizer_kind(model_type, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    over = ["text_in_encoder=false", "text_in_decoder=false"] if model_type == "textok" else []
    build_tokenizer(*resolve_tokenizer_config(TINY[model_type], over)).save_pretrained(tmp_path / "tok")
    save_image(CaptionedScenes(16, size=1)[0]["image"], str(tmp_path / "in.png"))
    rc = main(["reconstruct", "--model", str(tmp_path / "tok"), "--image", str(tmp_path / "in.png"),
               "--out", str(tmp_path / "out.png")])
    assert rc == 0 and (tmp_path / "out.png").is_file()
    assert "PSNR" in capsys.readouterr().out


@pytest.mark.parametrize("preset", sorted(TINY.values()))
def test_info_describes_every_tokenizer_kind(preset, capsys) -> None:
    assert main(["info", preset]) == 0
    assert preset in capsys.readouterr().out


def test_info_lists_the_presets_of_every_kind(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in TINY.values()) and all(p in out for p in ("dit-tiny", "maskgit-tiny", "var-tiny"))


@pytest.mark.parametrize("preset", ["dit-tiny", "maskgit-tiny", "var-tiny"])
def test_info_describes_a_generator_preset(preset, capsys) -> None:
    assert main(["info", preset]) == 0
    out = capsys.readouterr().out
    assert f"{preset}: a {preset.split('-')[0]} generator" in out and "setting" in out


def test_flags_are_typed_overrides_and_win_over_key_value() -> None:
    args = argparse.Namespace(overrides=["max_steps=7", "optim.lr=1e-3"], max_steps=5, ckpt_every=None)
    over = with_flags(args, "max_steps", "ckpt_every")
    assert over == [("max_steps", "7"), ("optim.lr", "1e-3"), ("max_steps", 5)]
    cfg = load_train_config("textok-tiny", over)
    assert cfg.max_steps == 5 and cfg.optim.lr == 1e-3
    gen = load_generator_config("dit-tiny", {"latents": "lat", "max_steps": 3, "model.depth": 2})
    assert (gen.latents, gen.max_steps, gen.model_overrides) == ("lat", 3, {"depth": 2})
    # a bad key=value is refused even when a flag sets the same key afterwards
    bad = with_flags(argparse.Namespace(overrides=["max_steps=inf"], max_steps=3, ckpt_every=None), "max_steps")
    with pytest.raises(ConfigError, match="max_steps='inf'"):
        load_train_config("textok-tiny", bad)
