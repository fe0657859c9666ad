"""A kind is its model file plus one registry row: a toy generator kind trains, saves, loads and samples through
the CLI, and the built-in kinds are read from their rows."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from textok.cli import main
from textok.generate import GenerationPipeline
from textok.models import registry
from textok.models.kinds import CODE_FORMS
from textok.models.registry import GENERATOR_KINDS, TOKENIZER_KINDS, load_generator, register_kind
from textok.models.textok import TexTok, TexTokConfig
from toy_kind import TOY_KIND, Toy


@pytest.fixture
def toy_registered():
    register_kind(TOY_KIND)
    yield TOY_KIND
    GENERATOR_KINDS.pop("toy")
    registry.GENERATORS.pop("toy")


def test_a_toy_kind_trains_saves_loads_and_samples_through_the_cli(tmp_path, capsys, one_thread, toy_registered):
    torch.manual_seed(0)
    TexTok(TexTokConfig.preset("textok-tiny").override(["text_in_encoder=false", "text_in_decoder=false"])
           ).save_pretrained(tmp_path / "tok")
    assert main(["extract-latents", "--tokenizer", str(tmp_path / "tok"), "--num", "24", "--batch-size", "12",
                 "--out", str(tmp_path / "lat"), "--no-progress"]) == 0
    assert main(["train-generator", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"),
                 "--kind", "toy", "--max-steps", "12", "--no-progress", "batch_size=8", "optim.lr=0.1",
                 "optim.warmup_steps=1", "ema_decay=0.5"]) == 0
    model, record = load_generator(tmp_path / "run/final")
    assert isinstance(model, Toy) and record["model_type"] == "toy" and model.config.num_classes == 8
    # it learned something: its class means are closer to the data's than the initial ones
    from textok.generate import LatentDataset

    data = LatentDataset(tmp_path / "lat")
    labels = data.labels.clamp_min(0)
    targets = torch.stack([data.latents[labels == k].mean(0) for k in labels.unique()])
    fresh = Toy(model.config)
    with torch.no_grad():
        trained_err = (model(labels.unique()) - targets).pow(2).mean()
        fresh_err = (fresh(labels.unique()) - targets).pow(2).mean()
    assert trained_err < fresh_err
    # sampled and decoded through the CLI, with its own option refused on another kind and vice versa
    assert main(["sample", "--generator", str(tmp_path / "run/final"), "--class", "0", "3", "--n", "2",
                 "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "s.npz"), "--num", "4",
                 "--no-progress"]) == 0
    assert Image.open(tmp_path / "grid.png").size[1] > 16
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8
    pipe = GenerationPipeline(tmp_path / "run/final")
    a, b = pipe.generate([1, 2], seed=3), pipe.generate([1, 2], seed=3)
    assert torch.equal(a, b) and not torch.equal(a, pipe.generate([1, 2], seed=4))  # its noise is the seed's
    assert main(["sample", "--generator", str(tmp_path / "run/final"), "--top-k", "5", "--out",
                 str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert "top_k are VAR sampling options; a Toy samples with --cfg" in capsys.readouterr().err
    # the generator records its tokenizer and latents relative to itself: the runs can move together
    record = json.loads((tmp_path / "run/final/config.json").read_text())
    assert record["latents_meta"]["tokenizer_dir"] == os.path.join("..", "..", "tok")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("tok", "lat", "run"):
        shutil.move(tmp_path / name, moved / name)
    assert main(["sample", "--generator", str(moved / "run/final"), "--class", "1", "--n", "1", "--out",
                 str(tmp_path / "moved.png"), "--no-progress"]) == 0
    assert load_generator(moved / "run/final")[1]["latents_meta"]["tokenizer_dir"] == str((moved / "tok").resolve())


def test_the_builtin_kinds_are_rows():
    assert list(TOKENIZER_KINDS) == ["textok", "titok", "imagefolder", "vqvae", "sdvae"]
    assert {k: v.consumes for k, v in GENERATOR_KINDS.items()} == {"dit": "tokens", "maskgit": "codes", "var": "scales"}
    for kind in GENERATOR_KINDS.values():
        assert kind.consumes in CODE_FORMS and kind.model.config_class.presets()
        assert kind.preset in kind.model.config_class.presets()
        assert kind.task_class().__name__.endswith("Task")
    for kind in TOKENIZER_KINDS.values():
        assert kind.task_class().__name__ == "TokenizerTask"
    forms = {name: kind.model(kind.model.config_class.preset(f"{name}-tiny")).code_form
             for name, kind in TOKENIZER_KINDS.items()}
    assert forms == {"textok": "tokens", "titok": "codes", "imagefolder": "scales", "vqvae": "scales",
                     "sdvae": "tokens"}
