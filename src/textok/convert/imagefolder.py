"""adobe-research/ImageFolder's released tokenizers (``imagenet-{4096,8192,16384}.pt``) -> textok's
:class:`~textok.models.imagefolder.ImageFolder`.

The release's encoder and decoder are timm DINOv2 ViT-Bs (a class token, LayerScale, LayerNorm eps 1e-6, the
exact GELU) run at 256 px with patch 16. Everything the official model adds at a sequence position is a constant,
and attention does not depend on where a token sits in the sequence, so the conversion folds:

* **LayerScale** gammas into the attention output projection and the MLP's second linear layer (rows scaled).
* **Encoder inputs.** The class token plus its position plus level embedding 0 is textok's ``class_token``; the
  patch positions plus level 0 are ``patch_pos``. Each branch's 121 latent tokens are ``latent_tokens`` plus the
  16 x 16 position table resampled to 11 x 11 (timm's ``resample_abs_pos_embed``: bicubic with antialiasing,
  what the official ``_pos_embed`` does to a 4-D input; the class token it prepends is dropped) plus the branch's
  level embedding: textok's ``grid_pos`` (shared by the branches) and ``branch_embed``, the same structure.
* **Decoder inputs.** The mask tokens with positions and level 0, then the latent map with the resampled
  positions and level 1 (``latent_pos``); the official decoder also prepends a class token to each of the two
  (level 0 and level 1): textok's ``class_token`` and one ``decoder_prefix_tokens``, whose outputs are dropped.
* The 1x1 convolutions ``quant_conv`` (768 -> 32) and ``post_quant_conv`` (64 -> 768) are linear maps; the pixel
  head writes patches in textok's order. The two quantizers are textok's branches: the codebook and the shared
  phi convolutions (``quant_resi.qresi_ls.k``), cosine matching.

Dropped from the model: ``semantic_model.*`` (the frozen DINOv2 teacher of the training loss; the converted model
has ``semantic_teacher=none``; :func:`teacher_state` gives it in the layout of textok's ``dinov2:FILE`` teacher),
``ema_vocab_hit_SV`` (a codebook-usage statistic) and the ``lvl1LC`` level buffers, which are checked against the
layout rather than copied. Training checkpoints hold both ``model`` and ``ema`` weights; the EMA ones (what the
official evaluation loads) are converted. The VAR release's file also holds its tokenizer, which converts the same
way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, TextokError
from ..models.imagefolder import ImageFolder, ImageFolderConfig
from ..models.multiscale import MultiScaleQuantizerConfig, phi_index
from ..models.vit import ViTConfig
from .manifest import Variant

# Where the weights are: in a tokenizer training checkpoint the official evaluation reads "ema", then "model", then
# "state_dict"; the VAR trainer's checkpoint holds the tokenizer it was trained with at ["trainer"]["vae_local"]
# (loaded strictly from the tokenizer's file, so in its layout); () is a file that is the state dict itself.
EMA_FIRST = (("ema",), ("model",), ("state_dict",), ("trainer", "vae_local"), ())
_BLOCK_COPIED = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "norm2.weight", "norm2.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias")


def imagefolder_config(variant: Variant) -> ImageFolderConfig:
    """The textok config of a released ImageFolder tokenizer, from its published settings."""
    s = variant.settings
    if not (s["abs_pos_embed"] and s["using_znorm"] and s["layer_scale"] and s["to_pixel"] == "linear"
            and s["share_quant_resi"] >= 2):
        raise ConfigError(f"{variant.name}: only the released layout (absolute positions with level embeddings, "
                          "LayerScale, cosine matching, shared phi convs, a linear pixel head) is mapped")
    K = math.isqrt(s["num_latent_tokens"])
    if K * K != s["num_latent_tokens"] or s["v_patch_nums"][-1] != K:
        raise ConfigError(f"{variant.name}: {s['num_latent_tokens']} latent tokens per branch are not the K x K grid "
                          f"of the last scale {s['v_patch_nums'][-1]}")
    vit = ViTConfig(width=s["width"], depth=s["depth"], heads=s["heads"], mlp_ratio=s["mlp_ratio"])
    quantizer = MultiScaleQuantizerConfig(
        scales=tuple(s["v_patch_nums"]), branches=s["product_quant"], num_codes=s["codebook_size"],
        code_dim=s["codebook_embed_dim"], beta=s["beta"], phi_convs=s["share_quant_resi"], phi_ratio=s["quant_resi"],
        dropout=s["codebook_drop"], dropout_start=s["start_drop"])
    return ImageFolderConfig(image_size=s["image_size"], patch_size=s["patch_size"], encoder=vit,
                             decoder=ViTConfig(**vit.to_dict()), latent_grid=K, quantizer=quantizer,
                             text_in_encoder=False, text_in_decoder=False, semantic_teacher="none",
                             class_token=True, norm_eps=s["norm_eps"], gelu="none", decoder_prefix_tokens=1)


def resample_positions(pos: Tensor, grid: int) -> Tensor:
    """(n^2, D) positions of an n x n grid -> (grid^2, D): bicubic with antialiasing, as timm resamples a position
    table (in float32, or float64 for a float64 table; the same table is returned when the sizes agree)."""
    side = math.isqrt(pos.shape[0])
    if side == grid:
        return pos
    work = pos.to(torch.float64 if pos.dtype == torch.float64 else torch.float32)
    table = work.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True)
    return table.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)


def _fold_blocks(state: dict[str, Tensor], src: str, dst: str, depth: int, out: dict[str, Tensor]) -> None:
    """timm blocks ``src.blocks.i`` -> textok blocks ``dst.blocks.i`` with the LayerScale gammas folded in."""
    for i in range(depth):
        a, b = f"{src}.blocks.{i}", f"{dst}.blocks.{i}"
        for name in _BLOCK_COPIED:
            out[f"{b}.{name}"] = state[f"{a}.{name}"]
        for layer, gamma in (("attn.proj", "ls1.gamma"), ("mlp.fc2", "ls2.gamma")):
            g = state[f"{a}.{gamma}"]
            out[f"{b}.{layer}.weight"] = g[:, None] * state[f"{a}.{layer}.weight"]
            out[f"{b}.{layer}.bias"] = g * state[f"{a}.{layer}.bias"]
    for part in ("weight", "bias"):
        out[f"{dst}.norm.{part}"] = state[f"{src}.norm.{part}"]


def _check_levels(state: dict[str, Tensor], config: ImageFolderConfig) -> None:
    """The ``lvl1LC`` buffers say which level embedding each position gets; they must be the layout folded here."""
    P, K2, N = config.branches, config.latent_grid**2, config.num_patches
    expected = {"encoder.lvl1LC": [0] * (1 + N) + [p + 1 for p in range(P) for _ in range(K2)],
                "decoder.lvl1LC": [0] * (1 + N) + [1] * (1 + K2)}
    for key, levels in expected.items():
        if state[key].flatten().tolist() != levels:
            raise TextokError(f"{key} does not give the released level layout (class token and patches at level 0, "
                              "then each branch's latent tokens at its own level); this file is not the released "
                              "ImageFolder tokenizer")


def imagefolder_state(state: dict[str, Tensor], config: ImageFolderConfig) -> dict[str, Tensor]:
    """Map an official ImageFolder tokenizer state dict onto textok's ImageFolder (folding as the module says)."""
    K, P = config.latent_grid, config.branches
    out: dict[str, Tensor] = {}
    # encoder
    pos, lvl = state["encoder.model.pos_embed"][0], state["encoder.lvl_embed.weight"]
    cls = state["encoder.model.cls_token"][0, 0]
    for part in ("weight", "bias"):
        out[f"encoder.patch_embed.proj.{part}"] = state[f"encoder.model.patch_embed.proj.{part}"]
    out["encoder.class_token"] = (cls + pos[0] + lvl[0])[None, None]
    out["encoder.patch_pos"] = (pos[1:] + lvl[0])[None]
    out["encoder.latent_tokens"] = state["encoder.latent_tokens"]
    out["encoder.grid_pos"] = resample_positions(pos[1:], K)[None]
    out["encoder.branch_embed"] = lvl[1:1 + P][None]
    _fold_blocks(state, "encoder.model", "encoder.transformer", config.encoder.depth, out)
    out["encoder.to_tokens.weight"] = state["quant_conv.weight"][:, :, 0, 0]
    out["encoder.to_tokens.bias"] = state["quant_conv.bias"]
    # decoder
    pos, lvl = state["decoder.model.pos_embed"][0], state["decoder.lvl_embed.weight"]
    cls = state["decoder.model.cls_token"][0, 0]
    out["decoder.mask_token"] = state["decoder.mask_token"]
    out["decoder.patch_pos"] = (pos[1:] + lvl[0])[None]
    out["decoder.class_token"] = (cls + pos[0] + lvl[0])[None, None]
    out["decoder.prefix_tokens"] = (cls + pos[0] + lvl[1])[None, None]
    out["decoder.latent_pos"] = (resample_positions(pos[1:], K) + lvl[1])[None]
    out["decoder.token_proj.weight"] = state["post_quant_conv.weight"][:, :, 0, 0]
    out["decoder.token_proj.bias"] = state["post_quant_conv.bias"]
    _fold_blocks(state, "decoder.model", "decoder.transformer", config.decoder.depth, out)
    out["decoder.to_pixels.weight"] = state["decoder.to_pixel.model.weight"]
    out["decoder.to_pixels.bias"] = state["decoder.to_pixel.model.bias"]
    # quantizers: the codebook and the phi convs some scale uses
    q = config.quantizer
    used = sorted({phi_index(i, q.num_scales, q.phi_convs) for i in range(q.num_scales)})
    for p in range(P):
        out[f"quantizer.branches.{p}.embedding.weight"] = state[f"quantizes.{p}.embedding.weight"]
        for mine, theirs in enumerate(used):
            for part in ("weight", "bias"):
                phi = state[f"quantizes.{p}.quant_resi.qresi_ls.{theirs}.{part}"]
                out[f"quantizer.branches.{p}.phis.{mine}.conv.{part}"] = phi
    return out


def teacher_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The frozen DINOv2 teacher stored beside the tokenizer (``semantic_model.*``: timm's DINOv2 ViT-B loaded with
    its pretrained weights, patch embedding and positions resampled to 256 px patch 16), in the timm key layout
    textok's ``dinov2:FILE`` teacher reads."""
    teacher = {k.removeprefix("semantic_model."): v for k, v in state.items() if k.startswith("semantic_model.")}
    if not teacher:
        raise TextokError("this checkpoint stores no semantic teacher (semantic_model.*): drop --teacher-out")
    return teacher


def build_imagefolder(state: dict[str, Tensor], variant: Variant) -> ImageFolder:
    """A textok ImageFolder computing what the released tokenizer of ``variant``'s layout computes."""
    config = imagefolder_config(variant)
    _check_levels(state, config)
    model = ImageFolder(config)
    model.load_state_dict(imagefolder_state(state, config), strict=True)
    return model.eval()


__all__ = ["EMA_FIRST", "build_imagefolder", "imagefolder_config", "imagefolder_state", "resample_positions",
           "teacher_state"]
