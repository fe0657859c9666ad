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

Every training task (the tokenizers' and the generators') goes through the same four calls:
:func:`shard_training` when it builds its parts, :func:`training_state` / :func:`restore_training` for its
checkpoint, and :func:`final_model` for ``final/``; with ``fsdp=false`` they are the plain single-process or DDP
forms.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import TextokError
from ..distributed import DistInfo
from .ema import EMA


def shard(root: nn.Module, model: nn.Module, info: DistInfo) -> nn.Module:
    """``fully_shard`` every block of ``model`` and then ``root`` (the module the loop calls; it holds ``model``).

    A model without blocks is refused on one process too, so that the mistake shows before a multi-GPU launch."""
    blocks = [block for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "blocks" for block in module]
    if not blocks:
        raise TextokError(f"fsdp=true found no transformer blocks in {type(model).__name__} to shard; use DDP")
    if not info.enabled:
        return root
    # lazily, like every torch.distributed import here: only a multi-process fsdp=true run pays for them
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
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


def shard_training(loss_module: nn.Module, model: nn.Module, ema: EMA, info: DistInfo,
                   optimizer: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """Shard ``model`` (inside ``loss_module``, the module the loop calls) and its EMA the same way, so the EMA update
    stays local to each rank's shard; returns a new ``optimizer()``, made over the shards (an optimizer made before
    holds the whole tensors that sharding replaced)."""
    shard(loss_module, model, info)
    shard(ema.model, ema.model, info)
    return optimizer()


def training_state(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, sharded: DistInfo | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model, EMA, optimizer) state for a checkpoint. ``sharded`` (an FSDP run): gathered whole, collectively,
    with a single-process model's keys and the optimizer keyed by parameter name; else as the modules hold them."""
    if sharded is None:
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    return full_state(model, sharded), full_state(ema.model, sharded), optimizer_state(model, opt, sharded)


def restore_training(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                     state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]],
                     sharded: DistInfo | None) -> None:
    """Load what :func:`training_state` saved, from an FSDP run or not; an FSDP run refuses an optimizer state saved
    without FSDP (:func:`load_optimizer`)."""
    model_state, ema_state, opt_state = state
    if sharded is not None:
        load_full_state(model, model_state, sharded)
        load_full_state(ema.model, ema_state, sharded)
    else:
        model.load_state_dict(model_state)
        ema.load_state_dict(ema_state)
    load_optimizer(model, opt, opt_state, sharded or DistInfo())


def final_model(ema: EMA, info: DistInfo, sharded: bool, plain: Callable[[], nn.Module]) -> nn.Module | None:
    """The EMA model that ``final/`` saves, on the main rank (None on the others). ``sharded``: gathered
    (collectively) into ``plain()``, a fresh single-process model of the same config, so that ``final/`` is
    exactly what ``from_pretrained`` on one process builds."""
    if not sharded:
        return ema.model if info.is_main else None
    weights = full_state(ema.model, info)
    if not info.is_main:
        return None
    model = plain()
    model.load_state_dict(weights)
    return model


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as a plain tensor."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


__all__ = ["final_model", "full_state", "load_full_state", "load_optimizer", "local_value", "optimizer_state",
           "restore_training", "shard", "shard_training", "training_state"]
