"""Helpers shared by the convert tests: a random checkpoint in a format's official key layout (built from its
manifest, so no official code is needed) and a CLI call that returns its exit code and output."""

from __future__ import annotations

from typing import Any, Callable

import torch

from textok.cli import main
from textok.convert import load_manifest


def random_checkpoint(fmt: str, variant: str = "tiny-test", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the official layout; the buffers VAR derives from its scales hold what VAR puts there."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in load_manifest(fmt)[variant].keys.items()}
    if fmt in ("var", "imagefolder-var"):
        scales = load_manifest(fmt)[variant].settings["patch_nums"]
        level = torch.cat([torch.full((pn * pn,), float(s)) for s, pn in enumerate(scales)])
        state["lvl_1L"] = level[None]
        state["attn_bias_for_masking"] = torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)[None, None]
        for key in state:
            if key.endswith("zero_k_bias"):
                state[key] = torch.zeros_like(state[key])
    if fmt == "imagefolder":  # the level of each position: class token and patches 0, then the latent tokens
        s = load_manifest(fmt)[variant].settings
        prefix, K2 = [0] * (1 + (s["image_size"] // s["patch_size"]) ** 2), s["num_latent_tokens"]
        state["encoder.lvl1LC"] = torch.tensor([prefix + [p + 1 for p in range(s["product_quant"]) for _ in range(K2)]])
        state["decoder.lvl1LC"] = torch.tensor([prefix + [1] * (1 + K2)])
    if fmt == "dit":  # the fixed positions DiT stores, as its code computes them
        v = load_manifest(fmt)[variant]
        grid = v.settings["input_size"] // v.settings["patch_size"]
        state["pos_embed"] = official_dit_pos_embed(v.settings["hidden_size"], grid)[None].float()
    return state


def official_dit_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT's get_2d_sincos_pos_embed restated (MAE's): a meshgrid with the column coordinate first, half the channels
    per coordinate, each half [sin | cos] of positions x 1 / 10000^(2i / (dim/2)); (grid^2, dim) in float64."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        angles = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1)


def run(argv: list, capsys) -> tuple[int, str, str]:
    """``textok ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_info_and_reconstruct(model_dir, image_size: int, tmp_path, capsys, info_says: str) -> None:
    """A converted tokenizer through the CLI: ``textok info`` names ``info_says``, ``textok reconstruct`` writes
    the reconstruction of a random ``image_size`` picture."""
    from PIL import Image

    code, out, err = run(["info", model_dir], capsys)
    assert code == 0 and info_says in out, err
    img_path = tmp_path / "x.png"
    Image.fromarray((torch.rand(image_size, image_size, 3) * 255).byte().numpy()).save(img_path)
    code, out, err = run(["reconstruct", "--model", model_dir, "--image", img_path, "--out", tmp_path / "r.png"],
                         capsys)
    assert code == 0 and (tmp_path / "r.png").is_file(), err


def check_published_layout(fmt: str, variant: str, make_config: Callable, map_state: Callable,
                           build: Callable) -> Any:
    """A full-size release on the meta device: its manifest's keys, mapped by ``map_state(state, config)``, are
    exactly the keys and shapes of the model ``build(config)`` makes, ``config = make_config(variant entry)``.
    Returns the config, for the test's own checks of the published settings."""
    v = load_manifest(fmt)[variant]
    state = {k: torch.empty(shape, device="meta") for k, shape in v.keys.items()}
    config = make_config(v)
    mapped = map_state(state, config)
    with torch.device("meta"):
        model = build(config)
    assert {k: tuple(t.shape) for k, t in mapped.items()} == {k: tuple(t.shape) for k, t in model.state_dict().items()}
    return config
