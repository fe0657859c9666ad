"""The text factors of the Flowers study: pooled text, caption dropout and the text-grounding loss."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from textok import TexTok, TexTokConfig
from textok.errors import TextokError
from textok.text.embeddings import TextEmbeddings
from textok.train.config import load_train_config
from textok.train.loop import LossForward
from textok.train.tokenizer import dropped_rows, generator_losses, tokenizer_losses, train_tokenizer

from conftest import random_text


BASE = ["batch_size=4", "data.train_size=24", "data.val_size=4", "data.captions_per_image=2", "log_every=1",
        "sample_every=0", "optim.warmup_steps=2", "optim.lr=1e-3", "loss.perceptual=none",
        "loss.adversarial.weight=0"]


def _model(**over) -> TexTok:
    torch.manual_seed(0)
    model = TexTok(TexTokConfig.preset("textok-tiny").override(over)).eval()
    for p in model.parameters():  # no zero-initialised paths: every input must matter
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_pooled_text_is_one_token_the_masked_mean() -> None:
    model = _model(text_pooled=True)
    model.double()
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    text = random_text(3, length=7, lengths=[7, 3, 5])
    text = TextEmbeddings(text.states.double(), text.mask)
    manual = torch.stack([text.states[i, : int(n)].mean(0) for i, n in enumerate(text.mask.sum(1))])[:, None]
    one = TextEmbeddings(manual, torch.ones(3, 1, dtype=torch.bool))
    with torch.no_grad():
        out, z = model(images, text)
        ref, zref = model(images, one)
        padded, _ = model(images, text.pad_to(12))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded, out, rtol=1e-12, atol=1e-12)  # padding never enters the mean
    assert model.flops_per_image(32) == model.flops_per_image(1)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_caption_dropout_masks_whole_captions_deterministically() -> None:
    rows = dropped_rows(1000, 0.3, seed=0, step=5, micro=0, rank=0)
    assert torch.equal(rows, dropped_rows(1000, 0.3, seed=0, step=5, micro=0, rank=0))
    assert not torch.equal(rows, dropped_rows(1000, 0.3, seed=0, step=6, micro=0, rank=0))
    assert 0.25 < rows.float().mean() < 0.35
    model = _model().double()
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    a, b = random_text(2, seed=1), random_text(2, seed=2)
    a, b = (TextEmbeddings(t.states.double(), t.mask) for t in (a, b))
    drop = torch.tensor([True, False])
    with torch.no_grad():
        out_a = model(images, a.without(drop))[0]
        out_b = model(images, TextEmbeddings(b.states, a.mask).without(drop))[0]
    torch.testing.assert_close(out_a[0], out_b[0], rtol=1e-12, atol=1e-12)  # a dropped caption is no caption
    assert (out_a[1] - out_b[1]).abs().max() > 1e-3  # a kept one still matters


def test_text_grounding_term_compares_right_and_wrong_captions() -> None:
    cfg = load_train_config("textok-tiny", BASE + ["loss.text_contrast_weight=2.0", "loss.text_contrast_margin=5.0"])
    model = _model()
    model.train()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    text = random_text(4)
    wrong = TextEmbeddings(text.states.roll(1, 0), text.mask.roll(1, 0))
    fwd = LossForward(model, functools.partial(tokenizer_losses, contrast=(2.0, 5.0)))
    recon, terms, extra = generator_losses(fwd, None, None, images, text, cfg, wrong_text=wrong)
    with torch.no_grad():
        right_l2 = torch.nn.functional.mse_loss(model(images, text)[0], images)
        z = model.encoder(images, text)
        wrong_l2 = torch.nn.functional.mse_loss(model.decoder(z, wrong), images)
    gap = float(wrong_l2 - right_l2)
    assert abs(float(extra["metric/wrong_caption_gap"]) - gap) < 1e-5
    assert abs(float(terms["text_contrast"].detach()) - 2.0 * max(0.0, 5.0 - gap)) < 1e-4  # margin 5: active
    sum(terms.values()).backward()
    assert model.decoder.text_proj.weight.grad.abs().sum() > 0


def test_text_factors_train_and_are_refused_where_they_cannot_apply(tmp_path) -> None:
    cfg = load_train_config("textok-tiny", BASE + ["max_steps=4", "ckpt_every=4", "text_dropout=0.5",
                                                   "loss.text_contrast_weight=1.0", "model.text_pooled=true",
                                                   "model.text_in_encoder=false"])
    train_tokenizer(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert all("text_contrast" in e and "metric/wrong_caption_gap" in e for e in log)
    no_dec = load_train_config("textok-tiny", BASE + ["max_steps=1", "loss.text_contrast_weight=1.0",
                                                      "model.text_in_decoder=false"])
    with pytest.raises(TextokError, match="text_in_decoder=true"):
        train_tokenizer(no_dec, tmp_path / "bad", progress=False)
    with pytest.raises(Exception, match="text_dropout"):
        load_train_config("textok-tiny", ["text_dropout=1.0"])
