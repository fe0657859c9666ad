"""FSDP (PyTorch's ``fully_shard``) for the training loops: parameters, gradients and optimizer state sharded
across ranks, checkpoints written whole so that they load into a single-process model.

Why: DDP keeps a full copy of the weights, the EMA and both AdamW moments on every GPU (16 bytes per parameter
plus the EMA); a DiT-XL or a ViT-L tokenizer with its EMA fits, larger models do not. With ``fsdp=true`` every
transformer block (each child of a ``blocks`` ModuleList) is one FSDP unit and the loss module is the root, whose
pre-forward gathers the remaining parameters (embeddings, latent tokens, heads). The EMA copy is sharded the same
way, so its update stays local to each rank's shard.

Checkpoints: the model and EMA are gathered into ordinary full state dicts (the same keys as a single-process
model); the optimizer state is saved keyed by parameter name (``get_optimizer_state_dict``), which
:func:`load_optimizer` reads back with or without FSDP. Gathering is collective: every rank calls these functions,
the main rank writes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import TextokError
from ..distributed import DistInfo


def shard(root: nn.Module, model: nn.Module, info: DistInfo) -> nn.Module:
    """``fully_shard`` every block of ``model`` and then ``root`` (the module the loop calls; it holds ``model``)."""
    if not info.enabled:
        return root
    # lazily, like every torch.distributed import here: only a multi-process fsdp=true run pays for them
    from torch.distributed.fsdp import fully_shard

    units = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "blocks":
            for block in module:
                fully_shard(block)
                units += 1
    if units == 0:
        raise TextokError(f"fsdp=true found no transformer blocks in {type(model).__name__} to shard; use DDP")
    fully_shard(root)
    return root


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(module: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole state dict on the main rank (collective; other ranks get an empty dict)."""
    if not info.enabled:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a whole (single-process) state dict into a sharded module; every rank passes the same dict."""
    if not info.enabled:
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole, on the main rank (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options() if info.enabled else None)


def load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], info: DistInfo) -> None:
    """Restore an optimizer from either checkpoint form: keyed by parameter name (an FSDP run's) or by
    position (``opt.state_dict()``, a DDP or single-process run's)."""
    params = [p for g in state.get("param_groups", []) for p in g.get("params", [])]
    if not params or not isinstance(params[0], str):
        if info.enabled:
            raise TextokError("this checkpoint's optimizer state was saved without fsdp; resume it with fsdp=false")
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as a plain tensor."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


__all__ = ["shard", "full_state", "load_full_state", "optimizer_state", "load_optimizer", "local_value"]
