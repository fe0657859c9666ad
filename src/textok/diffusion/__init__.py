"""Diffusion for the generator: DiT's Gaussian diffusion (DDPM/DDIM, respacing, learned σ) and flow matching.

Both objects share one API, so a training loop and the ``sample`` command need not know which is used::

    diffusion = create_diffusion(DiffusionConfig.preset("dit"))        # or "flow"
    losses = diffusion.training_loss(model, x0, {"y": labels})         # losses["loss"].backward()
    z = diffusion.sample(model, (B, N, C), steps=250, sampler="ddpm",
                         cfg_scale=4.0, model_kwargs={"y": labels}, generator=g)
"""

from __future__ import annotations

from .config import FLOW_SAMPLERS, GAUSSIAN_SAMPLERS, DiffusionConfig
from .flow import FlowMatching
from .gaussian import (
    GaussianDiffusion,
    beta_schedule,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .respace import respaced_betas, space_timesteps
from .samplers import ddim_loop, ddpm_loop, euler_loop, flow_time_grid, guided_model_fn, heun_loop


def create_diffusion(cfg: DiffusionConfig | str | None = None, channel_dim: int = -1) -> GaussianDiffusion | FlowMatching:
    """A :class:`GaussianDiffusion` (objective "ddpm") or :class:`FlowMatching` (objective "flow").

    ``cfg`` may be a config, a preset name ("dit", "flow") or a JSON/YAML file; ``channel_dim`` is the
    channel axis of the latents (−1 for (B, N, C) tokens).
    """
    cfg = DiffusionConfig() if cfg is None else DiffusionConfig.resolve(cfg)
    if cfg.objective == "flow":
        return FlowMatching(cfg, channel_dim)
    return GaussianDiffusion.from_config(cfg, channel_dim)


__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "FlowMatching",
    "create_diffusion",
    "beta_schedule",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "space_timesteps",
    "respaced_betas",
    "guided_model_fn",
    "ddpm_loop",
    "ddim_loop",
    "euler_loop",
    "heun_loop",
    "flow_time_grid",
    "GAUSSIAN_SAMPLERS",
    "FLOW_SAMPLERS",
]
