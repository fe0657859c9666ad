"""Stable Diffusion's VAE as diffusers saves it (``AutoencoderKL``: stabilityai/sd-vae-ft-ema, sd-vae-ft-mse) ->
textok's :class:`~textok.models.sdvae.SDVAE`.

diffusers' blocks are the latent-diffusion CNN under other names: ``down_blocks.i.resnets.j`` is ``down.i.block.j``
(``conv_shortcut`` is ``nin_shortcut``), ``downsamplers.0`` is ``downsample``, ``mid_block.resnets.0/1`` are
``mid.block_1/2``, ``conv_norm_out`` is ``norm_out``; the decoder's ``up_blocks`` count from the lowest
resolution, so ``up_blocks.j`` is ``up.(levels - 1 - j)``. The middle attention's three linear projections
(``to_q``/``to_k``/``to_v``, or ``query``/``key``/``value`` in files saved by older diffusers, which renames them on
load) become one 1x1 conv ``qkv`` (rows q, k, v), and ``to_out.0`` (``proj_attn``) the 1x1 conv ``proj_out``;
``group_norm`` is ``norm``.

The same autoencoder is also released in the CompVis latent-diffusion layout (stabilityai/sd-vae-ft-*-original,
``vae-ft-*-ema-pruned.ckpt``): textok's names already, with the middle attention as three 1x1 convolutions
``q``/``k``/``v`` (fused into ``qkv`` the same way). Such training checkpoints may carry the loss module (``loss.*``:
LPIPS and the discriminator) and the EMA counters ``model_ema.decay`` / ``model_ema.num_updates``: training records
the autoencoder does not use, dropped before the layout check. Nothing else is dropped.

A Hub snapshot keeps the release's ``config.json`` beside the weights: when it is there, its settings are read,
an architecture setting that differs from the manifest's is refused, and its ``scaling_factor`` and
``sample_size`` are recorded (the tokens themselves are unscaled).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, TextokError
from ..models.sdvae import SDVAE, SDVAEConfig
from .manifest import Variant

CONFIG_FILE = "config.json"  # diffusers' config beside the weights in a snapshot folder
# Settings the model's layout or computation depends on (a config.json that differs is another model).
ARCHITECTURE = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "mid_block_add_attention",
                "use_quant_conv", "use_post_quant_conv")
RECORDED = ("scaling_factor", "sample_size")  # recorded from config.json, not used by the tokenizer
# The middle attention's projections: diffusers' current names, the older ones, textok's part of qkv / proj_out.
ATTENTION = (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn"))
TRAINING_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


def sdvae_config(variant: Variant) -> SDVAEConfig:
    """The textok config of a released SD VAE, from its published settings."""
    s = variant.settings
    n = len(s["block_out_channels"])
    expected = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, "use_quant_conv": True, "use_post_quant_conv": True}
    for key, value in expected.items():
        if s[key] != value:
            raise ConfigError(f"{variant.name}: {key}={s[key]!r}; only {key}={value!r} (the SD VAE's) is mapped")
    return SDVAEConfig(image_size=s["image_size"], block_out_channels=tuple(s["block_out_channels"]),
                       layers_per_block=s["layers_per_block"], latent_channels=s["latent_channels"],
                       norm_num_groups=s["norm_num_groups"], mid_attention=s["mid_block_add_attention"])


def _attention(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """One middle attention block (diffusers' names, current or older) -> textok's norm / qkv / proj_out."""

    def part(i: int, kind: str) -> Tensor:
        new, old = ATTENTION[i]
        key = f"{prefix}.{new}.{kind}"
        return state[key] if key in state else state[f"{prefix}.{old}.{kind}"]

    conv = lambda w: w[..., None, None]  # noqa: E731  (linear (C, C) -> 1x1 conv (C, C, 1, 1))
    return {"norm.weight": state[f"{prefix}.group_norm.weight"], "norm.bias": state[f"{prefix}.group_norm.bias"],
            "qkv.weight": conv(torch.cat([part(i, "weight") for i in range(3)])),
            "qkv.bias": torch.cat([part(i, "bias") for i in range(3)]),
            "proj_out.weight": conv(part(3, "weight")), "proj_out.bias": part(3, "bias")}


def drop_training_entries(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A latent-diffusion training checkpoint without its loss module and EMA counters (not part of the model)."""
    return {k: v for k, v in state.items() if not k.startswith("loss.") and k not in TRAINING_COUNTERS}


def _rename(key: str, levels: int) -> str | None:
    """A diffusers key outside the attention blocks -> textok's name (None for an attention key)."""
    if ".attentions." in key:
        return None
    key = key.replace("conv_norm_out", "norm_out").replace("mid_block.resnets.0", "mid.block_1")
    key = key.replace("mid_block.resnets.1", "mid.block_2")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def sdvae_state(state: dict[str, Tensor], config: SDVAEConfig) -> dict[str, Tensor]:
    """Rename an official AutoencoderKL state dict into textok's layout (the attention projections fused)."""
    if "encoder.norm_out.weight" in state:  # the latent-diffusion names
        return _latent_diffusion_state(state, config)
    levels = len(config.block_out_channels)
    out = {new: v for k, v in state.items() if (new := _rename(k, levels)) is not None}
    for side in ("encoder", "decoder"):
        if config.mid_attention:
            for k, v in _attention(state, f"{side}.mid_block.attentions.0").items():
                out[f"{side}.mid.attn_1.{k}"] = v
    return out


def _latent_diffusion_state(state: dict[str, Tensor], config: SDVAEConfig) -> dict[str, Tensor]:
    """The CompVis layout: textok's names, the attention's q, k and v convolutions fused into qkv."""
    out = {k: v for k, v in state.items() if not re.search(r"\.attn_1\.[qkv]\.", k)}
    for side in ("encoder", "decoder"):
        if config.mid_attention:
            prefix = f"{side}.mid.attn_1"
            for part in ("weight", "bias"):
                out[f"{prefix}.qkv.{part}"] = torch.cat([state[f"{prefix}.{p}.{part}"] for p in "qkv"])
    return out


def build_sdvae(state: dict[str, Tensor], variant: Variant) -> SDVAE:
    """A textok SDVAE holding the official weights of ``variant``'s layout."""
    config = sdvae_config(variant)
    model = SDVAE(config)
    model.load_state_dict(sdvae_state(state, config), strict=True)
    return model.eval()


def release_settings(file: Path, variant: Variant) -> Variant:
    """``variant`` with the settings of the ``config.json`` beside ``file`` (a Hub snapshot's), when there is one:
    an architecture setting that differs from the manifest's is refused; scaling_factor and sample_size are taken."""
    path = file.parent / CONFIG_FILE
    if not path.is_file():
        return dataclasses.replace(variant, settings={**variant.settings, "settings_from": "manifest"})
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise TextokError(f"{path} (beside the weights) is not readable JSON ({err}); fix or remove it") from None
    if not isinstance(found, dict) or found.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise TextokError(f"{path} (beside the weights) is not an AutoencoderKL config "
                          f"(_class_name {found.get('_class_name') if isinstance(found, dict) else None!r}); "
                          "give the SD VAE's snapshot folder or its weights file on its own")
    settings = dict(variant.settings)
    for key in ARCHITECTURE:
        if key in found and found[key] != settings[key]:
            raise TextokError(f"{path} says {key}={found[key]!r} but the sd-vae layout {variant.name} has "
                              f"{settings[key]!r}: this is another autoencoder than Stable Diffusion's VAE")
    for key in RECORDED:
        if key in found:
            settings[key] = found[key]
    settings["settings_from"] = CONFIG_FILE
    return dataclasses.replace(variant, settings=settings)


__all__ = ["build_sdvae", "drop_training_entries", "release_settings", "sdvae_config", "sdvae_state"]
