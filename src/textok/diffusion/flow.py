"""Flow matching (rectified flow): a second generator objective beside DiT's Gaussian diffusion.

x_t = (1 − t) x_0 + t ε for t ∈ [0, 1] (t = 1 is pure noise); the model predicts the constant velocity
u = ε − x_0 of that straight path with an MSE loss, and samples integrate dx/dt = v(x, t) from t = 1 to 0
with Euler or Heun steps. The model is called with ``t * timestep_scale`` so a DiT's timestep embedding,
built for 0..1000, sees the same range. A model with learned σ channels has them ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .config import DiffusionConfig
from .gaussian import _model_device, _randn, mean_flat
from .samplers import euler_loop, flow_time_grid, heun_loop, step_fn

ModelFn = Callable[..., Tensor]


class FlowMatching:
    """Rectified-flow training loss and ODE samplers with the same API as :class:`GaussianDiffusion`."""

    def __init__(self, config: DiffusionConfig | None = None, channel_dim: int = -1) -> None:
        self.config = config or DiffusionConfig(objective="flow", learn_sigma=False)
        if self.config.objective != "flow":
            raise ConfigError(f"FlowMatching needs objective='flow', got {self.config.objective!r}; use create_diffusion")
        self.channel_dim = channel_dim
        self.timestep_scale = self.config.flow_timestep_scale

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, channel_dim: int = -1) -> "FlowMatching":
        return cls(cfg, channel_dim)

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 − t) x_0 + t ε with per-sample t (B,)."""
        t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """Training times: uniform or logit-normal on (0, 1), then the configured shift."""
        gdev = generator.device if generator is not None else device
        if self.config.flow_time_sampling == "logit_normal":
            t = torch.sigmoid(torch.randn(n, generator=generator, device=gdev))
        else:
            t = torch.rand(n, generator=generator, device=gdev)
        s = self.config.flow_shift
        if s != 1.0:
            t = s * t / (1 + (s - 1) * t)
        return t.to(device)

    def _velocity(self, model_output: Tensor, x: Tensor) -> Tensor:
        cd = self.channel_dim % x.ndim
        C, out_c = x.shape[cd], model_output.shape[cd]
        if out_c not in (C, 2 * C):
            raise ConfigError(f"the model gives {out_c} output channels for {C} input channels")
        return model_output.narrow(cd, 0, C)

    def training_loss(
        self,
        model: ModelFn,
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Velocity MSE on a batch of clean latents; returns ``loss``, ``mse``, ``loss_per_sample``, ``t``."""
        B = x0.shape[0]
        if t is None:
            t = self.sample_t(B, x0.device, generator)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device).to(x0.dtype)
        xt = self.interpolate(x0, noise, t)
        out = model(xt, t * self.timestep_scale, **(model_kwargs or {}))
        v = self._velocity(out, xt)
        per_sample = mean_flat((v.float() - (noise - x0).float()) ** 2)
        loss = per_sample.mean()
        return {"loss": loss, "mse": loss.detach(), "loss_per_sample": per_sample.detach(), "t": t}

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
        """Integrate from noise (t = 1) to data (t = 0); ``sampler`` "euler" (``steps`` model calls) or
        "heun" (2 × steps − 1 calls). ``eta`` is accepted for API symmetry and ignored. ``cuda_graph``: replay
        each step's model call from a CUDA graph (GPU only; same numbers, fewer launches)."""
        sampler = sampler or self.config.default_sampler
        n = int(steps if steps is not None else self.config.default_steps)
        if n < 1:
            raise ConfigError(f"flow sampling needs at least 1 step, got {steps}")
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        x = noise.to(device).float() if noise is not None else _randn(tuple(shape), generator, device)
        fn = step_fn(model, cfg_scale, model_kwargs, cuda_graph)

        def velocity(xx: Tensor, tt: Tensor) -> Tensor:
            return self._velocity(fn(xx, tt * self.timestep_scale), xx).float()

        times = flow_time_grid(n, self.config.flow_shift, device)
        if sampler == "euler":
            return euler_loop(velocity, x, times, progress)
        if sampler == "heun":
            return heun_loop(velocity, x, times, progress)
        raise ConfigError(f"sampler {sampler!r} is unknown for flow matching; use 'euler' or 'heun'")


__all__ = ["FlowMatching"]
