"""Exponential moving average of model weights (the weights a trained tokenizer ships with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * weights`` after each step, buffers copied.

    ``d = min(decay, (1 + step) / (10 + step))`` warms the average up: without it a short run's EMA is
    mostly the random initialisation (0.999^800 = 45% after 800 steps).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        sharded = lambda t: hasattr(t, "full_tensor")  # noqa: E731 (a DTensor)
        pairs = [(e, p) for e, p in zip(ema_params, params) if sharded(e) != sharded(p)]
        if pairs:  # FSDP: one side sharded (a DTensor), the other whole; all ranks update, so gathers are collective
            from torch.distributed.tensor import DTensor, distribute_tensor

            for e, p in pairs:
                full = (e.full_tensor() if isinstance(e, DTensor) else e).lerp(
                    p.full_tensor() if isinstance(p, DTensor) else p, 1.0 - decay)
                e.copy_(distribute_tensor(full, e.device_mesh, e.placements) if isinstance(e, DTensor) else full)
            keep = [i for i, (e, p) in enumerate(zip(ema_params, params)) if sharded(e) == sharded(p)]
            ema_params, params = [ema_params[i] for i in keep], [params[i] for i in keep]
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
