"""1d-tokenizer's TiTok and TA-TiTok checkpoints -> textok's :class:`~textok.models.titok.TiTok`.

The released tokenizers are stage-2 models: a ViT encoder with a class token, ``ln_pre``/``ln_post`` and
CLIP-style blocks (``nn.MultiheadAttention``, LayerNorm eps 1e-5, exact GELU), a VQ over the latent tokens, a
ViT decoder whose head predicts MaskGIT-VQGAN codes, and the fine-tuned VQGAN decoder that turns the softmax of
those predictions into pixels. textok's TiTok expresses this with its layout options (``class_token``,
``norm_pre``, ``norm_eps``, ``gelu``, ``legacy_token_layout``) and ``stage="decoder-finetune"`` with a VQGAN
that has no encoder (the checkpoint carries none).

The official networks see and make images in [0, 1]; textok's are in [-1, 1], so the conversion folds the
change of range into the first and last layers (the MaskGIT-VQGAN decoder converts on its own). Three facts of
the official code are kept because the weights were trained with them: the class token's
embedding and its position are one sum (stored as ``class_token``); the encoder head of the released models
("legacy") reads the (N, width) outputs as a (width, N) array; the decoder's 1x1 convolutions are linear maps.

TA-TiTok (and the later TiTok VQ-8k / VAE releases) use the fixed token layout and a pixel head (a 1x1 conv to
patches, then a 3x3 conv on the image: ``pixel_conv``), VQ without l2 normalisation or a KL bottleneck, and
TA-TiTok adds the CLIP text tower's states of all 77 context positions, with learned positions
(``text_positions``), to the decoder's sequence.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.maskgit_vqgan import MaskGITVQGANConfig
from ..models.quantizers import QuantizerConfig
from ..models.titok import TiTok, TiTokConfig
from ..models.vit import ViTConfig
from .manifest import Variant

# Official block parameter names -> textok's, inside ``{side}.transformer.{i}.``.
BLOCK_NAMES = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
BLOCK_KEY = re.compile(r"^(encoder|decoder)\.transformer\.(\d+)\.(.+)$")


def titok_config(variant: Variant, text_encoder: str | None = None) -> TiTokConfig:
    """The textok config that reproduces a released TiTok (or, with ``text_encoder``, TA-TiTok), from its
    published settings."""
    s = variant.settings
    vq = s["vq_model"]
    mode = vq.get("quantize_mode", "vq")
    if mode not in ("vq", "vae"):
        raise ConfigError(f"{variant.name}: quantize_mode={mode!r} is neither vq nor vae")
    if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
        raise ConfigError(f"{variant.name}: encoder and decoder patch sizes differ; textok's TiTok uses one")
    legacy = bool(s.get("is_legacy", True))
    finetuned = bool(vq.get("finetune_decoder", True))
    if legacy != finetuned:
        raise ConfigError(f"{variant.name}: is_legacy={legacy} with finetune_decoder={finetuned} is a training "
                          "stage that was not released (stage-1 code predictions, or a pixel head with a VQGAN)")
    (ew, ed, eh), (dw, dd, dh) = s["vit"]["encoder"], s["vit"]["decoder"]
    extra: dict = {}
    if finetuned:
        p = s["pixel_decoder"]
        extra = dict(stage="decoder-finetune", vqgan=MaskGITVQGANConfig(
            hidden_channels=p["hidden_channels"], channel_mult=tuple(p["channel_mult"]),
            num_res_blocks=p["num_res_blocks"], z_channels=p["z_channels"], num_codes=p["num_codes"],
            norm_groups=s.get("norm_groups", 32), with_encoder=False))
    if text_encoder is not None:  # TA-TiTok: the text tower's states of every context position, in the decoder
        context = s["text_context_length"]
        extra.update(text_in_decoder=True, text_encoder=text_encoder, text_dim=s["text_embed_dim"],
                     text_max_length=context, text_positions=context)
    if mode == "vq":
        quantizer = QuantizerConfig(kind="vq", num_codes=vq["codebook_size"], code_dim=vq["token_size"],
                                    l2_normalized=vq["use_l2_norm"], beta=vq["commitment_cost"])
    else:
        quantizer = QuantizerConfig(kind="kl", code_dim=vq["token_size"])
    return TiTokConfig(
        image_size=s["crop_size"], patch_size=vq["vit_enc_patch_size"], num_tokens=vq["num_latent_tokens"],
        encoder=ViTConfig(width=ew, depth=ed, heads=eh), decoder=ViTConfig(width=dw, depth=dd, heads=dh),
        quantizer=quantizer, class_token=True, norm_pre=True, norm_eps=1e-5, gelu="none", legacy_token_layout=legacy,
        pixel_conv=not legacy, **extra,
    )


def titok_state(state: dict[str, Tensor], config: TiTokConfig) -> dict[str, Tensor]:
    """Rename and reshape an official TiTok state dict into textok's TiTok layout (every key used once)."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return state[key]

    out: dict[str, Tensor] = {"encoder.latent_tokens": take("latent_tokens")[None]}
    for side in ("encoder", "decoder"):
        pos = take(f"{side}.positional_embedding")
        out[f"{side}.class_token"] = (take(f"{side}.class_embedding") + pos[:1])[None]
        out[f"{side}.patch_pos"] = pos[1:][None]
        out[f"{side}.latent_pos"] = take(f"{side}.latent_token_positional_embedding")[None]
        for part in ("weight", "bias"):
            out[f"{side}.transformer.norm_pre.{part}"] = take(f"{side}.ln_pre.{part}")
            out[f"{side}.transformer.norm.{part}"] = take(f"{side}.ln_post.{part}")
    for key in state:
        m = BLOCK_KEY.match(key)
        if m:
            side, i, rest = m.groups()
            name = next((new + rest[len(old):] for old, new in BLOCK_NAMES.items() if rest.startswith(old)), None)
            if name is not None:
                out[f"{side}.transformer.blocks.{i}.{name}"] = take(key)
    # The official encoder sees images in [0, 1], textok's in [-1, 1]: x01 = (x + 1) / 2 folded into the
    # patch embedding (W x01 + b = (W / 2) x + (b + sum(W) / 2)).
    weight = take("encoder.patch_embed.weight")
    out["encoder.patch_embed.proj.weight"] = weight / 2
    out["encoder.patch_embed.proj.bias"] = take("encoder.patch_embed.bias") + weight.sum(dim=(1, 2, 3)) / 2
    for part in ("weight", "bias"):
        out[f"decoder.token_proj.{part}"] = take(f"decoder.decoder_embed.{part}")
    out["encoder.to_tokens.weight"] = take("encoder.conv_out.weight")[:, :, 0, 0]
    out["encoder.to_tokens.bias"] = take("encoder.conv_out.bias")
    out["decoder.mask_token"] = take("decoder.mask_token")
    if config.legacy_token_layout:  # the code head: 1x1 conv, tanh, 1x1 conv
        for i in (0, 2):
            out[f"decoder.to_codes.{i}.weight"] = take(f"decoder.ffn.{i}.weight")[:, :, 0, 0]
            out[f"decoder.to_codes.{i}.bias"] = take(f"decoder.ffn.{i}.bias")
    else:  # the pixel head: 1x1 conv to p*p*3 channels (unpatchified), then a 3x3 conv
        out["decoder.to_pixels.weight"] = take("decoder.ffn.0.weight")[:, :, 0, 0]
        out["decoder.to_pixels.bias"] = take("decoder.ffn.0.bias")
        # its images are in [0, 1]: 2 y - 1 folded into the last conv
        out["decoder.pixel_conv.weight"] = take("decoder.conv_out.weight") * 2
        out["decoder.pixel_conv.bias"] = take("decoder.conv_out.bias") * 2 - 1
    if config.quantizer.kind == "vq":
        codebook = take("quantize.embedding.weight")
        out["quantizer.embedding.weight"] = codebook
        out["quantizer.unused_steps"] = torch.zeros(codebook.shape[0], dtype=torch.int64, device=codebook.device)
    if config.text_in_decoder:  # TA-TiTok
        for part in ("weight", "bias"):
            out[f"decoder.text_proj.{part}"] = take(f"decoder.text_guidance_proj.{part}")
        out["decoder.text_pos"] = take("decoder.text_guidance_positional_embedding")[None]
    if config.uses_vqgan:
        out["vqgan.quantize.embedding.weight"] = take("pixel_quantize.embedding.weight")
        for key in state:
            if key.startswith("pixel_decoder."):
                out["vqgan.decoder." + key[len("pixel_decoder."):]] = take(key)
    left = sorted(set(state) - used)
    if left:  # the manifest check ran first, so this is a gap in this mapping, not in the file
        raise AssertionError(f"titok conversion left official keys unused: {left[:3]}")
    return out


def build_titok(state: dict[str, Tensor], variant: Variant, text_encoder: str | None = None) -> TiTok:
    """A textok TiTok holding the official weights of ``variant``'s layout (TA-TiTok: with ``text_encoder``)."""
    config = titok_config(variant, text_encoder)
    model = TiTok(config, load_vqgan=False)
    model.load_state_dict(titok_state(state, config), strict=True)
    return model.eval()


def build_tatitok(state: dict[str, Tensor], variant: Variant, text_encoder: str | None = None) -> TiTok:
    """A textok TiTok with text in the decoder holding a released TA-TiTok; ``text_encoder`` is the textok spec
    of its CLIP text tower (``clip:/local/dir``)."""
    if not text_encoder:
        raise ConfigError("TA-TiTok decodes with CLIP text states: give --text-encoder clip:/path/to/a local copy "
                          "of openai/clip-vit-large-patch14-336 (its text tower is the one TA-TiTok was trained with)")
    return build_titok(state, variant, text_encoder)


__all__ = ["build_tatitok", "build_titok", "titok_config", "titok_state"]
