"""Stable Diffusion's KL VAE as a tokenizer: tokens are the posterior mean of the latent grid, row-major and
unscaled; training samples the posterior and weighs its KL."""

from __future__ import annotations

import pytest
import torch

from textok.errors import ConfigError, TextokError
from textok.models.sdvae import SDVAE, SDVAEConfig


@pytest.fixture(scope="module")
def tiny() -> SDVAE:
    torch.manual_seed(0)
    return SDVAE(SDVAEConfig.preset("sdvae-tiny")).eval()


def test_tokens_are_the_posterior_mean_of_the_grid_row_major(tiny):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(images)
        moments = tiny.quant_conv(tiny.encoder(images))  # (B, 2C, K, K): [mean, log-variance]
        recon, tokens = tiny(images)
    assert z.shape == (2, 16, 4) and tiny.config.num_tokens == 16 and tiny.config.token_channels == 4
    K = tiny.config.latent_grid
    for r, c in ((0, 1), (2, 3), (3, 0)):
        torch.testing.assert_close(z[:, r * K + c], moments[:, :4, r, c], rtol=0, atol=0)
    assert torch.equal(tokens, z) and torch.equal(tiny.encode(images), z)  # deterministic
    with torch.no_grad():
        torch.testing.assert_close(tiny.decode(z), recon, rtol=0, atol=0)
    assert tiny.code_form == "tokens" and tiny.code_layout() is None and not tiny.is_discrete


def test_training_samples_the_posterior_and_weighs_its_kl():
    torch.manual_seed(0)
    model = SDVAE(SDVAEConfig.preset("sdvae-tiny").override(["kl_weight=0.5"])).train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, terms = model.training_losses(images)
    again, _ = model.training_losses(images)
    assert not torch.allclose(recon, again)  # a sample, not the mean
    torch.testing.assert_close(terms["quantizer"], 0.5 * terms["metric/kl"])
    ((recon - images).square().mean() + terms["quantizer"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad[4:].abs().sum() > 0  # the log-variance half learns through the KL


def test_bad_configs_and_inputs_are_refused(tiny):
    with pytest.raises(ConfigError, match="multiple of norm_num_groups=8"):
        SDVAEConfig.preset("sdvae-tiny").override(["block_out_channels=[12,32,64,64]"])
    with pytest.raises(ConfigError, match="multiple of the downsampling 8"):
        SDVAEConfig.preset("sdvae-tiny").override(["image_size=36"])
    with pytest.raises(TextokError, match="takes \\(batch, 3, 32, 32\\)"):
        tiny.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TextokError, match="takes no text"):
        tiny.encode(torch.zeros(1, 3, 32, 32), ["a caption"])
    with pytest.raises(TextokError, match="decodes \\(batch, 16, 4\\)"):
        tiny.decode(torch.zeros(1, 16, 8))


def test_published_size():
    """sd-vae-ft-ema / -mse: 83,653,863 parameters in diffusers' AutoencoderKL (49,490,199 of them decoding)."""
    with torch.device("meta"):
        model = SDVAE(SDVAEConfig.preset("sdvae-256"))
        wide = SDVAE(SDVAEConfig.preset("sdvae-512"))
    counts = model.num_parameters()
    assert counts["total"] == 83_653_863 and counts["decoder"] == 49_490_199
    assert (model.config.num_tokens, wide.config.num_tokens, model.config.patch_size) == (1024, 4096, 8)
    assert model.flops_per_image() > 1e11 and wide.flops_per_image() > 3.9 * model.flops_per_image()
