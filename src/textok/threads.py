"""How many CPU threads torch uses: the cores this process may run on, minus those other work keeps busy.

Why: torch starts one thread per logical CPU. When other processes already occupy some cores, its threads wait
on each other at every parallel region and a small model runs many times slower than on one thread (measured on
a 2-core machine with one core busy: ``benchmarks/threads.py``). So the default is the physical cores this
process may use (``os.sched_getaffinity``), less the 1-minute load average of the machine (rounded), and at
least 1, shared among the processes of a node under torchrun (``LOCAL_WORLD_SIZE``). ``--threads N`` or
``TEXTOK_THREADS=N`` decide instead, and ``OMP_NUM_THREADS`` (torchrun sets it to 1) is respected.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import TextokError

THREADS_ENV = "TEXTOK_THREADS"


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on (logical CPUs when the topology is unknown)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def busy_cores() -> int:
    """Cores that other work keeps busy: the machine's 1-minute load average, rounded (0 where unknown)."""
    try:
        return round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def default_threads(cores: int | None = None, busy: int | None = None) -> int:
    """The usable physical cores not kept busy by other work, at least 1."""
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, cores - busy))


def choose_threads(requested: int | str | None = None) -> tuple[int, str]:
    """(threads, where the number comes from): ``requested`` (``--threads``), else ``$TEXTOK_THREADS``, else
    :func:`default_threads`. 0 also means the default."""
    for value, source in ((requested, "--threads"), (os.environ.get(THREADS_ENV), THREADS_ENV),
                          (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")):
        if value in (None, ""):
            continue
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise TextokError(f"{source} must be a whole number of threads; got {value!r}") from None
        if n < 0:
            raise TextokError(f"{source} must be positive (0 = choose from the free cores); got {n}")
        if n:
            return n, source
    cores, busy = usable_cores(), busy_cores()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # torchrun's processes on this node
    why = f"{cores} cores, {min(busy, cores)} busy by the load average"
    if processes > 1:
        return max(1, default_threads(cores, busy) // processes), f"{why}, shared by {processes} processes"
    return default_threads(cores, busy), why


def set_threads(requested: int | str | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count by :func:`choose_threads`; returns what it chose and why."""
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return n, why


__all__ = ["THREADS_ENV", "busy_cores", "choose_threads", "default_threads", "set_threads", "usable_cores"]
