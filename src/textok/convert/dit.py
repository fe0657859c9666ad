"""facebookresearch DiT's releases (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``) -> textok's
:class:`~textok.models.dit.DiT` with ``patch_size`` 2 over a VAE's latent grid.

The release is a plain state dict of ``models.py``'s DiT over Stable Diffusion VAE latents (4 channels, 32 x 32
at 256 px, 64 x 64 at 512 px). textok's DiT reads those latents as (side^2, 4) tokens, the grid flattened
row-major, grouped in 2 x 2 patches. Most keys keep their names; the rest map as follows:

* ``x_embedder.proj`` (a conv with kernel = stride = 2) is a linear layer on each patch: its (out, channel, p, q)
  kernel becomes textok's (out, p, q, channel) rows, the order in which textok flattens a patch;
* ``final_layer.linear``'s rows are in (p, q, channel) order with the channels [eps | variance], which is the
  order textok's unpatchify reads: copied as they are;
* ``adaLN_modulation.1`` (after a SiLU in the official Sequential) is textok's ``adaLN_modulation``, whose
  SiLU is applied once per forward; the chunk order (shift, scale, gate for attention, then for the MLP; the
  final layer's shift, scale) is the same;
* ``y_embedder.embedding_table`` (1000 classes + the null class as the last row) is ``y_embedder``;
* ``pos_embed`` is the fixed 2D sin-cos table, which textok computes from the grid: the stored one is checked
  against it, not copied.

The timestep features ([cos | sin]), LayerNorm eps 1e-6, tanh GELU and the attention's qkv bias are textok's
DiT as it is. The release samples with 250 respaced DDPM steps of a linear schedule over 1000, learned sigma, at
guidance 4.0 for pictures (sample.py) and 1.5 for FID (sample_ddp.py): those are textok's DiT defaults, and the
diffusion is stored with the model. The official guidance is applied to the first 3 of the 4 latent channels
only (forward_with_cfg; the fourth channel's eps and the variance are the conditional ones); the converted model
keeps that (``guided_channels`` 3). DiT was trained on the VAE's posterior mean times 0.18215: the converted
model's ``latents_meta`` un-normalises with mean 0 and std 1 / 0.18215 before the tokenizer decodes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..diffusion import DiffusionConfig
from ..errors import ConfigError, TextokError
from ..hub import read_config_json
from ..models.dit import DiT, DiTConfig
from ..models.kinds import CODE_FORMS
from ..models.registry import TOKENIZERS
from ..models.vit import sincos_2d
from .manifest import Variant

# The stored pos_embed (numpy float64, rounded to float32) against textok's table: one float32 rounding apart.
POS_EMBED_ATOL = 1e-6
# DiT's latents are the VAE's posterior mean times this (train.py, sample.py), in every release.
LATENT_SCALE = 0.18215
SAME_NAMES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def dit_config(variant: Variant) -> DiTConfig:
    """The textok config of a released DiT, from its published settings."""
    s = variant.settings
    return DiTConfig(num_tokens=s["input_size"] ** 2, in_channels=s["in_channels"], width=s["hidden_size"],
                     depth=s["depth"], heads=s["num_heads"], mlp_ratio=s["mlp_ratio"], num_classes=s["num_classes"],
                     class_dropout=s["class_dropout_prob"], text_dim=0, learn_sigma=s["learn_sigma"],
                     patch_size=s["patch_size"], guided_channels=s["guided_channels"])


def dit_state(state: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Rename an official DiT state dict into textok's layout (``pos_embed`` is not a parameter there)."""
    conv = state["x_embedder.proj.weight"]  # (width, channel, p, q)
    out = {"x_embedder.weight": conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1),
           "x_embedder.bias": state["x_embedder.proj.bias"],
           "y_embedder.weight": state["y_embedder.embedding_table.weight"]}
    for part in ("weight", "bias"):
        for i in (0, 2):
            out[f"t_embedder.mlp.{i}.{part}"] = state[f"t_embedder.mlp.{i}.{part}"]
        out[f"final_layer.linear.{part}"] = state[f"final_layer.linear.{part}"]
        out[f"final_layer.adaLN_modulation.{part}"] = state[f"final_layer.adaLN_modulation.1.{part}"]
        for b in range(config.depth):
            block = f"blocks.{b}."
            for name in SAME_NAMES:
                out[f"{block}{name}.{part}"] = state[f"{block}{name}.{part}"]
            out[f"{block}adaLN_modulation.{part}"] = state[f"{block}adaLN_modulation.1.{part}"]
    return out


def check_pos_embed(stored: Tensor, config: DiTConfig) -> None:
    """The release's fixed ``pos_embed`` must be the 2D sin-cos table of its grid, which textok recomputes."""
    grid = math.isqrt(config.seq_len)
    mine = sincos_2d(grid, grid, config.width)
    err = (stored[0].double() - mine.double()).abs().max().item()
    if not err <= POS_EMBED_ATOL:
        raise TextokError(f"the checkpoint's pos_embed is not the fixed 2D sin-cos table of a {grid} x {grid} grid "
                          f"(max difference {err:.3g}); is it a DiT trained with other positions?")


def build_dit(state: dict[str, Tensor], variant: Variant) -> DiT:
    """A textok DiT holding the official weights of ``variant``'s layout."""
    if variant.settings["latent_scale"] != LATENT_SCALE:
        raise ConfigError(f"{variant.name}: latents scaled by {variant.settings['latent_scale']}, not DiT's "
                          f"{LATENT_SCALE}; the latents record assumes DiT's")
    config = dit_config(variant)
    model = DiT(config)
    check_pos_embed(state["pos_embed"], config)
    model.load_state_dict(dit_state(state, config), strict=True)
    return model.eval()


def dit_diffusion(variant: Variant) -> dict[str, Any]:
    """The release's diffusion (create_diffusion's defaults, sample.py's 250 steps) in textok's terms."""
    s = variant.settings
    return DiffusionConfig(objective="ddpm", num_timesteps=s["diffusion_steps"], beta_schedule=s["noise_schedule"],
                           learn_sigma=s["learn_sigma"], sampler="ddpm",
                           sampling_steps=s["num_sampling_steps"]).to_dict()


def dit_sampler(variant: Variant) -> dict[str, Any]:
    """The release's sampler as `textok sample` runs a DiT by default: DDPM steps, guidance for pictures (--cfg)
    and for FID (--npz), and the channels it guides."""
    s = variant.settings
    return {"sampler": "ddpm", "steps": s["num_sampling_steps"], "cfg": s["cfg_scale"], "fid_cfg": s["fid_cfg_scale"],
            "guided_channels": s["guided_channels"]}


def dit_record(model: DiT, tokenizer: Path) -> dict[str, Any]:
    """The ``latents_meta`` of a converted DiT: the tokenizer whose (side^2, 4) tokens it models (checked on the
    meta device, without reading its weights), and DiT's latent scale as the normalisation `textok sample` undoes."""
    data = read_config_json(tokenizer)
    kind, c = data.get("model_type"), model.config
    side = math.isqrt(c.num_tokens)
    variant = " --variant sd-vae-ft-512" if side == 64 else ""
    fix = (f"give the Stable Diffusion VAE converted for {side * 8} px (textok convert --from sd-vae ...{variant}), "
           f"or another tokenizer of {c.num_tokens} continuous tokens x {c.in_channels} channels")
    if kind not in TOKENIZERS:
        raise TextokError(f"--tokenizer {tokenizer} holds a {kind!r} model, not a tokenizer; {fix}")
    config = TOKENIZERS[kind].config_class.from_dict(data.get("config", {}))
    form = TOKENIZERS[kind].code_form
    if not isinstance(form, str):  # a property of the config (TiTok's VQ or VAE): ask a weightless instance
        with torch.device("meta"):
            form = TOKENIZERS[kind](config).code_form
    shape = (getattr(config, "num_tokens", None), getattr(config, "token_channels", None))
    if form != "tokens" or shape != (c.num_tokens, c.in_channels):
        raise TextokError(f"--tokenizer {tokenizer} is a {kind} of {CODE_FORMS[form]} {shape} (tokens, channels), "
                          f"but this DiT models {c.num_tokens} x {c.in_channels} continuous tokens; {fix}")
    scaling = data.get("converted_from", {}).get("published_settings", {}).get("scaling_factor")
    if scaling is not None and scaling != LATENT_SCALE:  # a converted VAE records its release's scaling factor
        raise TextokError(f"--tokenizer {tokenizer} is a VAE released with latents scaled by {scaling}, but DiT was "
                          f"trained on sd-vae-ft latents x {LATENT_SCALE}; {fix}")
    return {"tokenizer_dir": str(tokenizer.resolve()), "tokenizer_type": kind, "discrete": False,
            "num_tokens": c.num_tokens, "channels": c.in_channels, "num_classes": c.num_classes,
            "latent_scale": LATENT_SCALE, "mean": [0.0] * c.in_channels, "std": [1.0 / LATENT_SCALE] * c.in_channels}


__all__ = ["LATENT_SCALE", "build_dit", "check_pos_embed", "dit_config", "dit_diffusion", "dit_record", "dit_sampler",
           "dit_state"]
