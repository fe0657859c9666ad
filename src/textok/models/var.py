"""VAR (Tian et al. 2024) next-scale prediction over ImageFolder's product-quantized codes, with folding.

Sequence. The codes of an image are S scales per branch, scale s a pn_s x pn_s map (L = sum(pn^2) codes per
branch). The transformer predicts a whole scale in one step: the input at the positions of scale s is the
tokenizer's cumulative f_hat of scales < s, area-downsampled to pn_s (:meth:`ProductQuantizer.
teacher_forcing_inputs`); scale 0's input is the start token (class embedding + a learned start position).
Attention is block-causal by scale: a position sees its own scale and every earlier one. Positions get a
learned embedding per (scale, cell) and a learned level embedding per scale.

Folding (``fold=True``, ImageFolder). Both branches' inputs at a position are concatenated (P C channels)
into one embedding, and one head emits P V logits there, split into one categorical per branch; the loss is
the mean of the branch cross-entropies. So P L code ids come from L positions (572 ids from 286 positions
in the paper). ``fold=False`` is the ablation: the branches are serialized, each scale's block holding
branch 0's pn^2 positions then branch 1's (P L positions, the same S steps); each position embeds its own
branch's C channels plus a branch embedding and is read out by its branch's slice of the same head.

Attention is VAR's ``attn_l2_norm`` (``attn_l2_norm=True``, the default, as in VAR and both ImageFolder
releases): queries and keys are l2-normalised per head, the queries multiplied by exp(s_h), s_h a learned
per-head log-scale that starts at log 4 and is clamped at log 100, and the softmax takes the logits as they are
(scale 1, not 1/sqrt(d)). So a logit is a cosine similarity times a learned temperature between 4 and 100.
``attn_l2_norm=False`` is plain 1/sqrt(d) attention (``qk_norm`` adds RMSNorm on q and k: a different
normalisation, with the 1/sqrt(d) scale kept). Stochastic depth as VAR's: block i drops its residual branches
per sample with probability ``drop_path`` i / (depth - 1) in training (VAR: 0.1 depth / 24 at the last
block, the default).

Conditioning. A class embedding (num_classes + 1 rows; the last is the null class, used with probability
``class_dropout`` in training, for classifier-free guidance) is the start token and, through SiLU + a linear
layer per block, the adaLN shift / scale / gate of every block and of the head (VAR's AdaLNSelfAttn /
AdaLNBeforeHead). ``shared_adaln`` (VAR's ``shared_aln``, its d36-s release) has the blocks share one such
linear layer, each block adding its own learned offset to the six vectors. Sampling runs scale by scale with a KV cache; guidance ramps over scales as in VAR:
logits = (1 + t) cond - t uncond with t = cfg * s / (S - 1); top-k / top-p; branches sampled independently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import OMIT_DEFAULT, Config
from ..devices import autocast_for
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from .dit import modulate
from .kinds import SampleRequest
from .multiscale import PAPER_SCALES, VAR_SCALES, VAR_SCALES_512
from .var_attention import CachedAttention, KVCache
from .var_sampling import VARSamplerConfig, sample_top_k_top_p
from .vit import MLP, drop_path


@dataclasses.dataclass
class VARConfig(Config):
    """Codes modelled (must match the tokenizer's quantizer), size, and training options."""

    scales: tuple[int, ...] = PAPER_SCALES
    branches: int = 2
    codebook_size: int = 4096
    code_dim: int = 32  # channels per branch of the tokenizer's f_hat (the inputs)
    num_classes: int = 1000
    width: int = 1088
    depth: int = 17
    heads: int = 17
    mlp_ratio: float = 4.0
    fold: bool = True
    class_dropout: float = 0.1
    attn_l2_norm: bool = True  # VAR's attention: l2-normalised q, k, learned per-head temperature, softmax scale 1
    qk_norm: bool = False  # RMSNorm on q and k with the 1/sqrt(d) scale (not VAR's; exclusive with attn_l2_norm)
    drop_path: float | None = None  # stochastic depth of the last block (None: VAR's 0.1 x depth / 24)
    # one adaLN projection shared by all blocks, plus a learned offset per block (VAR's shared_aln, VAR-d36-s)
    shared_adaln: bool = field(default=False, metadata=OMIT_DEFAULT)
    sampler: VARSamplerConfig = field(default_factory=VARSamplerConfig, metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        if not self.scales or any(s < 1 for s in self.scales):
            raise ConfigError(f"scales={list(self.scales)} must be a non-empty list of sides >= 1")
        if self.branches < 1 or self.codebook_size < 2 or self.code_dim < 1 or self.num_classes < 1:
            raise ConfigError("branches, code_dim, num_classes must be >= 1 and codebook_size >= 2")
        if self.width % self.heads:
            raise ConfigError(f"VAR width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        if self.attn_l2_norm and self.qk_norm:
            raise ConfigError("attn_l2_norm and qk_norm are two ways to normalise queries and keys; set one of them "
                              "false")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must lie in [0, 1) (or be null for VAR's 0.1 x depth / 24), got "
                              f"{self.drop_path}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True, prefix: str = "") -> "VARConfig":
        """A config saved before ``attn_l2_norm`` and ``drop_path`` existed described plain attention and no
        stochastic depth: it keeps that meaning (so its weights still load)."""
        if isinstance(data, dict) and "attn_l2_norm" not in data:
            data = {**data, "attn_l2_norm": False, "drop_path": data.get("drop_path", 0.0)}
        return super().from_dict(data, strict=strict, prefix=prefix)

    @property
    def drop_path_rate(self) -> float:
        """Stochastic depth of the last block; block i of D drops with rate i / (D - 1) times this."""
        return 0.1 * self.depth / 24 if self.drop_path is None else self.drop_path

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def codes_per_branch(self) -> int:
        return sum(pn * pn for pn in self.scales)

    @property
    def sequence_length(self) -> int:
        """Transformer positions: sum(pn^2) folded, P times that unfolded."""
        return self.codes_per_branch * (1 if self.fold else self.branches)

    @property
    def input_channels(self) -> int:
        return self.code_dim * (self.branches if self.fold else 1)

    def check_compatible(self, tokenizer_config: Any,
                         fix: str = "build the generator with VARConfig.for_tokenizer(tokenizer_config)") -> None:
        """Refuse a tokenizer (an ImageFolderConfig, or its quantizer config) whose codes this does not model,
        in one line naming both layouts and ``fix``."""
        q = getattr(tokenizer_config, "quantizer", tokenizer_config)
        theirs = (tuple(q.scales), q.branches, q.num_codes, q.code_dim)
        mine = (self.scales, self.branches, self.codebook_size, self.code_dim)
        if theirs != mine:
            def show(t: tuple) -> str:
                return f"scales {list(t[0])}, {t[1]} branch(es) of {t[2]} codes x {t[3]} channels"
            raise TextokError(f"generator models {show(mine)} but the tokenizer makes {show(theirs)}; {fix}")

    @classmethod
    def for_tokenizer(cls, tokenizer_config: Any, **fields: Any) -> "VARConfig":
        """A config whose codes match ``tokenizer_config``'s quantizer; ``fields`` set the rest."""
        q = getattr(tokenizer_config, "quantizer", tokenizer_config)
        return cls(scales=tuple(q.scales), branches=q.branches, codebook_size=q.num_codes, code_dim=q.code_dim,
                   **fields)


def _register_presets() -> None:
    # The paper's generator: depth 17, width 1088 (VAR's 64 x depth), 17 heads, over imagefolder-b-256's codes.
    VARConfig.register_preset("var-imagefolder-b-256")(lambda: VARConfig())
    # CPU sizes over imagefolder-s-32 / -s-64 / -tiny codes.
    for res, scales in ((32, (1, 2, 3, 4, 6)), (64, (1, 2, 3, 4, 6, 8))):
        VARConfig.register_preset(f"var-s-{res}")(
            lambda scales=scales: VARConfig(scales=scales, codebook_size=1024, code_dim=16, num_classes=10,
                                            width=128, depth=4, heads=4))
    # VAR's own (Tian et al.) over its VQVAE's codes (var-vqvae-256): depth d, width 64 d, d heads; d36-s at 512 px
    # shares its adaLN. textok convert --from var loads their released weights into these layouts.
    for d in (16, 20, 24, 30, 36):
        VARConfig.register_preset(f"var-d{d}")(
            lambda d=d: VARConfig(scales=VAR_SCALES_512 if d == 36 else VAR_SCALES, branches=1, code_dim=32,
                                  width=64 * d, depth=d, heads=d, shared_adaln=d == 36))
    VARConfig.register_preset("var-tiny")(
        lambda: VARConfig(scales=(1, 2, 3), codebook_size=64, code_dim=8, num_classes=10, width=32, depth=2, heads=2))


_register_presets()


class VARBlock(nn.Module):
    """adaLN block: x + g1 * attn(mod(LN(x))); x + g2 * mlp(mod(LN(x))), shift/scale/gate from SiLU(c) (with
    ``shared_adaln``: the shared projection of SiLU(c) plus this block's offset); in training each residual
    branch is dropped per sample with probability ``drop_path``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, attn_l2_norm: bool = False,
                 drop_path: float = 0.0, shared_adaln: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CachedAttention(width, heads, qk_norm, attn_l2_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.ada = None if shared_adaln else nn.Linear(width, 6 * width)
        self.ada_offset = nn.Parameter(torch.zeros(6 * width)) if shared_adaln else None
        self.drop_path = drop_path

    def forward(self, x: Tensor, c_act: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """``c_act``: SiLU(c) (B, D), or with shared adaLN the shared projection of it (B, 6 D)."""
        mod = self.ada(c_act) if self.ada is not None else c_act + self.ada_offset
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        rate = self.drop_path if self.training else 0.0
        x = x + drop_path(gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask, cache), rate,
                          generator)
        return x + drop_path(gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2)), rate, generator)


def _logit_dtype(x: Tensor) -> torch.dtype:
    """Logits are compared and sampled in float32 at least (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class VAR(PretrainedMixin, nn.Module):
    """VAR, the class-conditional next-scale generator over ImageFolder's codes (the P branches' codes of one
    position folded into one step). Logits come as (B, P, L, V), aligned with codes (B, P, L)."""

    config_class = VARConfig
    model_type = "var"
    # parameter names the optimizer leaves out of weight decay beyond biases, norms and position tables (VAR's
    # nowd list: the level embedding is a 2-D table)
    no_weight_decay = ("level_embed",)

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.config = cfg
        D, P, S = cfg.width, cfg.branches, cfg.num_scales
        offsets = [0]
        for pn in cfg.scales:
            offsets.append(offsets[-1] + pn * pn)
        self.offsets = offsets  # folded positions (and codes) of scale s: [offsets[s], offsets[s + 1])
        self.word_embed = nn.Linear(cfg.input_channels, D)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D)  # last row: the null class
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.scales[0] ** 2, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, offsets[-1], D))  # one per (scale, cell), shared by branches
        self.level_embed = nn.Embedding(S, D)
        self.branch_embed = None if cfg.fold else nn.Embedding(P, D)
        last = cfg.drop_path_rate  # VAR's rule: linear in the block index, 0 at the first block
        rates = [last * i / (cfg.depth - 1) if cfg.depth > 1 else last for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(VARBlock(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attn_l2_norm, rate,
                                             cfg.shared_adaln) for rate in rates)
        self.shared_ada = nn.Linear(D, 6 * D) if cfg.shared_adaln else None
        self.head_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, P * cfg.codebook_size)  # branch p's logits: rows p V .. (p+1) V - 1
        level = torch.cat([torch.full((pn * pn * (1 if cfg.fold else P),), s) for s, pn in enumerate(cfg.scales)])
        self.register_buffer("mask", level[:, None] >= level[None, :], persistent=False)  # True = may attend
        self.initialize_weights()

    @property
    def cfg(self) -> VARConfig:
        return self.config

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---- init --------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """VAR's init (init_std = sqrt(1 / 3D) for linears and embeddings; head x 0.02; adaLN shift/scale x 0.5,
        gates x 1e-5 so every block starts near the identity; attention and MLP outputs / sqrt(2 depth))."""
        D = self.cfg.width
        std = math.sqrt(1.0 / (3 * D))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head.weight.mul_(0.02)
            self.head_ada.weight.mul_(0.5)
            for ada in [self.shared_ada] if self.shared_ada is not None else [b.ada for b in self.blocks]:
                w = ada.weight.view(6, D, D)  # shift1, scale1, gate1, shift2, scale2, gate2
                w[[0, 1, 3, 4]] *= 0.5
                w[[2, 5]] *= 1e-5
            for block in self.blocks:
                if block.ada_offset is not None:  # VAR's ada_gss: N(0, 1/D), shift/scale x 0.5, gates x 1e-5
                    offset = block.ada_offset.view(6, D)
                    nn.init.normal_(offset, std=D**-0.5)
                    offset[[0, 1, 3, 4]] *= 0.5
                    offset[[2, 5]] *= 1e-5
                block.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
                block.mlp.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))

    # ---- checks ------------------------------------------------------------------------------------------
    def check_compatible(self, tokenizer_config: Any, **fix: str) -> None:
        self.cfg.check_compatible(tokenizer_config, **fix)

    def _check_labels(self, labels: Tensor, batch: int | None = None) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise TextokError(f"labels must have shape ({batch if batch is not None else 'batch'},), got "
                              f"{tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TextokError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.cfg.num_classes):
            raise TextokError(f"class ids must lie in [0, {self.cfg.num_classes}] ({self.cfg.num_classes} = null), "
                              f"got [{int(labels.min())}, {int(labels.max())}]")
        return labels.long().to(self.pos_embed.device)

    def _check_inputs(self, inputs: Tensor) -> None:
        c = self.cfg
        want = (self.offsets[-1] - self.offsets[1], c.branches * c.code_dim)
        if inputs.dim() != 3 or tuple(inputs.shape[1:]) != want:
            raise TextokError(f"teacher-forcing inputs must have shape (batch, {want[0]}, {want[1]}) (scales "
                              f"{list(c.scales)}, {c.branches} x {c.code_dim} channels), got {tuple(inputs.shape)}")

    # ---- network -----------------------------------------------------------------------------------------
    def _embed_scale(self, s: int, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Scale ``s``'s block of the sequence: (B, pn^2, P C) inputs (ignored for s = 0, which reads the class
        embedding ``c``) -> (B, pn^2 or P pn^2, D)."""
        a, b = self.offsets[s], self.offsets[s + 1]
        pos = self.pos_embed[:, a:b] + self.level_embed.weight[s]
        if s == 0:
            h = c[:, None] + self.pos_start  # (B, pn0^2, D)
            h = h if self.cfg.fold else h[:, None].expand(-1, self.cfg.branches, -1, -1)
        elif self.cfg.fold:
            h = self.word_embed(x)
        else:
            h = self.word_embed(x.unflatten(-1, (self.cfg.branches, self.cfg.code_dim)).transpose(1, 2))
        if self.cfg.fold:
            return h + pos
        h = h + pos[:, None] + self.branch_embed.weight[None, :, None]  # (B, P, pn^2, D)
        return h.flatten(1, 2)

    def _scale_logits(self, h: Tensor, c_act: Tensor) -> Tensor:
        """Outputs of one scale's block (B, pn^2 or P pn^2, D) -> logits (B, P, pn^2, V)."""
        P, V = self.cfg.branches, self.cfg.codebook_size
        shift, scale = self.head_ada(c_act).chunk(2, dim=-1)
        h = modulate(self.head_norm(h), shift, scale)
        if self.cfg.fold:
            return self.head(h).unflatten(-1, (P, V)).transpose(1, 2)
        parts = h.unflatten(1, (P, -1))  # (B, P, pn^2, D): branch p reads its slice of the head
        w, b = self.head.weight.view(P, V, -1), self.head.bias.view(P, V)
        return torch.einsum("bpnd,pvd->bpnv", parts, w) + b[None, :, None]

    def _block_condition(self, c_act: Tensor) -> Tensor:
        """What the blocks read: SiLU(c), or its shared adaLN projection (B, 6 D)."""
        return self.shared_ada(c_act) if self.shared_ada is not None else c_act

    def condition(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """Class embedding (B, D); rows where ``drop`` is True (random in training) read the null class."""
        if drop is None and self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        if drop is not None:
            labels = labels.masked_fill(drop.to(labels.device), self.cfg.num_classes)
        return self.class_embed(labels)

    def forward(self, inputs: Tensor, labels: Tensor, drop: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forcing inputs (B, L - pn_0^2, P C), labels (B,) -> logits (B, P, L, V), one forward.
        ``generator`` draws the stochastic depth in training (the global RNG without it)."""
        self._check_inputs(inputs)
        labels = self._check_labels(labels, inputs.shape[0])
        c = self.condition(labels, drop)
        x = inputs.to(self.word_embed.weight.dtype)
        first = self.offsets[1]
        h = torch.cat([self._embed_scale(s, x[:, self.offsets[s] - first:self.offsets[s + 1] - first], c)
                       for s in range(self.cfg.num_scales)], dim=1)
        c_act = F.silu(c)
        c_blocks = self._block_condition(c_act)
        for block in self.blocks:
            h = block(h, c_blocks, self.mask, generator=generator)
        per = 1 if self.cfg.fold else self.cfg.branches
        blocks = h.split([per * pn * pn for pn in self.cfg.scales], dim=1)
        return torch.cat([self._scale_logits(blk, c_act) for blk in blocks], dim=2)

    def guided_logits(self, inputs: Tensor, labels: Tensor, cfg: float) -> Tensor:
        """Full-sequence logits with VAR's guidance ramp: (1 + t_s) cond - t_s uncond, t_s = cfg s / (S - 1)."""
        B = inputs.shape[0]
        labels = self._check_labels(labels, B)
        null = torch.full_like(labels, self.cfg.num_classes)
        both = self(torch.cat([inputs, inputs]), torch.cat([labels, null]),
                    drop=torch.zeros(2 * B, dtype=torch.bool, device=labels.device))
        both = both.to(_logit_dtype(both))
        cond, uncond = both.chunk(2)
        t = torch.cat([torch.full((pn * pn,), self._ramp(cfg, s), dtype=torch.float64)
                       for s, pn in enumerate(self.cfg.scales)])
        t = t.to(cond)[None, None, :, None]
        return (1 + t) * cond - t * uncond

    def _ramp(self, cfg: float, s: int) -> float:
        S = self.cfg.num_scales
        return cfg * s / (S - 1) if S > 1 else cfg

    # ---- training ----------------------------------------------------------------------------------------
    def training_loss(self, codes: Tensor, inputs: Tensor, labels: Tensor, drop: Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Cross-entropy of every code given the teacher-forcing inputs built from the same codes.

        Returns ``loss`` (mean of the branch cross-entropies, each averaged over all positions),
        ``ce_per_branch`` (P,) and ``accuracy``. Rows where ``drop`` (B,) is True read the null class; without
        it, labels are replaced by the null class at random in training. ``generator`` draws the stochastic
        depth."""
        c = self.cfg
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (c.branches, c.codes_per_branch):
            raise TextokError(f"codes must have shape (batch, {c.branches}, {c.codes_per_branch}), got "
                              f"{tuple(codes.shape)}")
        logits = self(inputs, labels, drop, generator)  # (B, P, L, V)
        logits = logits.to(_logit_dtype(logits))
        codes = codes.long().to(logits.device)
        ce = F.cross_entropy(logits.permute(0, 3, 1, 2), codes, reduction="none")  # (B, P, L)
        per_branch = ce.mean(dim=(0, 2))
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == codes).float().mean()
        return {"loss": per_branch.mean(), "ce_per_branch": per_branch.detach(), "accuracy": accuracy}

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels: Tensor, quantizer: nn.Module, *, cfg: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Codes (B, P, L) for class ``labels``, one scale per step with a KV cache.

        ``quantizer`` is the tokenizer's :class:`ProductQuantizer` (``tokenizer.quantizer``): it turns each
        scale's sampled codes into the next scale's input exactly as in teacher forcing. ``cfg`` = 0 runs the
        conditional model only; the paper samples with cfg 3.25, top_k 750, top_p 0.95. ``return_logits``
        also returns the guided logits of every scale (B, P, pn^2, V)."""
        c = self.cfg
        labels = self._check_labels(labels)
        B, device = labels.shape[0], labels.device
        guided = cfg != 0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, c.num_classes)])
        cond = self.condition(labels, drop=torch.zeros_like(labels, dtype=torch.bool))
        c_act = F.silu(cond)
        c_blocks = self._block_condition(c_act)
        caches = [KVCache() for _ in self.blocks]
        dtype = self.word_embed.weight.dtype
        fhat = quantizer.empty_fhat(B, device, dtype)
        h = self._embed_scale(0, None, cond)
        codes, all_logits = [], []
        for s in range(c.num_scales):
            for block, cache in zip(self.blocks, caches):
                h = block(h, c_blocks, None, cache)  # a scale sees its own block and the cached earlier ones
            logits = self._scale_logits(h, c_act)
            logits = logits.to(_logit_dtype(logits))
            if guided:
                t = self._ramp(cfg, s)
                logits = (1 + t) * logits[:B] - t * logits[B:]
            new = sample_top_k_top_p(logits, top_k, top_p, temperature, generator)  # (B, P, pn^2)
            codes.append(new)
            all_logits.append(logits)
            if s + 1 < c.num_scales:
                fhat = quantizer.add_scale(fhat, s, new)
                x = quantizer.scale_input(fhat, s + 1).to(dtype)
                h = self._embed_scale(s + 1, torch.cat([x, x]) if guided else x)
        out = torch.cat(codes, dim=2)
        return (out, all_logits) if return_logits else out

    # ---- cost --------------------------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def num_block_params(self) -> int:
        """Parameters of the transformer blocks alone (18 D^2 per block plus biases; 12 D^2 with shared adaLN)."""
        return sum(p.numel() for p in self.blocks.parameters())

    def flops_per_forward(self, batch: int = 1) -> float:
        """Teacher-forced forward FLOPs (2 x multiply-adds): every matmul incl. attention over the whole
        (block-causal, computed dense) sequence; norms, softmax and activations ignored."""
        c = self.cfg
        N, D, H = c.sequence_length, c.width, int(c.width * c.mlp_ratio)
        macs = N * c.input_channels * D  # input embedding
        per_block = (0 if c.shared_adaln else 6 * D * D) + 4 * N * D * D + 2 * N * N * D + 2 * N * D * H
        macs += c.depth * per_block + (8 if c.shared_adaln else 2) * D * D  # (+ the shared adaLN) + the head's adaLN
        macs += c.codes_per_branch * c.branches * D * c.codebook_size
        return 2.0 * macs * batch


# ---- its kind's sampling (see models.kinds) ----------------------------------------------------------------
def sample_images(model: VAR, tok: nn.Module, req: SampleRequest) -> Tensor:
    """Codes scale by scale (each scale's input built by the tokenizer's own quantizer), decoded by the tokenizer;
    guidance ramps over the scales to ``req.cfg_scale`` at the last one."""
    if req.steps is not None and req.steps != model.config.num_scales:
        raise TextokError(f"a VAR samples one step per scale ({model.config.num_scales}); drop --steps")
    labels = req.labels if req.labels is not None else torch.zeros(req.batch, dtype=torch.long, device=req.device)
    stored = model.config.sampler  # top-k / top-p not given: the VAR's stored sampler's
    options = {"top_k": stored.top_k, "top_p": stored.top_p,
               **{k: v for k, v in req.options.items() if v is not None}}
    with autocast_for(req.device, req.precision):
        codes = model.generate(labels, tok.quantizer, cfg=req.cfg_scale - 1.0, generator=req.generator, **options)
    return tok.decode_codes(codes, req.decoder_text)


def check_tokenizer(model: VAR, tok: nn.Module, record: dict, fix: str) -> None:
    """The VAR's code layout (scales, branches, codebook, channels) is the tokenizer's."""
    model.config.check_compatible(tok.config, fix=fix)


__all__ = ["VARConfig", "VARSamplerConfig", "VAR", "VARBlock", "CachedAttention", "KVCache", "sample_top_k_top_p"]
