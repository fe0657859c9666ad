"""Gaussian diffusion as trained and sampled by DiT (DDPM with ε-prediction, improved-DDPM learned σ).

Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) over ``num_timesteps`` steps with a linear β
schedule. The model predicts ε (MSE loss); with ``learn_sigma`` it also predicts v ∈ [−1, 1], which
interpolates the reverse log-variance between the posterior variance β̃_t and β_t, trained by the
variational bound with the mean frozen (stop-gradient on ε), the "hybrid" loss of improved DDPM that DiT
uses. Every function works on a whole batch with per-sample timesteps; sampling loops over steps only
(see :mod:`textok.diffusion.samplers`).

Schedules are kept in float64 on the CPU and copied once per device in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .config import DiffusionConfig
from .respace import respaced_betas, space_timesteps
from .samplers import ddim_loop, ddpm_loop, step_fn

ModelFn = Callable[..., Tensor]


# ---- schedules -------------------------------------------------------------------------------
def beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """β_1..β_T in float64. "linear": DDPM's 1e-4 → 0.02, rescaled to T steps; "cosine": improved DDPM."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"beta schedule {name!r} is unknown; use 'linear' or 'cosine'")


# ---- likelihood terms ------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bin_width: float = 2.0 / 255) -> Tensor:
    """log P(x) of data in [−1, 1] quantised to bins of ``bin_width`` under N(mean, e^{2 log_scale}).

    The decoder term L_0 of DDPM; the two edge bins extend to ±∞. DiT applies it to VAE latents as is, and so
    do we (it only enters the loss at t = 0).
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + bin_width / 2)
    lower = inv_std * (centered - bin_width / 2)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Standard normal noise; drawn on the generator's device (so a CPU generator works for GPU samples)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    if generator is None:
        return torch.randint(0, high, (n,), device=device)
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


class GaussianDiffusion:
    """A (possibly respaced) discrete Gaussian diffusion process.

    ``channel_dim`` is the axis that holds the latent channels (−1 for (B, N, C) tokens, 1 for images);
    a learned-σ model outputs twice as many channels there: [ε | v].
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        learn_sigma: bool = True,
        fixed_variance: str = "large",
        clip_denoised: float = 0.0,
        channel_dim: int = -1,
        timestep_map: list[int] | None = None,
        config: DiffusionConfig | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ConfigError("betas must be a 1D schedule with values in (0, 1]")
        self.config = config or DiffusionConfig(learn_sigma=learn_sigma, fixed_variance=fixed_variance)
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.clip_denoised = clip_denoised
        self.channel_dim = channel_dim
        self.num_timesteps = int(betas.shape[0])
        # Timestep given to the model for each index of this chain (the original step for a respaced one).
        self.timestep_map = torch.as_tensor(
            timestep_map if timestep_map is not None else list(range(self.num_timesteps)), dtype=torch.long
        )

        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self._arrays: dict[str, Tensor] = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            # β̃_0 = 0: clip the log at t = 0 by using β̃_1 there (as improved DDPM). A one-step chain has no
            # β̃_1; its single step adds no noise, so β_0 stands in (the value only has to be finite).
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])
                                                        if len(post_var) > 1 else betas[:1]),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
            # DiT's fixed "large" variance: β_t, with β̃_1 at t = 0.
            "large_variance": torch.cat([post_var[1:2], betas[1:]]) if len(post_var) > 1 else betas[:1],
        }
        self._device_cache: dict[tuple[str, str], Tensor] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, channel_dim: int = -1) -> "GaussianDiffusion":
        if cfg.objective != "ddpm":
            raise ConfigError(f"GaussianDiffusion needs objective='ddpm', got {cfg.objective!r}; use create_diffusion")
        return cls(
            beta_schedule(cfg.beta_schedule, cfg.num_timesteps),
            learn_sigma=cfg.learn_sigma,
            fixed_variance=cfg.fixed_variance,
            clip_denoised=cfg.clip_denoised,
            channel_dim=channel_dim,
            config=cfg,
        )

    # ---- schedule access -------------------------------------------------------------------
    def array(self, name: str) -> Tensor:
        """A schedule array in float64 (CPU), e.g. ``array("alphas_cumprod")``."""
        return self._arrays[name]

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._arrays["alphas_cumprod"]

    @property
    def betas(self) -> Tensor:
        return self._arrays["betas"]

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """arr[t] as float32 on ``like``'s device, shaped to broadcast against ``like``."""
        key = (name, str(like.device))
        arr = self._device_cache.get(key)
        if arr is None:
            arr = self._device_cache[key] = self._arrays[name].to(device=like.device, dtype=torch.float32)
        return arr[t].view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Index into this chain -> timestep the model was trained with."""
        return self.timestep_map.to(t.device)[t]

    # ---- forward process -------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        return mean, self._extract("posterior_variance", t, xt), self._extract("posterior_log_variance_clipped", t, xt)

    # ---- reverse process -------------------------------------------------------------------
    def split_output(self, model_output: Tensor, xt: Tensor) -> tuple[Tensor, Tensor | None]:
        """Model output -> (ε, v or None), checking the channel count."""
        cd = self.channel_dim % xt.ndim
        C = xt.shape[cd]
        out_c = model_output.shape[cd]
        if self.learn_sigma:
            if out_c != 2 * C:
                raise ConfigError(
                    f"the diffusion learns σ and expects {2 * C} output channels, the model gives {out_c}; "
                    "set learn_sigma the same in the model and the diffusion config"
                )
            eps, v = model_output.split(C, dim=cd)
            return eps, v
        if out_c not in (C, 2 * C):
            raise ConfigError(f"the model gives {out_c} output channels for {C} input channels")
        return model_output.narrow(cd, 0, C), None  # a learned-σ model sampled with a fixed variance

    def p_mean_variance(self, model_output: Tensor, xt: Tensor, t: Tensor, clip_denoised: float | None = None) -> dict[str, Tensor]:
        """p(x_{t−1} | x_t) from the model's output: mean, variance, log_variance, pred_x0, eps."""
        eps, v = self.split_output(model_output.float(), xt)
        if v is not None:
            min_log = self._extract("posterior_log_variance_clipped", t, xt)
            max_log = self._extract("log_betas", t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        elif self.fixed_variance == "large":
            var = self._extract("large_variance", t, xt)
            log_var = torch.log(var)
        else:
            var = self._extract("posterior_variance", t, xt)
            log_var = self._extract("posterior_log_variance_clipped", t, xt)
        pred_x0 = self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        if clip and clip > 0:
            pred_x0 = pred_x0.clamp(-clip, clip)
            eps = (self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - pred_x0) / self._extract(
                "sqrt_recipm1_alphas_cumprod", t, xt
            )
        mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "variance": var.expand_as(xt), "log_variance": log_var.expand_as(xt), "pred_x0": pred_x0, "eps": eps}

    def p_sample_step(self, model_output: Tensor, xt: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One ancestral (DDPM) step x_t -> x_{t−1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model_output, xt, t)
        nonzero = (t != 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_step(self, model_output: Tensor, xt: Tensor, t: Tensor, eta: float, noise: Tensor | None) -> Tensor:
        """One DDIM step x_t -> x_{t−1} (Song et al.); η = 0 is deterministic, η = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model_output, xt, t)
        ac = self._extract("alphas_cumprod", t, xt)
        ac_prev = self._extract("alphas_cumprod_prev", t, xt)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        mean = out["pred_x0"] * torch.sqrt(ac_prev) + torch.sqrt((1 - ac_prev - sigma**2).clamp(min=0)) * out["eps"]
        if eta == 0 or noise is None:
            return mean
        nonzero = (t != 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return mean + nonzero * sigma * noise

    # ---- training --------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational-bound term in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p) for t > 0, −log p(x_0|x_1) at 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t, clip_denoised=0.0)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_loss(
        self,
        model: ModelFn,
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """DiT's loss on a batch of clean latents ``x0``: ``model(x_t, timestep, **model_kwargs)``.

        Returns ``loss`` (scalar, to backprop), ``mse`` and, with learned σ, ``vb`` (batch means), plus the
        per-sample ``loss_per_sample`` and the sampled ``t``. ``t``/``noise`` may be given (else drawn from
        ``generator``).
        """
        B = x0.shape[0]
        if t is None:
            t = _randint(self.num_timesteps, B, generator, x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device).to(x0.dtype)
        xt = self.q_sample(x0, t, noise)
        model_output = model(xt, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self.split_output(model_output, xt)
        mse = mean_flat((noise.float() - eps.float()) ** 2)
        terms = {"mse": mse.mean()}
        per_sample = mse
        if v is not None:
            # The bound trains only the variance: the mean enters with a stop-gradient (improved DDPM).
            frozen = torch.cat([eps.detach(), v], dim=self.channel_dim)
            vb = self.vb_terms_bpd(frozen, x0.float(), xt.float(), t)
            terms["vb"] = vb.mean()
            per_sample = per_sample + vb
        terms["loss"] = per_sample.mean()
        terms["loss_per_sample"] = per_sample.detach()
        terms["t"] = t
        return terms

    # ---- sampling --------------------------------------------------------------------------
    def respace(self, spec: int | str) -> "GaussianDiffusion":
        """The chain through a subset of steps (``space_timesteps`` spec, e.g. 250 or "ddim50"); cached."""
        key = str(spec).strip().lower()
        if key == str(self.num_timesteps):
            return self
        if key not in self._respaced:
            use = space_timesteps(self.num_timesteps, spec)
            betas = respaced_betas(self.alphas_cumprod, use)
            self._respaced[key] = GaussianDiffusion(
                torch.tensor(betas, dtype=torch.float64),
                learn_sigma=self.learn_sigma,
                fixed_variance=self.fixed_variance,
                clip_denoised=self.clip_denoised,
                channel_dim=self.channel_dim,
                timestep_map=[int(self.timestep_map[u]) for u in use],
                config=self.config,
            )
        return self._respaced[key]

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        steps: int | str | None = None,
        sampler: str | None = None,
        cfg_scale: float = 1.0,
        model_kwargs: dict[str, Any] | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        cuda_graph: bool = False,
    ) -> Tensor:
        """Generate latents of ``shape`` from pure noise.

        ``model``: a DiT (guided through ``forward_with_cfg`` when ``cfg_scale != 1``) or any callable
        ``fn(x, t, **model_kwargs)`` (called with ``cfg_scale=`` when ``cfg_scale != 1``). ``steps``: a respacing
        spec (default: the config's, 250 for DiT). ``sampler``: "ddpm" or "ddim" (with ``eta``).
        ``cuda_graph``: replay each step's model call from a CUDA graph (GPU only; same numbers, fewer launches).
        """
        sampler = sampler or self.config.default_sampler
        steps = steps if steps is not None else self.config.default_steps
        eta = self.config.ddim_eta if eta is None else eta
        chain = self.respace(steps)
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        x = noise.to(device).float() if noise is not None else _randn(tuple(shape), generator, device)
        fn = step_fn(model, cfg_scale, model_kwargs, cuda_graph)
        if sampler == "ddpm":
            return ddpm_loop(chain, fn, x, generator=generator, progress=progress)
        if sampler == "ddim":
            return ddim_loop(chain, fn, x, eta=eta, generator=generator, progress=progress)
        raise ConfigError(f"sampler {sampler!r} is unknown for Gaussian diffusion; use 'ddpm' or 'ddim'")


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


__all__ = [
    "GaussianDiffusion",
    "beta_schedule",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]
