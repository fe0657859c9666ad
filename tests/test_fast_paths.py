"""The GPU suite's fast paths, checked on the CPU: attention without a mask for unpadded captions (the same
numbers), FP8 linears (against float64 and bf16), and the loss networks' options (perceptual loss at the images'
own size, channels_last, compiled in place)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numerics import assert_same_maths
from textok.errors import ConfigError, TextokError
from textok.models.fp8 import FP8Linear, fp8_supported, use_fp8_linears
from textok.models.textok import TexTok, TexTokConfig
from textok.models.registry import resolve_tokenizer_config
from textok.text.embeddings import TextEmbeddings
from textok.train.config import load_train_config
from textok.train.tokenizer import build_components


def _tiny(dtype=torch.float64) -> TexTok:
    torch.manual_seed(0)
    return TexTok(TexTokConfig.preset("textok-tiny")).to(dtype).eval()


def _masks_seen(model: TexTok) -> list:
    seen: list = []
    for t in (model.encoder.transformer, model.decoder.transformer):
        t.register_forward_pre_hook(lambda _m, args: seen.append(args[1] if len(args) > 1 else None))
    return seen


def test_text_embeddings_know_when_no_caption_is_padded() -> None:
    states = torch.randn(3, 5, 8)
    full = TextEmbeddings(states, torch.ones(3, 5, dtype=torch.bool))
    padded = TextEmbeddings(states, torch.arange(5)[None] < torch.tensor([[5], [2], [4]]))
    assert full.dense is True and padded.dense is False
    assert full.to("cpu", torch.float64).dense is True  # carried along, not recomputed on another device
    assert full.pad_to(7).dense is False and padded.trim().dense is False and full[1:].dense is True
    on_meta = TextEmbeddings(torch.empty(3, 5, 8, device="meta"), torch.ones(3, 5, dtype=torch.bool, device="meta"))
    assert on_meta.dense is None  # unknown without reading the mask back: the mask is kept


@pytest.mark.numerics
def test_unpadded_captions_run_without_a_mask_and_give_the_same_reconstruction() -> None:
    model = _tiny()
    images = torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1
    states = torch.randn(4, 6, model.config.text_dim, dtype=torch.float64)
    ones = torch.ones(4, 6, dtype=torch.bool)
    seen = _masks_seen(model)
    with torch.no_grad():
        fast, z_fast = model(images, TextEmbeddings(states, ones))
        assert seen == [None, None]  # neither side built a key-padding mask
        slow, z_slow = model(images, TextEmbeddings(states, ones, dense=False))  # the mask kept, all true
        assert seen[2] is not None and seen[3] is not None
    assert_same_maths(z_fast, z_slow, torch.float64, "tokens")
    assert_same_maths(fast, slow, torch.float64, "reconstruction")
    # a padded caption still masks: its padded states do not reach the reconstruction
    lengths = torch.tensor([[6], [3], [5], [2]])
    mask = torch.arange(6)[None] < lengths
    noisy = states.masked_fill(~mask[..., None], 1e3)
    with torch.no_grad():
        a, _ = model(images, TextEmbeddings(states, mask))
        b, _ = model(images, TextEmbeddings(noisy, mask))
    assert seen[4] is not None
    assert_same_maths(a, b, torch.float64, "padded positions ignored")


def test_fp8_linear_against_float64_and_bf16() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 16, 64)
    x[0, 3] *= 40  # an outlier token: row-wise scales keep the other tokens' precision
    with torch.no_grad():
        ref = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        got = FP8Linear(linear)(x)
        bf16 = linear.to(torch.bfloat16)(x.to(torch.bfloat16)).double()
    assert got.shape == ref.shape and got.dtype == x.dtype
    err = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
    rows = lambda y: (y.double() - ref).norm(dim=-1) / ref.norm(dim=-1)  # noqa: E731
    # e4m3 keeps 3 mantissa bits (relative rounding <= 1/16 per operand): a few % per output, well under 10%
    assert 1e-4 < err(got) < 0.06, err(got)
    assert float(rows(got).max()) < 0.1  # including the tokens beside the outlier
    assert err(bf16) < err(got) < 20 * err(bf16)  # coarser than bf16, by the mantissa bits it lacks


def test_fp8_linears_swap_the_blocks_only_and_keep_the_output_close() -> None:
    model = _tiny(torch.float32)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    text = TextEmbeddings(torch.randn(2, 5, model.config.text_dim), torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        ref, _ = model(images, text)
    with pytest.raises(TextokError, match="eval"):
        use_fp8_linears(_tiny().train())
    swapped = use_fp8_linears(model)
    depth = model.config.encoder.depth + model.config.decoder.depth
    assert swapped == 4 * depth  # qkv, proj, fc1, fc2 of every block
    assert isinstance(model.encoder.text_proj, nn.Linear) and isinstance(model.decoder.to_pixels, nn.Linear)
    with torch.no_grad():
        got, _ = model(images, text)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel
    assert fp8_supported("cpu") is False  # emulated on a CPU: correct, not fast; the suite reports the card's answer
    with pytest.raises(TextokError, match="no linear"):
        use_fp8_linears(nn.Sequential(nn.Linear(4, 4)).eval())


def _components(overrides: list[str]):
    cfg = load_train_config("textok-tiny", ["loss.perceptual=opennsfw", "loss.perceptual_weight=0.1",
                                            "loss.adversarial.weight=0.1", *overrides])
    model_type, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    torch.manual_seed(0)
    return build_components(cfg, model_type, model_cfg, torch.device("cpu"))


def test_loss_networks_options() -> None:
    parts, perceptual = _components(["loss.perceptual_size=0"])
    assert perceptual.net.size is None  # 0: the images' own size, no resize
    with pytest.raises(ConfigError, match="perceptual_size"):
        load_train_config("textok-tiny", ["loss.perceptual_size=-1"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        d_ref, p_ref = parts.disc(recon), perceptual(recon, images)
    fast, fast_perc = _components(["loss.perceptual_size=0", "loss.channels_last=true"])
    convs = [m for net in (fast.disc, fast_perc) for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():  # the same weights in another memory layout: the same values up to rounding
        assert_same_maths(fast.disc(recon), d_ref, torch.float32, "discriminator")
        assert_same_maths(fast_perc(recon, images), p_ref, torch.float32, "perceptual")
    compiled, compiled_perc = _components(["loss.compile_nets=true"])
    assert compiled.disc._compiled_call_impl is not None and compiled_perc._compiled_call_impl is not None
    assert parts.disc._compiled_call_impl is None
    assert set(compiled.disc.state_dict()) == set(parts.disc.state_dict())  # in place: checkpoints keep their keys
