"""Gaussian diffusion (DiT recipe), respacing, DDPM/DDIM, flow matching, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from textok.diffusion import (
    DiffusionConfig,
    FlowMatching,
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)
from textok.errors import ConfigError
from textok.models.dit import DiT, DiTConfig


MU, S = 0.5, 0.3  # toy data distribution N(MU, S^2) per coordinate


def _optimal_eps(diffusion: GaussianDiffusion):
    """The exact E[ε | x_t] for data ~ N(MU, S²): an independent stand-in for a perfectly trained model."""
    ac = diffusion.alphas_cumprod.float()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = ac[t].sqrt().view(-1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1)
        return b / (a * a * S * S + b * b) * (x - a * MU)

    return fn


def _optimal_velocity(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
    """The exact E[ε − x0 | x_t] for rectified flow with data ~ N(MU, S²) (model time = 1000 t)."""
    t = (t_model / 1000).view(-1, 1, 1)
    var = (1 - t) ** 2 * S * S + t * t
    r = x - (1 - t) * MU
    return t / var * r - (MU + (1 - t) * S * S / var * r)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_linear_schedule_matches_dit() -> None:
    d = create_diffusion("dit")
    assert d.num_timesteps == 1000
    assert float(d.betas[0]) == pytest.approx(1e-4) and float(d.betas[-1]) == pytest.approx(0.02)
    ac = d.alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all())
    assert float(ac[-1]) == pytest.approx(math.prod(1 - b for b in d.betas.tolist()), rel=1e-9)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_q_sample_moments() -> None:
    d = create_diffusion("dit")
    x0 = torch.full((4000, 4, 2), 1.5)
    t = torch.full((4000,), 300)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    ac = float(d.alphas_cumprod[300])
    assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 1.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ac, rel=0.03)


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_respacing_steps_and_betas() -> None:
    assert space_timesteps(1000, 250)[:2] == [0, 4] and len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,15,20")) == 45
    with pytest.raises(ConfigError):
        space_timesteps(1000, "ddim999")
    d = create_diffusion("dit")
    for spec in (250, "ddim50", "10,15,20"):
        use = space_timesteps(1000, spec)
        chain = d.respace(spec)
        assert chain.num_timesteps == len(use)
        assert chain.timestep_map.tolist() == use
        torch.testing.assert_close(chain.alphas_cumprod, d.alphas_cumprod[use], rtol=1e-10, atol=0)
    # Sampling with `steps` calls the model exactly that many times, with the ORIGINAL timesteps.
    seen: list[int] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2])

    d.sample(model, (2, 4, 3), steps=25, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert seen == space_timesteps(1000, 25)[::-1]


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_samplers_recover_a_gaussian_with_the_exact_model() -> None:
    noise = torch.randn(1000, 4, 2, generator=torch.Generator().manual_seed(0))
    d = create_diffusion(DiffusionConfig(learn_sigma=False))
    fn = _optimal_eps(d)
    # η = 0 DDIM integrates the probability-flow ODE, which maps ε to MU + S ε for Gaussian data.
    z = d.sample(fn, noise.shape, steps=250, sampler="ddim", noise=noise)
    assert (z - (MU + S * noise)).abs().max().item() < 0.05
    # Ancestral DDPM (250 respaced steps, fixed large variance as DiT) reproduces the moments.
    z = d.sample(fn, noise.shape, steps=250, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert z.mean().item() == pytest.approx(MU, abs=0.01)
    assert z.std().item() == pytest.approx(S, rel=0.05)
    fm = create_diffusion("flow")
    z = fm.sample(_optimal_velocity, noise.shape, steps=50, sampler="heun", noise=noise)
    assert (z - (MU + S * noise)).abs().max().item() < 0.01
    z = fm.sample(_optimal_velocity, noise.shape, steps=200, sampler="euler", noise=noise)
    assert (z - (MU + S * noise)).abs().max().item() < 0.02


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_ddim_eta0_is_deterministic() -> None:
    cfg = DiTConfig.preset("dit-tiny")
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = create_diffusion("dit")
    shape = (2, cfg.num_tokens, cfg.in_channels)
    kw = {"y": torch.tensor([1, 2])}
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a = d.sample(model, shape, steps=10, sampler="ddim", eta=0.0, cfg_scale=2.0, model_kwargs=kw, noise=noise,
                 generator=torch.Generator().manual_seed(1))
    b = d.sample(model, shape, steps=10, sampler="ddim", eta=0.0, cfg_scale=2.0, model_kwargs=kw, noise=noise,
                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - noise).abs().max() > 0.1
    c = d.sample(model, shape, steps=10, sampler="ddim", eta=1.0, model_kwargs=kw, noise=noise,
                 generator=torch.Generator().manual_seed(1))
    e = d.sample(model, shape, steps=10, sampler="ddim", eta=1.0, model_kwargs=kw, noise=noise,
                 generator=torch.Generator().manual_seed(2))
    assert (c - e).abs().max() > 1e-3


def test_guidance_reaches_plain_callables_as_an_argument() -> None:
    d = create_diffusion(DiffusionConfig(learn_sigma=False))
    scales: list[float] = []

    def fn(x: torch.Tensor, t: torch.Tensor, cfg_scale: float = 1.0) -> torch.Tensor:
        scales.append(cfg_scale)
        return torch.zeros_like(x)

    d.sample(fn, (1, 2, 2), steps=3, cfg_scale=4.0)
    d.sample(fn, (1, 2, 2), steps=2, cfg_scale=1.0)
    assert scales == [4.0] * 3 + [1.0] * 2


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_likelihood_terms() -> None:
    m = torch.tensor([0.3, -0.2])
    assert normal_kl(m, torch.zeros(2), m, torch.zeros(2)).abs().max() < 1e-7
    assert normal_kl(m, torch.zeros(2), m + 1, torch.zeros(2)).tolist() == pytest.approx([0.5, 0.5])
    # The 256 bins of the discretised Gaussian hold all the probability mass.
    bins = torch.linspace(-1, 1, 256)
    p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3))).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_hybrid_loss_trains_sigma_only_through_the_bound() -> None:
    d = create_diffusion("dit")
    out = torch.randn(4, 3, 4, requires_grad=True)  # [ε | v] for 2 latent channels
    x0 = torch.randn(4, 3, 2)
    t = torch.tensor([0, 10, 500, 999])
    losses = d.training_loss(lambda x, tt: out, x0, t=t)
    assert set(losses) >= {"loss", "mse", "vb", "loss_per_sample", "t"}
    (grad,) = torch.autograd.grad(losses["vb"], out)
    assert grad[..., :2].abs().max() == 0  # stop-gradient on the mean
    assert grad[..., 2:].abs().max() > 0
    with pytest.raises(ConfigError, match="learn_sigma"):
        d.training_loss(lambda x, tt: torch.zeros_like(x), x0)


def _train(diffusion: GaussianDiffusion | FlowMatching, learn_sigma: bool, steps: int = 150) -> tuple[float, float]:
    """Loss of a tiny DiT on 4 fixed token sequences at fixed (t, noise), before and after training."""
    torch.manual_seed(0)
    cfg = DiTConfig.preset("dit-tiny").override({"num_classes": 4, "learn_sigma": learn_sigma, "class_dropout": 0.0})
    model = DiT(cfg)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, cfg.num_tokens, cfg.in_channels, generator=g)
    labels = torch.arange(4)
    eval_g = torch.Generator().manual_seed(1)
    x_eval = data.repeat(8, 1, 1)
    kw_eval = {"y": labels.repeat(8)}
    t_eval = (torch.randint(0, 1000, (32,), generator=eval_g) if isinstance(diffusion, GaussianDiffusion)
              else torch.rand(32, generator=eval_g))
    n_eval = torch.randn(x_eval.shape, generator=eval_g)

    def evaluate() -> float:
        with torch.no_grad():
            return diffusion.training_loss(model.eval(), x_eval, kw_eval, t=t_eval, noise=n_eval)["loss"].item()

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = diffusion.training_loss(model, data.repeat(4, 1, 1), {"y": labels.repeat(4)}, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return before, evaluate()


@pytest.mark.numerics  # re-run by `make test` on a second CPU code path
def test_diffusion_loss_falls_on_a_toy_set(one_thread) -> None:
    before, after = _train(create_diffusion("dit"), learn_sigma=True)
    assert before == pytest.approx(1.0, abs=0.15)  # the zero-initialised model predicts ε = 0
    assert after < 0.5 * before


def test_flow_matching_loss_falls_on_a_toy_set(one_thread) -> None:
    before, after = _train(create_diffusion("flow"), learn_sigma=False)
    assert after < 0.5 * before


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        DiffusionConfig(objective="flow", sampler="ddim")
    with pytest.raises(ConfigError, match="objective"):
        DiffusionConfig(objective="score")
    cfg = DiffusionConfig.preset("flow")
    assert cfg.default_sampler == "euler" and cfg.default_steps == 50
    assert DiffusionConfig.preset("dit").default_steps == 250
    assert isinstance(create_diffusion(cfg), FlowMatching)
