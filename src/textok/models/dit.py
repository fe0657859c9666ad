"""DiT (Peebles & Xie 2023) over a 1D sequence of tokenizer latents, in one readable file.

TexTok's generator is a DiT with patch size 1 over the tokenizer's N x 8 latent tokens: each token is one
position of the sequence, so the "patch embedding" is a linear layer from the 8 latent channels to the
width, positions are fixed 1D sin-cos embeddings and the output is unpatchified by a linear layer back to
8 channels (16 with a learned variance).

Patches (``patch_size`` p > 1) read the tokens as a square grid, row-major (a 2D latent such as a VAE's,
flattened), as DiT does with images: each p x p group of neighbouring tokens is one position of the sequence,
embedded by a linear layer on its (p, q, channel)-ordered values, with fixed 2D sin-cos positions (MAE's, the
first half of the channels for the column), and every position's output is unpatchified back to its p x p
tokens. DiT-XL/2 over Stable Diffusion's 32 x 32 x 4 latents is this with p = 2 (``textok convert --from dit``).

Conditioning
------------
* timestep ``t``: sinusoidal features -> 2-layer MLP (as DiT);
* class ``y``: an embedding table with one extra row, the "null" class, used for classifier-free guidance
  (labels are replaced by the null class with probability ``class_dropout`` while training);
* text (text-to-image): per-token text states ``(B, L, text_dim)`` with a key-padding mask (True = real
  token) are projected to the width once and read by a cross-attention layer after the self-attention of
  every block (PixArt-alpha style); their masked mean is projected and added to the conditioning vector.
  A learned null-text vector replaces the caption of dropped rows (and rows with no real tokens).

adaLN-zero
----------
Every block normalises its input with a LayerNorm without affine parameters and then scales and shifts it
with values regressed from the conditioning vector ``c`` (adaptive LayerNorm), once before attention and
once before the MLP. Each residual branch is also multiplied by a regressed gate. The regression layers
are initialised to zero, so at initialisation every gate is 0 and every block is the identity function
(the cross-attention output projection is zero-initialised for the same reason); the final layer is
zero-initialised too, so the untrained network predicts exactly 0. This made DiT train faster and more
stably than in-context or cross-attention conditioning of the class (DiT paper, Fig. 5).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import OMIT_DEFAULT, Config
from ..devices import autocast_for
from ..diffusion import DiffusionConfig, create_diffusion
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from .kinds import SampleRequest
from .vit import MLP, Attention, CrossAttention, attention_mask, sincos_1d, sincos_2d

# Peak dense bf16 throughput of one H100 SXM (nominal, datasheet) and the measured bf16 matmul ceiling
# (docs/TARGETS.md, with sources); MFU is reported against the nominal peak unless stated otherwise.
H100_BF16_PEAK_FLOPS = 989e12
H100_BF16_MEASURED_FLOPS = 779e12


@dataclasses.dataclass
class DiTConfig(Config):
    """Size and conditioning of a DiT over ``num_tokens`` latent tokens of ``in_channels`` channels."""

    num_tokens: int = 32
    in_channels: int = 8
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = no class conditioning
    class_dropout: float = 0.1  # probability of the null class while training (for CFG)
    text_dim: int = 0  # width of the text encoder states; 0 = no text conditioning
    text_dropout: float = 0.1  # probability of the null text while training (for CFG)
    pool_text: bool = True  # add the projected masked-mean text vector to the conditioning
    learn_sigma: bool = True  # also predict the variance interpolation (doubles the output channels)
    freq_dim: int = 256  # sinusoidal timestep features
    qk_norm: bool = False
    # > 1: the tokens are a square grid (row-major) embedded in p x p patches with 2D positions (DiT's images)
    patch_size: int = field(default=1, metadata=OMIT_DEFAULT)
    # guidance on the first k latent channels only, the others conditional (the official DiT's k = 3); 0 = all
    guided_channels: int = field(default=0, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"DiT width {self.width} is not divisible by heads {self.heads}; pick heads that divide it")
        if self.width % 2 or self.freq_dim % 2:
            raise ConfigError("DiT width and freq_dim must be even (sin-cos embeddings)")
        for name in ("class_dropout", "text_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{name}={p} must lie in [0, 1)")
        if self.num_tokens < 1 or self.in_channels < 1:
            raise ConfigError("num_tokens and in_channels must be positive")
        if not 0 <= self.guided_channels <= self.in_channels:
            raise ConfigError(f"guided_channels={self.guided_channels} must lie in [0, in_channels={self.in_channels}] "
                              "(0 = guide every channel)")
        if self.patch_size < 1:
            raise ConfigError(f"patch_size={self.patch_size} must be at least 1")
        if self.patch_size > 1:
            side = math.isqrt(self.num_tokens)
            if side * side != self.num_tokens or side % self.patch_size:
                raise ConfigError(f"patch_size={self.patch_size} needs a square grid of tokens whose side it divides; "
                                  f"num_tokens={self.num_tokens} is not one (use patch_size=1)")
            if self.width % 4:
                raise ConfigError(f"DiT width {self.width} must be divisible by 4 for 2D sin-cos positions")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def seq_len(self) -> int:
        """Positions of the transformer's sequence: the tokens, or their p x p patches."""
        return self.num_tokens // self.patch_size**2


# name -> (width, depth, heads), the sizes of the DiT paper (Table 1).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "dit-s": (384, 12, 6),
    "dit-b": (768, 12, 12),
    "dit-l": (1024, 24, 16),
    "dit-xl": (1152, 28, 16),
}


def _register(name: str, width: int, depth: int, heads: int) -> None:
    @DiTConfig.register_preset(name)
    def _make() -> DiTConfig:
        return DiTConfig(width=width, depth=depth, heads=heads)


for _name, (_w, _d, _h) in DIT_SIZES.items():
    _register(_name, _w, _d, _h)


@DiTConfig.register_preset("dit-tiny")
def _dit_tiny() -> DiTConfig:
    """A CPU-sized DiT for tests and demos."""
    return DiTConfig(num_tokens=16, width=64, depth=2, heads=4, num_classes=10)


@DiTConfig.register_preset("dit-tiny-t2i")
def _dit_tiny_t2i() -> DiTConfig:
    """A CPU-sized text-to-image DiT (MiniLM's 384-d token states)."""
    return DiTConfig(num_tokens=16, width=64, depth=2, heads=4, num_classes=0, text_dim=384)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``t`` (B,) -> (B, dim), [cos | sin] as DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoidal features -> MLP -> (B, width)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-zero block: self-attention, optional cross-attention to text, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        # Cross-attention is not modulated (as in PixArt-alpha); its output projection starts at zero.
        self.norm_cross = nn.LayerNorm(width, eps=1e-6) if cross else None
        self.cross_attn = CrossAttention(width, width, heads, qk_norm) if cross else None
        # Input is SiLU(c), computed once per forward by the DiT and shared by every block.
        self.adaLN_modulation = nn.Linear(width, 6 * width)

    def forward(self, x: Tensor, c_act: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_act).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN then a linear map from the width to the output channels of each token."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Linear(width, 2 * width)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(PretrainedMixin, nn.Module):
    """Diffusion transformer over (B, N, C) token latents; predicts ε (and the variance interpolation v)."""

    config_class = DiTConfig
    model_type = "dit"

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.width
        p = cfg.patch_size
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)
        # Fixed positions, recomputed from the config (not saved in checkpoints).
        grid = math.isqrt(cfg.seq_len)
        positions = sincos_1d(cfg.num_tokens, D) if p == 1 else sincos_2d(grid, grid, D)
        self.register_buffer("pos_embed", positions[None], persistent=False)
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes > 0 else None  # last row = null
        has_text = cfg.text_dim > 0
        if has_text:
            # Caption projection to the width, shared by every block's cross-attention (PixArt-alpha).
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
            self.text_pool = (
                nn.Sequential(nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D)) if cfg.pool_text else None
            )
            self.null_text = nn.Parameter(torch.randn(cfg.text_dim) / cfg.text_dim**0.5)
        else:
            self.text_proj = None
            self.text_pool = None
            self.null_text = None
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.heads, cfg.mlp_ratio, has_text, cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, cfg.out_channels * p * p)
        self.initialize_weights()

    # ---- init ------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, zero adaLN, zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.text_pool is not None:
            nn.init.normal_(self.text_pool[0].weight, std=0.02)
            nn.init.normal_(self.text_pool[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for lin in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- conditioning ----------------------------------------------------------------------
    def condition(
        self,
        t: Tensor,
        y: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Conditioning vector c (B, D), projected text context (B, L, D) and its (B, 1, 1, L) mask.

        Rows where ``drop`` is True get the null class and the null text. Without ``drop``, rows are
        dropped at random while training: one uniform draw per row serves both class and text, so when
        ``class_dropout == text_dropout`` they drop together (the unconditional model CFG needs).
        """
        B = t.shape[0]
        device = t.device
        c = self.t_embedder(t)
        if drop is not None:
            drop_y = drop_text = drop.to(device=device, dtype=torch.bool)
        elif self.training:
            u = torch.rand(B, device=device)
            drop_y, drop_text = u < self.config.class_dropout, u < self.config.text_dropout
        else:
            drop_y = drop_text = None
        if self.y_embedder is not None:
            null = torch.full((B,), self.config.num_classes, dtype=torch.long, device=device)
            labels = null if y is None else y.long()
            if drop_y is not None:
                labels = torch.where(drop_y, null, labels)
            c = c + self.y_embedder(labels)
        elif y is not None:
            raise ConfigError("this DiT has num_classes=0 but got class labels; drop y or set num_classes")
        context = ctx_mask = None
        if self.text_proj is not None:
            null_text = self.null_text
            if text is None:
                text = null_text.expand(B, 1, -1)
                text_mask = None
            if text.shape[-1] != self.config.text_dim:
                raise ConfigError(f"text states have width {text.shape[-1]} but the DiT expects text_dim={self.config.text_dim}")
            L = text.shape[1]
            mask = torch.ones(B, L, dtype=torch.bool, device=device) if text_mask is None else text_mask.to(device).bool()
            nulled = ~mask.any(dim=1)  # rows without a single real token read the null text
            if drop_text is not None:
                nulled = nulled | drop_text
            first_only = (torch.arange(L, device=device) == 0).expand(B, L)
            text = torch.where(nulled[:, None, None], null_text.expand(B, L, -1), text.to(null_text.dtype))
            mask = torch.where(nulled[:, None], first_only, mask)
            context = self.text_proj(text)
            ctx_mask = attention_mask(mask)
            if self.text_pool is not None:
                w = mask[..., None]
                pooled = torch.where(w, text, 0).sum(1) / w.sum(1).to(text.dtype)  # padding never enters
                c = c + self.text_pool(pooled)
        elif text is not None:
            raise ConfigError("this DiT has text_dim=0 but got text states; drop text or set text_dim")
        return c, context, ctx_mask

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C) noisy latents, t (B,) timesteps -> (B, N, C or 2C).

        ``y`` (B,) class ids (None = null class); ``text`` (B, L, text_dim) with ``text_mask`` (B, L) bool,
        True = real token (None = null text); ``drop`` (B,) bool forces the null condition on those rows
        (otherwise rows are dropped at random while training).
        """
        if x.shape[1] != self.config.num_tokens or x.shape[2] != self.config.in_channels:
            raise ConfigError(
                f"DiT expects latents of shape (B, {self.config.num_tokens}, {self.config.in_channels}), got {tuple(x.shape)}"
            )
        c, context, ctx_mask = self.condition(t, y, text, text_mask, drop)
        c_act = F.silu(c)
        p = self.config.patch_size
        if p > 1:
            x = self.patchify(x)
        h = self.x_embedder(x.to(self.x_embedder.weight.dtype))  # float32 sampler state into bf16 weights
        h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = block(h, c_act, context, ctx_mask)
        out = self.final_layer(h, c_act)
        return self.unpatchify(out) if p > 1 else out

    def patchify(self, x: Tensor) -> Tensor:
        """(B, side^2, C) row-major grid tokens -> (B, (side/p)^2, p p C): each patch's values in (p, q, c) order."""
        p, (B, N, C) = self.config.patch_size, x.shape
        g = math.isqrt(N) // p
        return x.reshape(B, g, p, g, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, p * p * C)

    def unpatchify(self, h: Tensor) -> Tensor:
        """(B, (side/p)^2, p p C') -> (B, side^2, C'): the inverse of :meth:`patchify`."""
        p, (B, T, K) = self.config.patch_size, h.shape
        g, C = math.isqrt(T), K // (p * p)
        return h.reshape(B, g, g, p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g * p * g * p, C)

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cfg_scale: float = 1.0,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Classifier-free guidance in ONE forward pass over the batch [cond; uncond].

        Returns (B, N, C or 2C): ε_uncond + s (ε_cond − ε_uncond) on all C latent channels (on the first
        ``guided_channels`` when set, the others conditional: the official DiT guides 3 of its 4 latent
        channels, which a converted DiT reproduces); the variance channels (when ``learn_sigma``) are the
        conditional ones.
        To compile, use ``model.compile()`` (in place) rather than ``torch.compile(model)``: this method
        calls ``self(...)``, which the in-place form routes through the compiled forward.
        """
        B = x.shape[0]
        x2 = torch.cat([x, x], dim=0)
        t2 = torch.cat([t, t], dim=0)
        y2 = None if y is None else torch.cat([y, y], dim=0)
        text2 = None if text is None else torch.cat([text, text], dim=0)
        mask2 = None if text_mask is None else torch.cat([text_mask, text_mask], dim=0)
        drop = torch.arange(2 * B, device=x.device) >= B  # second half: null class / null text
        out = self(x2, t2, y2, text2, mask2, drop=drop)
        cond, uncond = out.chunk(2, dim=0)
        G = self.config.guided_channels or self.config.in_channels
        eps = uncond[..., :G] + cfg_scale * (cond[..., :G] - uncond[..., :G])
        return torch.cat([eps, cond[..., G:]], dim=-1)

    # ---- cost ------------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_forward(self, batch: int = 1, text_len: int = 32) -> float:
        """Forward FLOPs (2 × multiply-adds) for ``batch`` sequences; text models assume ``text_len`` tokens.

        Counts every matmul (attention scores and values included); ignores norms, activations and
        softmax. DiT's paper reports multiply-adds ("Gflops"), i.e. half of this number.
        """
        cfg = self.config
        N, D, C = cfg.seq_len, cfg.width, cfg.in_channels * cfg.patch_size**2
        H = int(D * cfg.mlp_ratio)
        L = text_len if cfg.text_dim > 0 else 0
        macs = N * C * D  # x embedder
        macs += cfg.freq_dim * D + D * D  # timestep MLP
        per_block = 6 * D * D  # adaLN regression (once per sequence)
        per_block += 4 * N * D * D + 2 * N * N * D  # self-attention: qkv + proj, scores + values
        per_block += 2 * N * D * H  # MLP
        if L:
            per_block += 2 * N * D * D + 2 * L * D * D + 2 * N * L * D  # cross-attn: q + proj, kv, scores + values
            macs += L * (cfg.text_dim * D + D * D)  # caption projection
            if cfg.pool_text:
                macs += cfg.text_dim * D + D * D
        macs += cfg.depth * per_block
        macs += 2 * D * D + N * D * cfg.out_channels * cfg.patch_size**2  # final layer
        return 2.0 * macs * batch

    def estimate_mfu(
        self,
        images_per_second: float,
        *,
        training: bool = False,
        peak_flops: float = H100_BF16_PEAK_FLOPS,
        text_len: int = 32,
    ) -> float:
        """Model FLOPs utilisation (nanoGPT style): achieved FLOP/s / peak. Training counts fwd+bwd = 3 × fwd."""
        flops = self.flops_per_forward(1, text_len) * (3.0 if training else 1.0)
        return images_per_second * flops / peak_flops


# ---- its kind's sampling (see models.kinds) ----------------------------------------------------------------
def sample_images(model: DiT, tok: nn.Module, req: SampleRequest) -> Tensor:
    """Tokens from noise by the diffusion (or flow) the DiT was trained with, un-normalised with the latents'
    statistics, decoded by the tokenizer."""
    diffusion = create_diffusion(DiffusionConfig.from_dict(req.record["diffusion"]))
    meta = req.record["latents_meta"]
    mean = torch.tensor(meta["mean"], dtype=torch.float32, device=req.device)
    std = torch.tensor(meta["std"], dtype=torch.float32, device=req.device)
    kwargs: dict = {}
    if req.labels is not None:
        kwargs["y"] = req.labels
    if req.text is not None:
        kwargs.update(text=req.text.states, text_mask=req.text.mask)
    c = model.config
    guided = req.labels is not None or req.text is not None
    with autocast_for(req.device, req.precision):
        z = diffusion.sample(model, (req.batch, c.num_tokens, c.in_channels), steps=req.steps, sampler=req.sampler,
                             cfg_scale=req.cfg_scale if guided else 1.0, model_kwargs=kwargs, generator=req.generator,
                             device=req.device, progress=req.progress, cuda_graph=req.cuda_graph)
    return tok.decode(z.float() * std + mean, req.decoder_text)


def check_tokenizer(model: DiT, tok: nn.Module, record: dict, fix: str) -> None:
    """The DiT's token shape is the tokenizer's, and its normalisation statistics have its channels."""
    c, tc = model.config, tok.config
    gen_shape, tok_shape = (c.num_tokens, c.in_channels), (tc.num_tokens, tc.token_channels)
    if gen_shape != tok_shape:
        raise TextokError(f"the generator makes tokens of shape {gen_shape} (tokens, channels) but the tokenizer "
                          f"decodes {tok_shape}; {fix}")
    if len(record["latents_meta"]["mean"]) != c.in_channels:
        raise TextokError(f"the generator's normalisation statistics have {len(record['latents_meta']['mean'])} "
                          f"channels for a generator of {c.in_channels}; retrain it from fresh latents")


__all__ = [
    "DiTConfig",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "TimestepEmbedder",
    "timestep_embedding",
    "modulate",
    "DIT_SIZES",
    "H100_BF16_PEAK_FLOPS",
    "H100_BF16_MEASURED_FLOPS",
]
