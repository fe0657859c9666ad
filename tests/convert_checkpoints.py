"""Helpers shared by the convert tests: a random checkpoint in a format's official key layout (built from its
manifest, so no official code is needed) and a CLI call that returns its exit code and output."""

from __future__ import annotations

import torch

from textok.cli import main
from textok.convert import load_manifest


def random_checkpoint(fmt: str, variant: str = "tiny-test", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the official layout; the buffers VAR derives from its scales hold what VAR puts there."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in load_manifest(fmt)[variant].keys.items()}
    if fmt == "var":
        scales = load_manifest(fmt)[variant].settings["patch_nums"]
        level = torch.cat([torch.full((pn * pn,), float(s)) for s, pn in enumerate(scales)])
        state["lvl_1L"] = level[None]
        state["attn_bias_for_masking"] = torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)[None, None]
        for key in state:
            if key.endswith("zero_k_bias"):
                state[key] = torch.zeros_like(state[key])
    return state


def run(argv: list, capsys) -> tuple[int, str, str]:
    """``textok ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
