"""StyleGAN2 discriminator and adversarial losses (hinge / non-saturating / LeCAM / adaptive weight)."""

from __future__ import annotations

import math

import pytest
import torch

from textok.errors import ConfigError, TextokError
from textok.losses.adversarial import (
    LeCAM,
    AdversarialConfig,
    adaptive_weight,
    d_loss,
    g_loss,
    r1_penalty,
)
from textok.models.discriminator import (
    BlurDown,
    Discriminator,
    DiscriminatorConfig,
    minibatch_stddev,
    num_parameters,
)


def _expected_params(cfg: DiscriminatorConfig) -> int:
    """Parameter count from the StyleGAN2 layer list, written independently of the module code."""
    total = 3 * cfg.channels(cfg.image_size) + cfg.channels(cfg.image_size)  # fromRGB 1x1 + bias
    res = cfg.image_size
    while res > 4:
        cin, cout = cfg.channels(res), cfg.channels(res // 2)
        total += cin * cin * 9 + cin + cin * cout * 9 + cout + cin * cout  # conv0, conv1, skip (no bias)
        res //= 2
    c = cfg.channels(4)
    total += (c + 1) * c * 9 + c + c * 16 * c + c + c + 1  # conv, fc, out
    return total


# ---- discriminator -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,target", [("stylegan-256", 24e6), ("stylegan-512", None)])
def test_big_presets_param_count_on_meta(name: str, target: float | None) -> None:
    cfg = DiscriminatorConfig.preset(name)
    with torch.device("meta"):
        disc = Discriminator(cfg)
    n = num_parameters(disc)
    assert n == _expected_params(cfg)
    if target is not None:  # TexTok's StyleGAN discriminator: ~24M parameters
        assert abs(n - target) / target < 0.15, n
    assert all(p.device.type == "meta" for p in disc.parameters())


def test_channels_follow_stylegan2() -> None:
    cfg = DiscriminatorConfig.preset("stylegan-256")
    assert [cfg.channels(r) for r in (256, 128, 64, 32, 16, 8, 4)] == [64, 128, 256, 512, 512, 512, 512]


def test_tiny_shapes_grads_and_param_count() -> None:
    torch.manual_seed(0)
    cfg = DiscriminatorConfig.preset("stylegan-tiny")
    disc = Discriminator(cfg)
    n = num_parameters(disc)
    assert 3_000 < n < 100_000 and n == _expected_params(cfg)
    x = (torch.rand(6, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (6,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("batch", [1, 3, 5, 7])
def test_odd_batches(batch: int) -> None:
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig.preset("stylegan-tiny"))
    out = disc(torch.randn(batch, 3, 32, 32).clamp(-1, 1))
    assert out.shape == (batch,) and torch.isfinite(out).all()


def test_wrong_size_is_a_clear_error() -> None:
    disc = Discriminator(DiscriminatorConfig.preset("stylegan-tiny"))
    with pytest.raises(TextokError, match="32x32"):
        disc(torch.zeros(2, 3, 64, 64))
    with pytest.raises(TextokError, match="shape"):
        disc(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ConfigError):
        DiscriminatorConfig(image_size=48)


def test_mbstd_groups_by_hand() -> None:
    # Batch 5, group 4: samples 0-3 form one group and sample 4 joins it (one group of 5).
    # One channel, 1x1 maps with values 0,1,2,3,4 -> biased std over the group = sqrt(2).
    x = torch.arange(5.0).view(5, 1, 1, 1)
    y = minibatch_stddev(x, group_size=4)
    assert y.shape == (5, 2, 1, 1)
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(y[:, 1].flatten(), torch.full((5,), math.sqrt(2.0 + 1e-8)))
    # Batch 8, group 4: two groups {0,1,2,3} and {10,11,12,13}+{0,0,...}: check each group's own std.
    x = torch.tensor([0.0, 2.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]).view(8, 1, 1, 1)
    s = minibatch_stddev(x, group_size=4)[:, 1].flatten()
    assert torch.allclose(s[:4], torch.ones(4)) and torch.allclose(s[4:], torch.full((4,), 1e-4))
    # Two channels, 2x2 maps: the statistic is averaged over channels and pixels.
    x = torch.zeros(2, 2, 2, 2)
    x[1, 0] = 2.0  # channel 0 differs by 2 between the two samples -> std 1; channel 1 -> std 0
    s = minibatch_stddev(x, group_size=4)[:, 2]
    assert torch.allclose(s, torch.full((2, 2, 2), (1.0 + 1e-4) / 2), atol=1e-6)


def test_blur_down_halves_and_preserves_constants() -> None:
    blur = BlurDown((1, 3, 3, 1))
    x = torch.full((1, 2, 8, 8), 3.0)
    y = blur(x)
    assert y.shape == (1, 2, 4, 4)
    # Interior outputs see only constant inputs: the normalised kernel keeps the value.
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.full_like(y[..., 1:-1, 1:-1], 3.0))


def test_equalized_lr_off_same_function_shape() -> None:
    torch.manual_seed(0)
    cfg = DiscriminatorConfig.preset("stylegan-tiny").override(["equalized_lr=false"])
    disc = Discriminator(cfg)
    assert disc.from_rgb.runtime_scale == 1.0
    out = disc(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2,) and torch.isfinite(out).all()


# ---- losses ------------------------------------------------------------------------------------

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_by_hand() -> None:
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6.
    assert torch.isclose(d_loss(REAL, FAKE, "hinge"), torch.tensor(5 / 6 + 7 / 6))
    # -mean(fake) = -(-2 + 0 + 1.5)/3 = 1/6
    assert torch.isclose(g_loss(FAKE, "hinge"), torch.tensor(1 / 6))


def test_non_saturating_by_hand() -> None:
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    d_exp = (sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(1.5)) / 3
    g_exp = (sp(2.0) + sp(0.0) + sp(-1.5)) / 3
    assert math.isclose(float(d_loss(REAL, FAKE, "non-saturating")), d_exp, rel_tol=1e-6)
    assert math.isclose(float(g_loss(FAKE, "non-saturating")), g_exp, rel_tol=1e-6)
    with pytest.raises(ConfigError):
        d_loss(REAL, FAKE, "wgan")


def test_lecam_by_hand() -> None:
    lecam = LeCAM(decay=0.9, init=0.0)
    lecam.update(REAL, FAKE)
    # means: real 0.5, fake -1/6; EMA from 0 with decay 0.9: real 0.05, fake -1/60
    assert math.isclose(float(lecam.ema_real), 0.05, rel_tol=1e-6)
    assert math.isclose(float(lecam.ema_fake), -1 / 60, rel_tol=1e-5)
    # relu(real - ema_fake)^2 = [(2+1/60)^2, (0.5+1/60)^2, 0]; relu(ema_real - fake)^2 = [2.05^2, 0.05^2, 0]
    expected = ((2 + 1 / 60) ** 2 + (0.5 + 1 / 60) ** 2) / 3 + (2.05**2 + 0.05**2) / 3
    assert math.isclose(float(lecam.penalty(REAL, FAKE)), expected, rel_tol=1e-5)
    # Second update: ema = 0.9 * ema + 0.1 * mean
    lecam.update(torch.tensor([1.0]), torch.tensor([-1.0]))
    assert math.isclose(float(lecam.ema_real), 0.9 * 0.05 + 0.1, rel_tol=1e-6)
    assert math.isclose(float(lecam.ema_fake), 0.9 * (-1 / 60) - 0.1, rel_tol=1e-5)


def test_lecam_warm_start_and_gradients() -> None:
    lecam = LeCAM(decay=0.999)  # init=None: first update copies the batch means
    real = REAL.clone().requires_grad_(True)
    pen = lecam(real, FAKE)
    assert math.isclose(float(lecam.ema_real), 0.5, rel_tol=1e-6)
    assert math.isclose(float(lecam.ema_fake), -1 / 6, rel_tol=1e-6)
    pen.backward()
    # d/dreal mean(relu(real - ema_fake)^2) = 2 (real + 1/6)/3 where positive
    expected = torch.tensor([2 * (2 + 1 / 6) / 3, 2 * (0.5 + 1 / 6) / 3, 0.0])
    assert torch.allclose(real.grad, expected, atol=1e-6)


def test_lecam_state_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(4), torch.randn(4)) for _ in range(6)]
    a = LeCAM(decay=0.99)
    for r, f in batches[:3]:
        a.update(r, f)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert set(state) == {"ema_real", "ema_fake", "num_updates"}
    b = LeCAM(decay=0.99)
    b.load_state_dict(state)
    for r, f in batches[3:]:
        a.update(r, f)
        b.update(r, f)
    assert torch.equal(a.ema_real, b.ema_real) and torch.equal(a.ema_fake, b.ema_fake)
    assert int(b.num_updates) == 6
    # A fresh object that did not load the state diverges (the state matters).
    c = LeCAM(decay=0.99)
    for r, f in batches[3:]:
        c.update(r, f)
    assert not torch.equal(a.ema_real, c.ema_real)


def test_adaptive_weight_by_hand() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3.0 * w).sum()  # grad [3, 3] -> norm 3*sqrt(2)
    g = (w**2).sum()  # grad [2, 4] -> norm sqrt(20)
    out = adaptive_weight(rec, g, w)
    assert math.isclose(float(out), 3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel_tol=1e-6)
    assert not out.requires_grad
    # clamp
    out = adaptive_weight((1e6 * w).sum(), (1e-3 * w).sum(), w, max_weight=10.0)
    assert float(out) == 10.0


def test_r1_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    logits = (x**2).sum(1)  # grad 2x -> ||2x||^2 = [20, 4] -> mean 12
    assert math.isclose(float(r1_penalty(logits, x).detach()), 12.0, rel_tol=1e-6)


def test_adversarial_config() -> None:
    cfg = AdversarialConfig(start_step=100)
    assert not cfg.active(99) and cfg.active(100)
    assert AdversarialConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="kind"):
        AdversarialConfig(kind="lsgan")
    with pytest.raises(ConfigError):
        cfg.override(["lecam_decay=1.5"])


def test_one_gan_step_with_tiny_disc() -> None:
    """D step lowers D's hinge loss on a fixed pair of batches (sanity that the pieces fit)."""
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig.preset("stylegan-tiny"))
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.0, 0.99))
    lecam = LeCAM(decay=0.9)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    fake = torch.zeros(4, 3, 32, 32)
    losses = []
    for _ in range(8):
        r, f = disc(real), disc(fake)
        loss = d_loss(r, f, "hinge") + 0.001 * lecam(r, f)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
