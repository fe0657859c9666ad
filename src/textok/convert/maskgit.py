"""1d-tokenizer's MaskGIT generators -> textok's :class:`~textok.models.maskgit.MaskGIT`.

Two networks were released: ``ImageBert`` (L-32, B-64), a Hugging Face ``BertModel`` (post-norm blocks,
embedding LayerNorm, eps 1e-12, exact GELU) with a separate ``lm_head``, and ``UViTBert`` (S-128), a U-ViT
(pre-norm blocks without query/key/value biases, long skips from the first half of the blocks to the second,
eps 1e-5). textok's MaskGIT expresses both with its layout options (``norm_pre``, ``post_norm``,
``long_skips``, ``norm_eps``, ``gelu``).

Both embed one vocabulary: codes ``[0, K)``, the mask ``K``, the classes ``K+1 ... K+C`` and the dropped class
``K+C+1``; textok keeps the same rows as two tables (codes + mask, classes + null class), so the ids mean the
same. BERT's position and token-type-0 embeddings are one sum here (every token has type 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TextokError
from ..hub import read_config_json
from ..models.maskgit import MaskGIT, MaskGITConfig, MaskGITSamplerConfig
from ..models.vit import ViTConfig
from .manifest import Variant

BERT_NAMES = {  # inside model.encoder.layer.{i}.
    "attention.output.dense": "attn.proj", "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "output.LayerNorm": "norm2",
}
UVIT_NAMES = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def maskgit_config(variant: Variant) -> MaskGITConfig:
    """The textok config of a released generator, from its published settings."""
    g = variant.settings
    width, heads, hidden = g["hidden_size"], g["num_attention_heads"], g["intermediate_size"]
    common = dict(num_tokens=g["image_seq_len"], codebook_size=g["codebook_size"], num_classes=g["condition_num_classes"],
                  class_dropout=g["class_label_dropout"], mask_schedule="arccos", gelu="none",
                  sampler=MaskGITSamplerConfig(**textok_sampler(variant)))
    if g["model_type"] == "ViT":
        vit = ViTConfig(width=width, depth=g["num_hidden_layers"], heads=heads, mlp_ratio=hidden / width)
        return MaskGITConfig(transformer=vit, norm_pre=True, post_norm=True, norm_eps=1e-12, **common)
    if g["model_type"] == "UViT":  # in-blocks, a middle block, out-blocks
        vit = ViTConfig(width=width, depth=2 * (g["num_hidden_layers"] // 2) + 1, heads=heads, mlp_ratio=hidden / width)
        return MaskGITConfig(transformer=vit, long_skips=True, norm_eps=1e-5, **common)
    raise ConfigError(f"{variant.name}: generator model_type {g['model_type']!r} is neither ViT nor UViT")


def _split_vocabulary(table: Tensor, config: MaskGITConfig, out: dict[str, Tensor]) -> None:
    K = config.codebook_size
    out["tok_embed.weight"] = table[: K + 1]
    out["class_embed.weight"] = table[K + 1:]


def bert_state(state: dict[str, Tensor], config: MaskGITConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    e = "model.embeddings."
    _split_vocabulary(state[e + "word_embeddings.weight"], config, out)
    out["pos_embed.weight"] = (state[e + "position_embeddings.weight"] + state[e + "token_type_embeddings.weight"][0])[None]
    for part in ("weight", "bias"):
        out[f"transformer.norm_pre.{part}"] = state[f"{e}LayerNorm.{part}"]
        out[f"head.{part}"] = state[f"model.lm_head.{part}"]
        for i in range(config.transformer.depth):
            src, dst = f"model.encoder.layer.{i}.", f"transformer.blocks.{i}."
            out[f"{dst}attn.qkv.{part}"] = torch.cat(
                [state[f"{src}attention.self.{w}.{part}"] for w in ("query", "key", "value")])
            for old, new in BERT_NAMES.items():
                out[f"{dst}{new}.{part}"] = state[f"{src}{old}.{part}"]
    return out


def uvit_state(state: dict[str, Tensor], config: MaskGITConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    _split_vocabulary(state["embeddings.weight"], config, out)
    out["pos_embed.weight"] = state["pos_embed"]
    half = config.transformer.depth // 2
    sources = [f"in_blocks.{i}." for i in range(half)] + ["mid_block."] + [f"out_blocks.{j}." for j in range(half)]
    for i, src in enumerate(sources):
        dst = f"transformer.blocks.{i}."
        qkv = state[f"{src}attn.qkv.weight"]
        out[f"{dst}attn.qkv.weight"] = qkv
        out[f"{dst}attn.qkv.bias"] = qkv.new_zeros(qkv.shape[0])  # the U-ViT's qkv has no bias
        for part in ("weight", "bias"):
            for old, new in UVIT_NAMES.items():
                out[f"{dst}{new}.{part}"] = state[f"{src}{old}.{part}"]
    for j in range(half):
        for part in ("weight", "bias"):
            out[f"transformer.skips.{j}.{part}"] = state[f"out_blocks.{j}.skip_linear.{part}"]
    for part in ("weight", "bias"):
        out[f"transformer.norm.{part}"] = state[f"norm.{part}"]
        out[f"head.{part}"] = state[f"lm_head.{part}"]
    return out


def maskgit_state(state: dict[str, Tensor], config: MaskGITConfig) -> dict[str, Tensor]:
    """Rename and split an official generator's state dict into textok's MaskGIT layout."""
    return uvit_state(state, config) if config.long_skips else bert_state(state, config)


def build_maskgit(state: dict[str, Tensor], variant: Variant) -> MaskGIT:
    config = maskgit_config(variant)
    model = MaskGIT(config)
    model.load_state_dict(maskgit_state(state, config), strict=True)
    return model.eval()


def maskgit_record(model: MaskGIT, tokenizer: Path) -> dict[str, Any]:
    """The ``latents_meta`` a trained generator carries, for a converted one: the tokenizer it samples for,
    checked to make the codes it models."""
    data = read_config_json(tokenizer)
    kind = data.get("model_type")
    tok = data.get("config", {})
    c = model.config
    num_tokens = tok.get("num_tokens")
    codes = tok.get("quantizer", {}).get("num_codes")
    if kind != "titok" or (num_tokens, codes) != (c.num_tokens, c.codebook_size):
        raise TextokError(f"--tokenizer {tokenizer} is a {kind} of {num_tokens} tokens over {codes} codes, but this "
                          f"generator models {c.num_tokens} tokens over {c.codebook_size} codes; give the converted "
                          "TiTok it was released with")
    return {"tokenizer_dir": str(tokenizer.resolve()), "tokenizer_type": kind, "discrete": True,
            "num_tokens": c.num_tokens, "codebook_size": c.codebook_size, "num_classes": c.num_classes,
            "code_shape": [c.num_tokens]}


def textok_sampler(variant: Variant) -> dict[str, Any]:
    """The release's FID sampler (its config with 1d-tokenizer's sample_imagenet_titok.py: softmax temperature
    annealing on) as textok's stored sampler. Its linear / constant guidance is cond + w (cond - uncond), textok's
    uncond + w' (cond - uncond): w' = w + 1; its power-cosine guidance is already uncond + w (cond - uncond)."""
    g = variant.settings
    power = g["guidance_decay"] == "power-cosine"
    return {"steps": g["num_steps"], "temperature": g["randomize_temperature"], "temperature_schedule": "linear",
            "softmax_annealing": True, "guidance_scale": g["guidance_scale"] if power else g["guidance_scale"] + 1,
            "guidance_schedule": g["guidance_decay"],
            "guidance_exponent": g.get("guidance_scale_pow", 3.0) if power else 1.0}


__all__ = ["build_maskgit", "maskgit_config", "maskgit_record", "maskgit_state", "textok_sampler"]
