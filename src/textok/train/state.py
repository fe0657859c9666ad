"""Pickle-free serialisation of nested training state (optimizer state dicts, RNG states, counters).

A nested structure of dicts/lists/scalars/tensors is split into a JSON skeleton (tensors replaced by
``{"__tensor__": key}``) and a flat ``{key: tensor}`` dict written with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def split_tensors(obj: Any, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, (list, tuple)):
            return {"__list__" if isinstance(x, list) else "__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, (int, float, str, bool)) or x is None:
            return x
        raise TypeError(f"cannot serialise {type(x).__name__} at {path}")

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {walk(k): walk(v) for k, v in x["__dict__"]}
            if "__list__" in x:
                return [walk(v) for v in x["__list__"]]
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
        return x

    return walk(skeleton)


def save_state(obj: Any, path_stem: Path) -> None:
    """Write ``<stem>.json`` + ``<stem>.safetensors``."""
    skeleton, tensors = split_tensors(obj)
    path_stem.with_suffix(".json").write_text(json.dumps(skeleton))
    save_file(tensors, str(path_stem.with_suffix(".safetensors")))


def load_state(path_stem: Path, device: str | torch.device = "cpu") -> Any:
    skeleton = json.loads(path_stem.with_suffix(".json").read_text())
    tensors = load_file(str(path_stem.with_suffix(".safetensors")), device=str(device))
    return join_tensors(skeleton, tensors)
