"""Configuration of the generator's diffusion process (Gaussian DDPM as DiT, or flow matching)."""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..errors import ConfigError

GAUSSIAN_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun")


@dataclasses.dataclass
class DiffusionConfig(Config):
    """What is trained (``objective``) and how it is sampled.

    ``objective="ddpm"`` is DiT's recipe: a linear β schedule over 1000 steps, ε-prediction with MSE and,
    with ``learn_sigma``, the hybrid loss of improved DDPM (MSE + variational bound on the learned
    variance). ``objective="flow"`` is rectified flow: x_t = (1 − t) x0 + t ε, the model predicts the
    velocity ε − x0, sampled with Euler or Heun steps from t = 1 to 0.
    """

    objective: str = "ddpm"  # "ddpm" | "flow"
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (DiT) | "cosine" (improved DDPM)
    learn_sigma: bool = True  # ddpm only: the model also outputs the variance interpolation v
    fixed_variance: str = "large"  # ddpm, learn_sigma=False: "large" (β_t, DiT) | "small" (posterior)
    sampler: str = ""  # "ddpm" | "ddim" | "euler" | "heun"; "" = ddpm (objective ddpm) / euler (flow)
    sampling_steps: int = 0  # 0 = 250 (ddpm, as DiT) / 50 (flow)
    ddim_eta: float = 0.0  # 0 = deterministic DDIM
    clip_denoised: float = 0.0  # > 0: clamp the predicted x0 to [-c, c] while sampling; 0 = off (latents)
    flow_time_sampling: str = "uniform"  # "uniform" | "logit_normal" (SD3)
    flow_shift: float = 1.0  # SD3 time shift t' = s t / (1 + (s − 1) t); 1 = none
    flow_timestep_scale: float = 1000.0  # the model sees t * scale (DiT's embedding expects 0..1000)

    def __post_init__(self) -> None:
        if self.objective not in ("ddpm", "flow"):
            raise ConfigError(f"diffusion objective {self.objective!r} is unknown; use 'ddpm' or 'flow'")
        if self.num_timesteps < 2:
            raise ConfigError(f"num_timesteps={self.num_timesteps} must be at least 2")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ConfigError(f"beta_schedule {self.beta_schedule!r} is unknown; use 'linear' or 'cosine'")
        if self.fixed_variance not in ("large", "small"):
            raise ConfigError(f"fixed_variance {self.fixed_variance!r} is unknown; use 'large' or 'small'")
        allowed = GAUSSIAN_SAMPLERS if self.objective == "ddpm" else FLOW_SAMPLERS
        if self.sampler and self.sampler not in allowed:
            raise ConfigError(
                f"sampler {self.sampler!r} does not fit objective {self.objective!r}; use one of {', '.join(allowed)}"
            )
        if self.flow_time_sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"flow_time_sampling {self.flow_time_sampling!r} is unknown; use 'uniform' or 'logit_normal'")
        if self.flow_shift <= 0:
            raise ConfigError(f"flow_shift={self.flow_shift} must be positive")
        if self.ddim_eta < 0:
            raise ConfigError(f"ddim_eta={self.ddim_eta} must be >= 0")

    @property
    def default_sampler(self) -> str:
        return self.sampler or ("ddpm" if self.objective == "ddpm" else "euler")

    @property
    def default_steps(self) -> int:
        return self.sampling_steps or (250 if self.objective == "ddpm" else 50)


@DiffusionConfig.register_preset("dit")
def _dit() -> DiffusionConfig:
    """DiT's setting: linear schedule, 1000 steps, learned σ, 250 DDPM sampling steps."""
    return DiffusionConfig()


@DiffusionConfig.register_preset("flow")
def _flow() -> DiffusionConfig:
    """Rectified flow with Euler sampling over 50 steps."""
    return DiffusionConfig(objective="flow", learn_sigma=False)


__all__ = ["DiffusionConfig", "GAUSSIAN_SAMPLERS", "FLOW_SAMPLERS"]
