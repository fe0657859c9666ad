"""The convolutional multi-scale VQVAE (VAR's layout) and the quantizer's Euclidean matching."""

from __future__ import annotations

import pytest
import torch

from textok.errors import ConfigError, TextokError
from textok.models.multiscale import MultiScaleQuantizerConfig, MultiScaleResidualQuantizer
from textok.models.vqvae import VQVAE, VQVAEConfig


@pytest.fixture(scope="module")
def tiny() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig.preset("vqvae-tiny")).eval()


def test_euclidean_match_picks_the_nearest_code():
    """Cosine matching ignores a code's length; Euclidean matching picks the nearest code, here a different one."""
    q = MultiScaleResidualQuantizer((1,), num_codes=2, code_dim=2, phi_convs=0, match="euclidean")
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[10.0, 0.0], [0.6, 0.8]]))
    z = torch.tensor([[[1.0, 0.2]]])
    assert q(z).codes.item() == 1
    cosine = MultiScaleResidualQuantizer((1,), num_codes=2, code_dim=2, phi_convs=0)
    cosine.load_state_dict(q.state_dict())
    assert cosine(z).codes.item() == 0
    g = torch.Generator().manual_seed(0)
    q = MultiScaleResidualQuantizer((1, 2, 4), num_codes=32, code_dim=4, match="euclidean")
    z = torch.randn(3, 16, 4, generator=g)
    codes = q(z).codes
    first = torch.cdist(z.mean(1, keepdim=True), q.embedding.weight[None]).argmin(-1)  # scale 1: the mean
    assert torch.equal(codes[:, :1], first)


def test_match_is_a_checked_option_left_out_at_its_default():
    assert "match" not in MultiScaleQuantizerConfig().to_dict()
    assert MultiScaleQuantizerConfig(match="euclidean").to_dict()["match"] == "euclidean"
    with pytest.raises(ConfigError, match="quantizer.match='l1' must be one of cosine, euclidean"):
        MultiScaleQuantizerConfig(match="l1")


def test_codes_rebuild_what_the_forward_decodes(tiny):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        recon, zq = tiny(images)
        codes = tiny.encode_codes(images)
        from_codes = tiny.decode_codes(codes)
        first_two = tiny.decode_codes(codes[..., :5])  # scales 1 and 2
    assert codes.shape == (2, 1, 30) and codes.max() < 64
    torch.testing.assert_close(from_codes, recon, rtol=1e-4, atol=1e-4)
    assert first_two.shape == recon.shape and not torch.allclose(first_two, recon, atol=1e-3)
    assert [m.shape[-1] for m in tiny.codes_per_scale(codes)] == [1, 2, 3, 4]
    assert tiny.teacher_forcing_inputs(codes).shape == (2, 29, 8)


def test_training_losses_reach_encoder_and_decoder():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.preset("vqvae-tiny")).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, terms = model.training_losses(images)
    ((recon - images).square().mean() + terms["quantizer"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.decoder.conv_out.weight.grad.abs().sum() > 0


def test_bad_configs_and_inputs_are_refused(tiny):
    with pytest.raises(ConfigError, match="quantizer.branches must be 1"):
        VQVAEConfig.preset("vqvae-tiny").override(["quantizer.branches=2"])
    with pytest.raises(ConfigError, match="must equal the last quantizer scale 4"):
        VQVAEConfig.preset("vqvae-tiny").override(["image_size=128"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        VQVAEConfig.preset("vqvae-tiny").override(["ch=48"])
    with pytest.raises(TextokError, match="takes \\(batch, 3, 64, 64\\)"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(TextokError, match="takes no text"):
        tiny.encode(torch.zeros(1, 3, 64, 64), ["a caption"])


def test_published_size_and_cost():
    with torch.device("meta"):
        model = VQVAE(VQVAEConfig.preset("var-vqvae-256"))
    counts = model.num_parameters()
    assert 108e6 < counts["total"] < 110e6  # VAR's VQVAE: 109M parameters
    assert model.flops_per_image() > 1e11


def test_serve_counts_every_scale_of_its_codes(tiny):
    from textok.apps.serve.app import describe_tokens

    tokens = describe_tokens(tiny)
    assert tokens["count"] == 1 + 4 + 9 + 16 and tokens["bits"] == 30 * 6  # sum(pn^2) codes of 64, not the 16 cells
