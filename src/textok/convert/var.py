"""FoundationVision VAR's releases -> textok's :class:`~textok.models.vqvae.VQVAE` and
:class:`~textok.models.var.VAR`.

The VQVAE (``vae_ch160v4096z32.pth``) keeps its encoder, decoder and quant convs under the same names in textok;
its quantizer (``quantize.*``) becomes textok's one-branch multi-scale quantizer with Euclidean matching: the
codebook, and the shared phi convs ``quant_resi.qresi_ls.k`` as ``phis.k`` (a conv no scale uses, which only a
short schedule has, is left out). The codebook-usage statistic ``ema_vocab_hit_SV`` is a training record, not
used to encode or decode, and is dropped.

The transformers (``var_d{16,20,24,30}.pth``) are textok's VAR with one branch (``branches=1``, the folded
layout over one branch is VAR's) and attn_l2_norm: the query/value biases and the zero key bias become one qkv
bias, the per-head ``scale_mul_1H11`` the per-head log-scale, and the adaLN rows are reordered (VAR's
gamma1, gamma2, scale1, scale2, shift1, shift2 is textok's shift1, scale1, gate1, shift2, scale2, gate2; its head's
scale, shift is textok's shift, scale). The buffers ``lvl_1L`` and ``attn_bias_for_masking`` are the level of
every position and the block-causal mask, which textok builds from the scales: they are checked, not copied.
VAR-d36-s (512 px) shares one adaLN projection among its blocks (``shared_aln``): textok's ``shared_adaln``,
with each block's ``ada_gss`` as its offset (rows reordered the same way).

ImageFolder's generator (``imagenet-var-4096.pt``, adobe-research/ImageFolder) is the same VAR code over its
product-quantized tokenizer: V = 2 x 4096 logits (branch p's codes are rows p 4096 ..) and Cvae = 2 x 32 input
channels (branch 0's f_hat, then branch 1's): textok's VAR with two folded branches, mapped as above. Its training
checkpoint keeps the weights at ``["trainer"]["var_wo_ddp"]`` (the tokenizer beside them at ``["vae_local"]``).
Two entries differ between builds of that code and are settled before the layout check: ``empty_emb`` (the token
that replaces masked inputs in training when ``--p_drop`` > 0; sampling never reads it) is dropped, and an
``attn_bias_for_masking`` padded to a multiple of 8 (built where xformers was installed) is cut to the sequence
once its padding is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TextokError
from ..hub import read_config_json
from ..models.multiscale import VAR_SCALES_512, MultiScaleQuantizerConfig, phi_index
from ..models.var import VAR, VARConfig, VARSamplerConfig
from ..models.vqvae import VQVAE, VQVAEConfig
from .manifest import Variant

# VAR's adaLN chunks (gamma1, gamma2, scale1, scale2, shift1, shift2) in textok's order (shift1, scale1, gate1,
# shift2, scale2, gate2); the head's (scale, shift) in textok's (shift, scale).
BLOCK_ADA_ORDER = (4, 2, 0, 5, 3, 1)
HEAD_ADA_ORDER = (1, 0)


def vqvae_config(variant: Variant) -> VQVAEConfig:
    """The textok config of a released VQVAE, from its published settings."""
    s = variant.settings
    if s["share_quant_resi"] < 2 or s["using_znorm"]:
        raise ConfigError(f"{variant.name}: only partially shared phi convs (share_quant_resi >= 2) and Euclidean "
                          "matching (using_znorm false), the released VQVAE's, are mapped")
    q = MultiScaleQuantizerConfig(scales=tuple(s["v_patch_nums"]), branches=1, num_codes=s["vocab_size"],
                                  code_dim=s["z_channels"], beta=s["beta"], phi_convs=s["share_quant_resi"],
                                  phi_ratio=s["quant_resi"], dropout=0.0, match="euclidean")
    return VQVAEConfig(image_size=s["image_size"], ch=s["ch"], ch_mult=tuple(s["ch_mult"]),
                       num_res_blocks=s["num_res_blocks"], level_attention=s["using_sa"],
                       mid_attention=s["using_mid_sa"], quant_conv_kernel=s["quant_conv_ks"], quantizer=q)


def vqvae_state(state: dict[str, Tensor], config: VQVAEConfig) -> dict[str, Tensor]:
    """Rename an official VQVAE state dict into textok's layout."""
    q = config.quantizer
    out = {k: v for k, v in state.items() if not k.startswith("quantize.")}
    out["quantizer.branches.0.embedding.weight"] = state["quantize.embedding.weight"]
    used = sorted({phi_index(i, q.num_scales, q.phi_convs) for i in range(q.num_scales)})
    for mine, theirs in enumerate(used):
        for part in ("weight", "bias"):
            phi = state[f"quantize.quant_resi.qresi_ls.{theirs}.{part}"]
            out[f"quantizer.branches.0.phis.{mine}.conv.{part}"] = phi
    return out


def build_vqvae(state: dict[str, Tensor], variant: Variant) -> VQVAE:
    """A textok VQVAE holding the official weights of ``variant``'s layout."""
    config = vqvae_config(variant)
    model = VQVAE(config)
    model.load_state_dict(vqvae_state(state, config), strict=True)
    return model.eval()


def var_config(variant: Variant) -> VARConfig:
    """The textok config of a released VAR transformer, from its published settings (ImageFolder's: V and Cvae
    over ``product_quant`` folded branches)."""
    g = variant.settings
    P = g.get("product_quant", 1)
    return VARConfig(scales=tuple(g["patch_nums"]), branches=P, codebook_size=g["vocab_size"] // P,
                     code_dim=g["Cvae"] // P,
                     num_classes=g["num_classes"], width=g["embed_dim"], depth=g["depth"], heads=g["num_heads"],
                     mlp_ratio=g["mlp_ratio"], fold=True, class_dropout=g["cond_drop_rate"],
                     attn_l2_norm=g["attn_l2_norm"], drop_path=g["drop_path_rate"], shared_adaln=g["shared_aln"],
                     sampler=VARSamplerConfig(**var_sampler(variant)))


def _reorder(weight: Tensor, order: tuple[int, ...]) -> Tensor:
    chunks = weight.chunk(len(order), dim=0)
    return torch.cat([chunks[i] for i in order])


def _check_buffers(state: dict[str, Tensor], model: VAR) -> None:
    """The official level and mask buffers must say what textok derives from the scales."""
    level = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(model.config.scales)])
    mask = state["attn_bias_for_masking"][0, 0] == 0  # 0 = may attend, -inf = masked
    if not torch.equal(state["lvl_1L"][0].long(), level) or not torch.equal(mask, model.mask):
        raise TextokError("the checkpoint's lvl_1L / attn_bias_for_masking buffers do not describe the scales "
                          f"{list(model.config.scales)}; is it a VAR of another schedule?")


def var_state(state: dict[str, Tensor], config: VARConfig) -> dict[str, Tensor]:
    """Rename, merge and reorder an official VAR state dict into textok's layout."""
    out = {"word_embed.weight": state["word_embed.weight"], "word_embed.bias": state["word_embed.bias"],
           "class_embed.weight": state["class_emb.weight"], "pos_start": state["pos_start"],
           "pos_embed": state["pos_1LC"], "level_embed.weight": state["lvl_embed.weight"],
           "head.weight": state["head.weight"], "head.bias": state["head.bias"]}
    for part in ("weight", "bias"):
        out[f"head_ada.{part}"] = _reorder(state[f"head_nm.ada_lin.1.{part}"], HEAD_ADA_ORDER)
    if config.shared_adaln:
        for part in ("weight", "bias"):
            out[f"shared_ada.{part}"] = _reorder(state[f"shared_ada_lin.1.{part}"], BLOCK_ADA_ORDER)
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        out[dst + "attn.qkv.weight"] = state[src + "attn.mat_qkv.weight"]
        out[dst + "attn.qkv.bias"] = torch.cat([state[src + "attn.q_bias"], state[src + "attn.zero_k_bias"],
                                                state[src + "attn.v_bias"]])
        out[dst + "attn.log_scale"] = state[src + "attn.scale_mul_1H11"].flatten()
        for part in ("weight", "bias"):
            out[f"{dst}attn.proj.{part}"] = state[f"{src}attn.proj.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}ffn.fc1.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}ffn.fc2.{part}"]
            if not config.shared_adaln:
                out[f"{dst}ada.{part}"] = _reorder(state[f"{src}ada_lin.1.{part}"], BLOCK_ADA_ORDER)
        if config.shared_adaln:  # (1, 1, 6, C): the block's offset to the six shared vectors
            out[dst + "ada_offset"] = state[src + "ada_gss"][0, 0][list(BLOCK_ADA_ORDER)].flatten()
    return out


def build_var(state: dict[str, Tensor], variant: Variant) -> VAR:
    """A textok VAR (one branch; ImageFolder's: two folded) holding the official weights of ``variant``'s layout."""
    config = var_config(variant)
    model = VAR(config)
    _check_buffers(state, model)
    model.load_state_dict(var_state(state, config), strict=True)
    return model.eval()


def var_sampler(variant: Variant) -> dict[str, Any]:
    """The README's FID sampler in `textok sample` terms, stored as the converted VAR's default sampler: VAR's cfg
    c ramps as (1 + t) cond - t uncond with t = c s / (S - 1), which textok's --cfg w gives for w = c + 1; top-k
    and top-p as they are."""
    g = variant.settings
    return {"cfg": g["cfg"] + 1.0, "top_k": g["top_k"], "top_p": g["top_p"]}


def prepare_imagefolder_var(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the training-only ``empty_emb`` and cut an xformers-padded mask to the sequence (see the module)."""
    state = dict(state)
    empty = state.pop("empty_emb.weight", None)
    if empty is not None and (empty.dim() != 2 or empty.shape[0] != 1):
        raise TextokError(f"key 'empty_emb.weight' has shape {list(empty.shape)}, the layout has [1, width]")
    level, mask = state.get("lvl_1L"), state.get("attn_bias_for_masking")
    if level is None or mask is None or mask.dim() != 4 or level.dim() != 2:
        return state  # the layout check names what is missing
    L, padded = level.shape[1], mask.shape[-1]
    if padded != L and padded == (L + 7) // 8 * 8 and mask.shape[-2] == padded:
        inf = torch.tensor(float("-inf"))
        pad_ok = bool((mask[..., :L, L:] == inf).all() and (mask[..., L:, :L] == inf).all()
                      and (mask[..., L:, L:] == 0).all())
        if not pad_ok:
            raise TextokError(f"attn_bias_for_masking is padded from {L} to {padded} positions but the padding is "
                              "not xformers' (-inf outside, 0 among the padded positions); is it the released file?")
        state["attn_bias_for_masking"] = mask[..., :L, :L].contiguous()
    return state


def var_record(model: VAR, tokenizer: Path) -> dict[str, Any]:
    """The ``latents_meta`` of a converted VAR: the tokenizer whose codes it models (checked to match)."""
    fix = ("give the converted VQVAE it was released with (textok convert --from var-vqvae ..."
           f"{' --variant vae-ch160-v4096-z32-512' if model.config.scales == VAR_SCALES_512 else ''})")
    return _latents_meta(model, tokenizer, ("vqvae", "imagefolder"), fix)


def imagefolder_var_record(model: VAR, tokenizer: Path) -> dict[str, Any]:
    """The ``latents_meta`` of a converted ImageFolder VAR: an ImageFolder tokenizer with its code layout."""
    fix = "give the converted ImageFolder tokenizer it was released with (textok convert --from imagefolder ...)"
    return _latents_meta(model, tokenizer, ("imagefolder",), fix)


def _latents_meta(model: VAR, tokenizer: Path, kinds: tuple[str, ...], fix: str) -> dict[str, Any]:
    data = read_config_json(tokenizer)
    kind, tok = data.get("model_type"), data.get("config", {})
    q = tok.get("quantizer", {}) if isinstance(tok, dict) else {}
    c = model.config
    theirs = (list(q.get("scales", [])), q.get("branches"), q.get("num_codes"), q.get("code_dim"))
    mine = (list(c.scales), c.branches, c.codebook_size, c.code_dim)
    if kind not in kinds or theirs != mine:
        raise TextokError(f"--tokenizer {tokenizer} is a {kind} with codes {theirs} (scales, branches, codes, "
                          f"channels), but this VAR models {mine}; {fix}")
    return {"tokenizer_dir": str(tokenizer.resolve()), "tokenizer_type": kind, "discrete": True,
            "codebook_size": c.codebook_size, "num_classes": c.num_classes,
            "code_shape": [c.branches, c.codes_per_branch],
            "code_layout": {"scales": list(c.scales), "branches": c.branches, "codebook_size": c.codebook_size,
                            "code_dim": c.code_dim}}


__all__ = ["build_var", "build_vqvae", "imagefolder_var_record", "prepare_imagefolder_var", "var_config",
           "var_record", "var_sampler", "var_state", "vqvae_config", "vqvae_state"]
