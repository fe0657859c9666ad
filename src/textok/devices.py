"""Where and in which precision textok computes: one resolver of ``--device`` / ``device=`` specs, and the
autocast a precision setting means on a device.

Why: every verb takes a device, and a spec this machine cannot serve (``cuda`` without a GPU, a typo) should
be one line naming it, not an assertion deep inside PyTorch.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import TextokError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is checked against this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise TextokError(f"device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TextokError(f"device {spec!r}: this machine has no CUDA GPU (or PyTorch was built without CUDA); "
                              "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TextokError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "mps"):
        raise TextokError(f"device {spec!r} is not supported here: use auto, cpu, cuda or cuda:N")
    return device


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (or when asked), nothing (fp32) otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
