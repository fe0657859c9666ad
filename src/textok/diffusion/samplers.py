"""Sampling loops: DDPM / DDIM for Gaussian diffusion, Euler / Heun for flow matching.

Each loop runs over the steps only; every step is one batched model call (with classifier-free guidance,
one call over the doubled batch inside the model's ``forward_with_cfg``). The state is kept in float32
whatever precision the model runs in.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch
from torch import Tensor

from ..errors import ConfigError
from ..progress import progress_bar

StepFn = Callable[[Tensor, Tensor], Tensor]


class Chain(Protocol):
    """What the DDPM and DDIM loops ask of a (respaced) Gaussian diffusion."""

    num_timesteps: int

    def model_timesteps(self, t: Tensor) -> Tensor: ...

    def p_sample_step(self, model_output: Tensor, xt: Tensor, t: Tensor, noise: Tensor) -> Tensor: ...

    def ddim_step(self, model_output: Tensor, xt: Tensor, t: Tensor, eta: float, noise: Tensor | None) -> Tensor: ...


def guided_model_fn(model: Callable[..., Tensor], cfg_scale: float = 1.0, model_kwargs: dict[str, Any] | None = None) -> StepFn:
    """``fn(x, t)`` that evaluates ``model`` with its conditioning and classifier-free guidance.

    Scale 1 is a plain conditional call. Otherwise a model with ``forward_with_cfg`` (a DiT) is guided
    through it (cond and uncond in one batch); any other callable receives ``cfg_scale=`` and guides itself.
    """
    kwargs = dict(model_kwargs or {})
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, **kwargs)
    guided = getattr(model, "forward_with_cfg", None)
    if guided is not None:
        return lambda x, t: guided(x, t, cfg_scale=cfg_scale, **kwargs)
    return lambda x, t: model(x, t, cfg_scale=cfg_scale, **kwargs)


class CudaGraphStep:
    """``fn(x, t)`` replayed from a CUDA graph: one launch per sampling step instead of one per kernel.

    The first call (and any call with new shapes) warms ``fn`` up on a side stream and captures it with
    static input buffers; later calls copy ``x`` and ``t`` into the buffers and replay. Everything else
    ``fn`` reads (weights, class labels, text states) is captured as it is, so it must not change during the
    loop, which is true of a sampling loop. Outputs are cloned, so a step may keep earlier ones (Heun does).
    """

    def __init__(self, fn: StepFn, warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_t = self.static_out = None

    def _capture(self, x: Tensor, t: Tensor) -> None:
        self.static_x, self.static_t = x.clone(), t.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(self.static_x, self.static_t)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(self.static_x, self.static_t)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.device.type != "cuda":
            raise ConfigError("CUDA-graph sampling needs a CUDA device; sample without cuda_graph on a CPU")
        if self.graph is None or x.shape != self.static_x.shape or t.shape != self.static_t.shape \
                or t.dtype != self.static_t.dtype:
            self._capture(x, t)
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_out.clone()


def step_fn(model: Callable[..., Tensor], cfg_scale: float, model_kwargs: dict[str, Any] | None,
            cuda_graph: bool) -> StepFn:
    """The guided model call of one sampling step, optionally replayed from a CUDA graph."""
    fn = guided_model_fn(model, cfg_scale, model_kwargs)
    return CudaGraphStep(fn) if cuda_graph else fn


def _steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    seq: Iterable[int] = range(n - 1, -1, -1)
    if progress:
        seq = progress_bar(list(seq), desc=desc, leave=False)
    return seq


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


def ddpm_loop(chain: Chain, fn: StepFn, x: Tensor, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Ancestral sampling through every step of ``chain`` (respaced or not); returns x_0."""
    B = x.shape[0]
    for i in _steps(chain.num_timesteps, progress, "ddpm"):
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        out = fn(x, chain.model_timesteps(t))
        noise = _noise_like(x, generator) if i > 0 else torch.zeros_like(x)
        x = chain.p_sample_step(out, x, t, noise)
    return x


def ddim_loop(
    chain: Chain,
    fn: StepFn,
    x: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM through every step of ``chain``; with η = 0 no noise is drawn (deterministic given x_T)."""
    B = x.shape[0]
    for i in _steps(chain.num_timesteps, progress, "ddim"):
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        out = fn(x, chain.model_timesteps(t))
        noise = _noise_like(x, generator) if (eta > 0 and i > 0) else None
        x = chain.ddim_step(out, x, t, eta, noise)
    return x


def flow_time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """Times 1 → 0 (``steps`` + 1 values) for flow sampling, with SD3's shift s t / (1 + (s − 1) t)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.to(device=device, dtype=torch.float32)


def euler_loop(velocity: StepFn, x: Tensor, times: Tensor, progress: bool = False) -> Tensor:
    """Integrate dx/dt = v(x, t) from times[0] (noise) to times[-1] (data) with Euler steps."""
    B = x.shape[0]
    idx: Iterable[int] = range(len(times) - 1)
    if progress:
        idx = progress_bar(list(idx), desc="euler", leave=False)
    for i in idx:
        t_cur, t_next = times[i], times[i + 1]
        x = x + (t_next - t_cur) * velocity(x, t_cur.expand(B))
    return x


def heun_loop(velocity: StepFn, x: Tensor, times: Tensor, progress: bool = False) -> Tensor:
    """Heun's 2nd-order method (EDM's sampler without churn); the last step to t = 0 is an Euler step."""
    B = x.shape[0]
    idx: Iterable[int] = range(len(times) - 1)
    if progress:
        idx = progress_bar(list(idx), desc="heun", leave=False)
    last_is_zero = float(times[-1]) <= 0  # read once: no host sync inside the loop
    for i in idx:
        t_cur, t_next = times[i], times[i + 1]
        dt = t_next - t_cur
        d = velocity(x, t_cur.expand(B))
        x_euler = x + dt * d
        if not (last_is_zero and i == len(times) - 2):
            d2 = velocity(x_euler, t_next.expand(B))
            x = x + dt * 0.5 * (d + d2)
        else:
            x = x_euler
    return x


__all__ = ["guided_model_fn", "CudaGraphStep", "step_fn", "ddpm_loop", "ddim_loop", "euler_loop", "heun_loop", "flow_time_grid"]
