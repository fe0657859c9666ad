"""TiTok: presets vs. the paper's sizes, codes API, straight-through gradients, KL variant, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_text
from textok.errors import CheckpointMismatchError, ConfigError, TextokError
from textok.models.maskgit import MaskGIT, MaskGITConfig
from textok.models.registry import load_tokenizer, resolve_tokenizer_config
from textok.models.titok import TiTok, TiTokConfig
from textok.models.vit import ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*overrides: str, seed: int = 0) -> TiTok:
    torch.manual_seed(seed)
    return TiTok(TiTokConfig.preset("titok-tiny").override(list(overrides)))


def images(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- presets --------------------------------------------------------------------------------------
# The TiTok paper's sizes: (width, depth, heads, tokens); patch 16 at 256 px; VQ 4096 x 12.
PAPER = {"titok-s-128": (512, 8, 8, 128), "titok-b-64": (768, 12, 12, 64), "titok-l-32": (1024, 24, 16, 32)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_sizes(name):
    width, depth, heads, n = PAPER[name]
    cfg = TiTokConfig.preset(name)
    assert (cfg.image_size, cfg.patch_size, cfg.num_tokens) == (256, 16, n)
    for vit in (cfg.encoder, cfg.decoder):
        assert (vit.width, vit.depth, vit.heads) == (width, depth, heads)
    q = cfg.quantizer
    assert (q.kind, q.num_codes, q.code_dim, q.l2_normalized) == ("vq", 4096, 12, True)
    assert cfg.token_channels == 12 and not cfg.uses_text
    with torch.device("meta"):
        model = TiTok(cfg)
    counts = model.num_parameters()
    # A pre-norm ViT block holds 12 D^2 weights (qkv 3, proj 1, MLP 8); embeddings/heads/norms add a few %.
    vit = 12 * depth * width**2
    for side in ("encoder", "decoder"):
        assert 1.0 < counts[side] / vit < 1.05, (side, counts[side], vit)
    assert counts["quantizer"] == 4096 * 12
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["quantizer"]
    x = torch.empty(2, 3, 256, 256, device="meta")
    recon, z = model(x)
    assert recon.shape == x.shape and z.shape == (2, n, 12)


@pytest.mark.parametrize("name", ["titok-tiny", "titok-s-32-16"])
def test_small_presets_and_registry(name):
    model_type, cfg = resolve_tokenizer_config(name, ["num_tokens=8"])
    assert model_type == "titok" and isinstance(cfg, TiTokConfig) and cfg.num_tokens == 8
    with torch.device("meta"):
        model = TiTok(cfg)
    x = torch.empty(3, 3, cfg.image_size, cfg.image_size, device="meta")
    assert model.encode(x).shape == (3, 8, cfg.quantizer.code_dim)


def test_token_channels_follow_code_dim():
    cfg = TiTokConfig.preset("titok-tiny")
    assert cfg.override(["quantizer.code_dim=16"]).token_channels == 16
    assert cfg.override(["token_channels=6"]).quantizer.code_dim == 6  # read as quantizer.code_dim
    assert "token_channels" not in cfg.to_dict()
    assert TiTokConfig.from_dict(cfg.to_dict()) == cfg
    assert TiTokConfig.from_dict({**cfg.to_dict(), "token_channels": 8}) == cfg
    with pytest.raises(ConfigError, match="code_dim"):
        TiTokConfig.from_dict({**cfg.to_dict(), "token_channels": 5})


# ---- codes API ------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_codes_in_range_and_decode_shapes():
    model = tiny().eval()  # parameters still require grad: encode's values must be exact anyway
    x = images(3)
    codes = model.encode_codes(x)
    assert codes.shape == (3, model.num_tokens) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < model.codebook_size
    assert model.decode_codes(codes).shape == x.shape
    z = model.encode(x)
    assert z.shape == (3, 4, 8)
    # encode returns code vectors (unit norm: the codebook is l2-normalised), exactly those the codes name
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3, 4))
    assert torch.equal(z, model.quantizer.codebook()[codes])


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_decode_encode_equals_decode_codes_encode_codes():
    model = tiny().eval()
    x = images(2, seed=3)
    with torch.no_grad():
        a = model.decode(model.encode(x))
        b = model.decode_codes(model.encode_codes(x))
        c, _ = model(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    # with gradients on, encode still returns exactly the code vectors (and passes gradients straight through)
    z = model.encode(x)
    assert z.requires_grad and torch.equal(z, model.quantizer.codebook()[model.encode_codes(x)])
    z.sum().backward()
    assert model.encoder.to_tokens.weight.grad.abs().sum() > 0


def test_out_of_range_and_bad_codes_are_clear_errors():
    model = tiny().eval()
    with pytest.raises(TextokError, match=r"\[0, 63\]"):
        model.decode_codes(torch.tensor([[0, 1, 2, 64]]))
    with pytest.raises(TextokError, match=r"\[0, 63\]"):
        model.decode_codes(torch.tensor([[0, -1, 2, 3]]))
    with pytest.raises(TextokError, match="integer"):
        model.decode_codes(torch.zeros(1, 4))
    with pytest.raises(TextokError, match=r"\(batch, 4\)"):
        model.decode_codes(torch.zeros(1, 5, dtype=torch.long))


def test_maskgit_compatibility():
    model = tiny()
    ok = MaskGITConfig(num_tokens=4, codebook_size=64, num_classes=2, transformer=ViTConfig(width=32, depth=1, heads=2))
    with torch.device("meta"):
        MaskGIT(ok).check_compatible(model.num_tokens, model.codebook_size)
        other = MaskGIT(ok.override(["codebook_size=128"]))
    with pytest.raises(TextokError, match="128"):
        other.check_compatible(model.num_tokens, model.codebook_size)


# ---- training -------------------------------------------------------------------------------------
def test_straight_through_gradient_reaches_encoder():
    model = tiny().train()
    x = images(2)
    recon, terms = model.training_losses(x)
    assert set(terms) >= {"quantizer", "metric/codebook_usage", "metric/perplexity"}
    assert all(not v.requires_grad for k, v in terms.items() if k.startswith("metric/"))
    assert 0 < terms["metric/codebook_usage"] <= 8 / 64 + 1e-6  # at most B*N = 8 distinct codes of 64
    assert 1.0 <= terms["metric/perplexity"] <= 8.0 + 1e-4
    # the reconstruction loss alone (no commitment term) must reach every encoder parameter
    ((recon - x) ** 2).mean().backward()
    dead = [n for n, p in model.encoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert model.quantizer.embedding.weight.grad is None  # codes get no gradient through the straight-through path
    model.zero_grad()
    model.training_losses(x)[1]["quantizer"].backward()  # the codebook loss trains the used codes
    g = model.quantizer.embedding.weight.grad
    assert g is not None and (g.abs().sum(1) > 0).sum() >= 1


def test_tiny_training_reduces_reconstruction_loss():
    # four distinct images (solid colours with a ramp); the mean image is the best a decoder can do when
    # the codes carry nothing, so beating it shows the images pass through the codes
    cols = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8], [0.7, 0.7, -0.7]])
    ramp = torch.linspace(-0.3, 0.3, 16)[None, None, :, None] * torch.tensor([1.0, -1, 1, -1])[:, None, None, None]
    x = (cols[:, :, None, None] + ramp).clamp(-1, 1).expand(4, 3, 16, 16).contiguous()
    mean_image_mse = ((x - x.mean(0, keepdim=True)) ** 2).mean().item()
    # dead-code restarts break the index collapse of a fresh model (every image starts on the same codes)
    model = tiny("quantizer.dead_code_steps=5").train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        recon, terms = model.training_losses(x)
        rec = ((recon - x) ** 2).mean()
        loss = rec + sum(v for k, v in terms.items() if not k.startswith("metric/"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(rec.item())
    model.eval()
    with torch.no_grad():
        final = ((model.decode_codes(model.encode_codes(x)) - x) ** 2).mean().item()
    assert final < 0.7 * losses[0], (final, losses[:3])
    assert final < 0.8 * mean_image_mse, (final, mean_image_mse)
    assert len({tuple(c) for c in model.encode_codes(x).tolist()}) > 1


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_kl_variant_shapes_and_loss():
    model = tiny("quantizer.kind=kl", "quantizer.code_dim=6")
    assert model.encoder.to_tokens.out_features == 12 and model.config.token_channels == 6
    assert not model.is_discrete
    x = images(2)
    model.eval()
    z = model.encode(x)
    assert z.shape == (2, 4, 6)
    assert torch.equal(z, model.encode(x))  # the posterior mean: deterministic
    assert model.decode(z).shape == x.shape
    model.train()
    recon, terms = model.training_losses(x)
    assert recon.shape == x.shape and terms["metric/kl"] > 0
    torch.testing.assert_close(terms["quantizer"], model.config.quantizer.kl_weight * terms["metric/kl"])
    for call in (lambda: model.encode_codes(x), lambda: model.decode_codes(torch.zeros(2, 4, dtype=torch.long)),
                 lambda: model.codebook_size):
        with pytest.raises(TextokError, match="no discrete codes"):
            call()


def test_no_bottleneck_variant_is_continuous():
    model = tiny("quantizer.kind=none").eval()
    x = images(2)
    recon, terms = model.training_losses(x)
    assert terms == {} and recon.shape == x.shape
    assert model.encode(x).shape == (2, 4, 8)


# ---- text ----------------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_text_off_ignores_text_and_decoder_text_is_used():
    model = tiny().eval()
    x = images(2)
    t1, t2 = random_text(2, seed=1), random_text(2, seed=2)
    assert torch.equal(model(x, t1)[0], model(x)[0]) and torch.equal(model(x, t1)[0], model(x, t2)[0])
    assert torch.equal(model.encode_codes(x, t1), model.encode_codes(x))
    dec = tiny("text_in_decoder=true").eval()  # TA-TiTok-like: text only in the decoder
    codes = dec.encode_codes(x)
    assert torch.equal(codes, dec.encode_codes(x, t1))
    assert not torch.allclose(dec.decode_codes(codes, t1), dec.decode_codes(codes, t2))
    with pytest.raises(TextokError, match="caption"):
        dec.decode_codes(codes)
    enc = tiny("text_in_encoder=true").eval()  # codes may coincide; the pre-quantisation latents must not
    z1 = enc.encoder(x, enc.text_embeddings(t1, 2, True))
    z2 = enc.encoder(x, enc.text_embeddings(t2, 2, True))
    assert not torch.allclose(z1, z2)  # the pre-quantisation latents depend on the caption


# ---- save / load ---------------------------------------------------------------------------------
@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny("quantizer.dead_code_steps=3", seed=1)
    model.train()
    for _ in range(4):  # move the dead-code counters off zero so they must round-trip too
        model.training_losses(images(2))
    model.eval()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "titok" and saved["config"]["quantizer"]["num_codes"] == 64
    for loaded in (TiTok.from_pretrained(tmp_path / "m"), load_tokenizer(tmp_path / "m")):
        assert type(loaded) is TiTok and loaded.config == model.config
        own, other = model.state_dict(), loaded.state_dict()
        assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)
        x = images(2, seed=5)
        codes = model.encode_codes(x)
        assert torch.equal(codes, loaded.eval().encode_codes(x))
        assert torch.equal(model.decode_codes(codes), loaded.decode_codes(codes))
    with pytest.raises(CheckpointMismatchError, match="num_codes"):
        TiTok.from_pretrained(tmp_path / "m", config=model.config.override(["quantizer.num_codes=32"]))
    from textok import TexTok

    with pytest.raises(CheckpointMismatchError, match="titok"):
        TexTok.from_pretrained(tmp_path / "m")
