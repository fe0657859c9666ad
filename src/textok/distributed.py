"""DDP set-up from torchrun's environment (NCCL on GPU, gloo on CPU); a no-op for a single process."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .devices import resolve_device


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and join the process group if world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) of every process, concatenated in rank order (W B, ...), differentiable: each process's
    rows get the sum of the gradients every process sends them (``torch.distributed.nn``'s all_gather), so a
    loss every process computes over the gathered batch, averaged over the processes by DDP, trains as the
    one-process loss over the whole batch. Returns ``x`` itself without a process group. Every process must
    call it, with the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn import functional as dist_nn  # lazy: only collective training needs it

    return torch.cat(dist_nn.all_gather(x), dim=0)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """``flag`` of every rank OR-ed together, the same answer on all of them (one scalar all-reduce)."""
    if not (info.enabled and dist.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistInfo]:
    """Join the process group for the duration of a training run and leave it afterwards, error or not."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup(info)


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when running under torchrun, the module itself otherwise."""
    if not info.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
