"""ImageFolder's bottleneck: multi-scale residual quantization (VAR-style) and a product of such quantizers.

* :class:`MultiScaleResidualQuantizer` — one branch. Its input is a K x K map of ``code_dim`` channels (given
  as K^2 tokens, row-major). For each scale ``pn`` of the schedule (ImageFolder: 1,1,2,3,3,4,5,6,8,11):
  area-downsample the residual to pn x pn, pick per cell the code of highest cosine similarity (features and
  codes l2-normalised for matching; the looked-up vector is the raw code), bicubic-upsample the code map to
  K x K, apply phi(h) = (1 - r) h + r conv3x3(h) (``phi_convs`` convs shared across scales, chosen by the
  scale's relative position as in VAR), add it to f_hat and subtract it from the residual. The VQ loss,
  beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2, is taken on the cumulative f_hat after every scale and
  averaged over scales; the output is f_hat with a straight-through gradient to f.
  ``match="euclidean"`` picks the nearest code by Euclidean distance instead (VAR's released VQVAE, its
  ``using_znorm=False``).
* :class:`ProductQuantizer` — P such branches, split **by token range** (branch p quantizes latent tokens
  p K^2 .. (p+1) K^2 - 1 with its own codebook); the branches' f_hat maps are concatenated on channels, so the
  decoder sees K^2 positions of P * code_dim channels (both branches' codes at a grid cell feed one position).

Quantizer dropout: ``keep`` (B,) gives, per row, how many scales enter f_hat (the rest are still quantized,
so the codes do not change, but left out of f_hat and of that row's VQ loss). :meth:`ProductQuantizer.
sample_dropout` draws it: each row is chosen with probability ``dropout`` and keeps n ~ U{dropout_start..S}
scales; the one n of a row is shared by every branch. (The official code drops the first 10% of the batch;
a per-row draw keeps the expected fraction at small CPU batch sizes.)

Both return :class:`~textok.models.quantizers.VQOutput` like :class:`~textok.models.quantizers.VectorQuantizer`
(``quantized``, ``codes``, ``losses``, ``metrics``), so a tokenizer swaps one for another. Codes are laid out
scale by scale, each scale row-major: (B, L) with L = sum(pn^2) per branch, (B, P, L) for the product.
``metrics["usage_per_scale"]`` is, per scale (and per branch), the fraction of the codebook chosen at least
once in the batch; a scale of pn^2 cells can use at most B pn^2 codes, so the first scales read low by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import OMIT_DEFAULT, Config
from ..errors import ConfigError, TextokError
from .quantizers import VQOutput, _data_parallel

PAPER_SCALES: tuple[int, ...] = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
VAR_SCALES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's VQVAE at 256 px (one branch)
VAR_SCALES_512: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # ... and at 512 px (VAR-d36-s)
MATCHES = ("cosine", "euclidean")


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which shared phi conv scale ``si`` uses: the tick nearest its relative position si / (S - 1).

    VAR's ticks: linspace(1/(3n), 1 - 1/(3n), n) for n = 4 convs, linspace(1/(2n), 1 - 1/(2n), n) otherwise.
    Exact ties (2/9 for the paper's schedule) fall as float64 rounding makes them fall in numpy's linspace,
    which is computed the same way here, so the paper's 10 scales use convs 0,0,1,1,1,2,2,3,3,3 as in its code."""
    at = si / (num_scales - 1) if num_scales > 1 else 1.0
    start = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    stop = 1 - start
    step = (stop - start) / (num_phi - 1) if num_phi > 1 else 0.0
    ticks = [i * step + start for i in range(num_phi)]
    if num_phi > 1:
        ticks[-1] = stop
    dist = [abs(t - at) for t in ticks]
    return dist.index(min(dist))


@dataclasses.dataclass
class MultiScaleQuantizerConfig(Config):
    """Scale schedule, branches and codebooks of ImageFolder's product of multi-scale residual quantizers."""

    scales: tuple[int, ...] = PAPER_SCALES  # side pn of each scale's code map; the last is the grid K
    branches: int = 2  # P, product-quantization branches (one codebook each)
    num_codes: int = 4096  # codebook size per branch
    code_dim: int = 32  # channels per branch
    beta: float = 0.25  # commitment weight
    phi_convs: int = 4  # shared phi convs (0 = phi is the identity); fewer are built if some tick has no scale
    phi_ratio: float = 0.5  # r in phi(h) = (1 - r) h + r conv(h)
    dropout: float = 0.1  # fraction of rows (in expectation) that keep only a prefix of the scales
    dropout_start: int = 3  # a dropped row keeps n ~ U{dropout_start..S} scales
    # "cosine": the code of highest cosine similarity (ImageFolder); "euclidean": the nearest code (VAR's VQVAE)
    match: str = field(default="cosine", metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        s = self.scales
        if not s or any(pn < 1 for pn in s) or any(b < a for a, b in zip(s, s[1:])):
            raise ConfigError(f"quantizer.scales={list(s)} must be a non-empty, non-decreasing list of sides >= 1")
        if self.branches < 1 or self.num_codes < 2 or self.code_dim < 1:
            raise ConfigError(f"quantizer needs branches >= 1, num_codes >= 2, code_dim >= 1; got {self.branches}, "
                              f"{self.num_codes}, {self.code_dim}")
        if not 0.0 <= self.phi_ratio <= 1.0 or self.phi_convs < 0:
            raise ConfigError(f"quantizer.phi_ratio must lie in [0, 1] and phi_convs >= 0, got {self.phi_ratio}, "
                              f"{self.phi_convs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"quantizer.dropout must lie in [0, 1), got {self.dropout}")
        if self.match not in MATCHES:
            raise ConfigError(f"quantizer.match={self.match!r} must be one of {', '.join(MATCHES)}")
        if not 1 <= self.dropout_start <= len(s):
            raise ConfigError(f"quantizer.dropout_start={self.dropout_start} must lie in [1, {len(s)}] (the scales)")

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def codes_per_branch(self) -> int:
        """Code ids one branch emits per image: sum(pn^2) (286 for the paper's schedule)."""
        return sum(pn * pn for pn in self.scales)

    @property
    def codes_per_image(self) -> int:
        """Code ids per image over all branches: P * sum(pn^2) (572 in the paper)."""
        return self.branches * self.codes_per_branch


class Phi(nn.Module):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual refinement VAR applies to each upsampled code map."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return (1.0 - self.ratio) * h + self.ratio * self.conv(h)


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (exactness tests); everything else is quantized in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Quantize in full precision under a caller's autocast (meta tensors have no autocast to leave)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def _masked_mse(a: Tensor, b: Tensor, rows: Tensor) -> Tensor:
    """Mean squared error over the rows where ``rows`` (B,) is 1 (0 when none is)."""
    per_row = (a - b).square().flatten(1).mean(1)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


class MultiScaleResidualQuantizer(nn.Module):
    """One branch: (B, K^2, C) tokens -> :class:`VQOutput` with codes (B, sum(pn^2))."""

    def __init__(self, scales: tuple[int, ...] = PAPER_SCALES, num_codes: int = 4096, code_dim: int = 32,
                 beta: float = 0.25, phi_convs: int = 4, phi_ratio: float = 0.5, match: str = "cosine") -> None:
        super().__init__()
        if match not in MATCHES:
            raise ConfigError(f"match={match!r} must be one of {', '.join(MATCHES)}")
        self.match = match
        self.scales = tuple(scales)
        self.grid = self.scales[-1]
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.embedding = nn.Embedding(num_codes, code_dim)
        # phi_convs ticks; a tick no scale is nearest to gets no conv (short schedules), so every parameter is used
        ticks = [phi_index(i, len(self.scales), phi_convs) for i in range(len(self.scales))] if phi_convs else []
        used = sorted(set(ticks)) if phi_ratio > 0 else []
        self.phis = nn.ModuleList(Phi(code_dim, phi_ratio) for _ in used)
        self._phi_of_scale = [used.index(t) for t in ticks] if used else [-1] * len(self.scales)
        offsets = [0]
        for pn in self.scales:
            offsets.append(offsets[-1] + pn * pn)
        self.offsets = offsets  # codes of scale si: [offsets[si], offsets[si + 1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Codebook: U(-1/V, 1/V) then l2-normalised rows (VAR/ImageFolder); phi convs: PyTorch's conv default."""
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / self.num_codes, 1.0 / self.num_codes)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        for phi in self.phis:
            phi.conv.reset_parameters()

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def codes_per_image(self) -> int:
        return self.offsets[-1]

    # ---- building blocks (shared by forward, rebuild, teacher forcing and sampling) --------------------
    def _to_map(self, z: Tensor) -> Tensor:
        B, N, C = z.shape
        return z.transpose(1, 2).reshape(B, C, self.grid, self.grid)

    @staticmethod
    def _to_tokens(f: Tensor) -> Tensor:
        return f.flatten(2).transpose(1, 2)

    def _down(self, f: Tensor, pn: int) -> Tensor:
        return f if pn == self.grid else F.interpolate(f, size=(pn, pn), mode="area")

    def embed_scale(self, si: int, codes: Tensor) -> Tensor:
        """Codes of scale ``si`` (B, pn^2) -> phi(bicubic_up(raw codes)) (B, C, K, K): what the scale adds to f_hat."""
        pn = self.scales[si]
        w = self.embedding.weight
        h = F.embedding(codes, w).transpose(1, 2).reshape(codes.shape[0], self.code_dim, pn, pn)
        if pn != self.grid:
            h = F.interpolate(h, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        k = self._phi_of_scale[si]
        return self.phis[k](h) if k >= 0 else h

    def _matching_codebook(self, dtype: torch.dtype) -> Tensor:
        """The codebook as :meth:`_match` compares with it: l2-normalised rows for cosine matching."""
        w = self.embedding.weight.detach().to(dtype)
        return F.normalize(w, dim=-1) if self.match == "cosine" else w

    def _match(self, r: Tensor, codebook: Tensor) -> Tensor:
        """Residual map (B, C, pn, pn) -> codes (B, pn^2): highest cosine similarity, or (euclidean) smallest
        |r|^2 + |e|^2 - 2 r.e, summed in VAR's order so that near ties fall as in its code."""
        tokens = self._to_tokens(r)
        if self.match == "cosine":
            return (F.normalize(tokens, dim=-1) @ codebook.t()).argmax(-1)
        flat = tokens.reshape(-1, tokens.shape[-1])
        dist = flat.square().sum(1, keepdim=True) + codebook.square().sum(1)
        dist = dist.addmm(flat, codebook.t(), alpha=-2, beta=1)
        return dist.argmin(1).view(tokens.shape[:2])

    def _check(self, z: Tensor) -> None:
        K2 = self.grid * self.grid
        if z.dim() != 3 or z.shape[1] != K2 or z.shape[2] != self.code_dim:
            raise TextokError(f"multi-scale quantizer expects (batch, {K2}, {self.code_dim}) latents (a "
                              f"{self.grid}x{self.grid} grid), got shape {tuple(z.shape)}")

    def check_codes(self, codes: Tensor) -> int:
        """Validate (B, L') codes that hold a prefix of the scales; returns how many scales they cover."""
        if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TextokError(f"codes must be an integer tensor of shape (batch, length), got {codes.dtype} "
                              f"{tuple(codes.shape)}")
        if codes.shape[1] not in self.offsets[1:]:
            raise TextokError(f"{codes.shape[1]} codes per row is not a prefix of the scales {list(self.scales)}; "
                              f"a prefix of n scales has one of {self.offsets[1:]} codes")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise TextokError(f"code ids must lie in [0, {self.num_codes}), got [{int(codes.min())}, "
                              f"{int(codes.max())}]; were they made with another quantizer?")
        return self.offsets.index(codes.shape[1])

    # ---- training / encoding --------------------------------------------------------------------------
    def forward(self, z: Tensor, keep: Tensor | None = None) -> VQOutput:
        """(B, K^2, C) -> VQOutput; ``keep`` (B,) = scales entering each row's f_hat (default: all)."""
        self._check(z)
        in_dtype, wd = z.dtype, _work_dtype(z)
        S, B = self.num_scales, z.shape[0]
        with _no_autocast(z.device):
            f = self._to_map(z.to(wd))
            f_ng = f.detach()
            rest, fhat = f_ng, torch.zeros_like(f_ng)
            book = self._matching_codebook(wd)
            keep_t = torch.full((B,), S, device=z.device) if keep is None else keep.to(z.device)
            commitment = codebook_loss = f.new_zeros(())
            codes, counts = [], []
            for si, pn in enumerate(self.scales):
                idx = self._match(self._down(rest, pn), book)
                h = self.embed_scale(si, idx).to(wd)
                rest = rest - h.detach()
                rows = (si < keep_t).to(wd)
                fhat = fhat + h * rows[:, None, None, None]
                commitment = commitment + _masked_mse(fhat.detach(), f, rows)
                codebook_loss = codebook_loss + _masked_mse(fhat, f_ng, rows)
                codes.append(idx)
                flat = idx.flatten()  # a scatter, not bincount: runs on meta tensors and under torch.compile
                counts.append(torch.zeros(self.num_codes, dtype=torch.long, device=z.device).index_add_(
                    0, flat, torch.ones_like(flat)))
            commitment, codebook_loss = self.beta * commitment / S, codebook_loss / S
            quantized = f + (fhat - f).detach()  # straight-through: value f_hat, gradient identity to f
            counts_t = torch.stack(counts)  # (S, V)
            if self.training and _data_parallel():
                dist.all_reduce(counts_t)  # usage of the global batch, as VectorQuantizer reports it
            total = counts_t.sum(0).float()
            probs = total / total.sum().clamp_min(1.0)
            metrics = {"usage": (total > 0).float().mean(),
                       "usage_per_scale": (counts_t > 0).float().mean(1),
                       "perplexity": (-(probs * probs.clamp_min(1e-10).log()).sum()).exp()}
        losses = {"commitment": commitment, "codebook": codebook_loss, "loss": commitment + codebook_loss}
        return VQOutput(self._to_tokens(quantized).to(in_dtype), torch.cat(codes, 1), losses, metrics)

    @torch.no_grad()
    def quantize_codes(self, z: Tensor) -> Tensor:
        """Codes only (B, sum(pn^2)) for (B, K^2, C) latents; no losses."""
        return self(z).codes

    # ---- rebuilding from codes ------------------------------------------------------------------------
    def empty_fhat(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(batch, self.code_dim, self.grid, self.grid, device=device, dtype=dtype)

    def add_scale(self, fhat: Tensor, si: int, codes: Tensor) -> Tensor:
        """f_hat (B, C, K, K) plus scale ``si``'s contribution from its codes (B, pn^2)."""
        return fhat + self.embed_scale(si, codes).to(fhat.dtype)

    def scale_input(self, fhat: Tensor, si: int) -> Tensor:
        """The cumulative f_hat area-downsampled to scale ``si``'s side: (B, pn^2, C), a generator's input."""
        return self._to_tokens(self._down(fhat, self.scales[si]))

    def split_scales(self, codes: Tensor) -> list[Tensor]:
        """(B, L') codes -> one (B, pn, pn) map per scale they cover."""
        n = self.check_codes(codes)
        return [codes[:, self.offsets[i]:self.offsets[i + 1]].reshape(-1, pn, pn)
                for i, pn in enumerate(self.scales[:n])]

    def fhat_from_codes(self, codes: Tensor, num_scales: int | None = None) -> Tensor:
        """f_hat (B, C, K, K) of the first ``num_scales`` scales (default: all that ``codes`` holds)."""
        available = self.check_codes(codes)
        n = available if num_scales is None else num_scales
        if not 1 <= n <= available:
            raise TextokError(f"num_scales={num_scales} must lie in [1, {available}] for these codes")
        w = self.embedding.weight
        fhat = self.empty_fhat(codes.shape[0], w.device, w.dtype)
        for si in range(n):
            fhat = self.add_scale(fhat, si, codes[:, self.offsets[si]:self.offsets[si + 1]].to(w.device))
        return fhat

    def decode_codes(self, codes: Tensor, num_scales: int | None = None) -> Tensor:
        """Codes of any prefix of the scales -> f_hat tokens (B, K^2, C): exactly what forward() returns for them."""
        return self._to_tokens(self.fhat_from_codes(codes, num_scales))

    def teacher_forcing_inputs(self, codes: Tensor) -> Tensor:
        """Full codes (B, L) -> (B, L - pn_0^2, C): for scales 1..S-1, the cumulative f_hat of the scales before,
        area-downsampled to the scale's side (VAR's teacher-forcing input)."""
        if self.check_codes(codes) != self.num_scales:
            raise TextokError(f"teacher forcing needs the codes of all {self.num_scales} scales")
        w = self.embedding.weight
        fhat = self.empty_fhat(codes.shape[0], w.device, w.dtype)
        out = []
        for si in range(self.num_scales - 1):
            fhat = self.add_scale(fhat, si, codes[:, self.offsets[si]:self.offsets[si + 1]])
            out.append(self.scale_input(fhat, si + 1))
        return torch.cat(out, 1) if out else fhat.new_zeros(codes.shape[0], 0, self.code_dim)

    def extra_repr(self) -> str:
        return (f"scales={list(self.scales)}, num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
                f"match={self.match}")


class ProductQuantizer(nn.Module):
    """P multi-scale branches split by token range: (B, P K^2, C) -> quantized (B, K^2, P C), codes (B, P, L)."""

    def __init__(self, cfg: MultiScaleQuantizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.branches = nn.ModuleList(
            MultiScaleResidualQuantizer(cfg.scales, cfg.num_codes, cfg.code_dim, cfg.beta, cfg.phi_convs, cfg.phi_ratio,
                                        cfg.match)
            for _ in range(cfg.branches))
        self.grid, self.scales, self.code_dim = cfg.grid, cfg.scales, cfg.code_dim
        self.offsets = self.branches[0].offsets

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    def sample_dropout(self, batch: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> Tensor:
        """Scales kept per row (B,) int64: S for most rows; n ~ U{dropout_start..S} for rows chosen with
        probability ``dropout``. One n per row, used by every branch."""
        S, c = self.num_scales, self.cfg
        chosen = torch.rand(batch, generator=generator, device=device) < c.dropout
        n = torch.randint(c.dropout_start, S + 1, (batch,), generator=generator, device=device)
        return torch.where(chosen, n, torch.full_like(n, S))

    def _split(self, z: Tensor) -> list[Tensor]:
        P, K2, C = self.num_branches, self.grid * self.grid, self.code_dim
        if z.dim() != 3 or z.shape[1] != P * K2 or z.shape[2] != C:
            raise TextokError(f"product quantizer expects (batch, {P * K2}, {C}) latents ({P} branches of a "
                              f"{self.grid}x{self.grid} grid), got shape {tuple(z.shape)}")
        return list(z.split(K2, dim=1))

    def forward(self, z: Tensor, keep: Tensor | None = None) -> VQOutput:
        outs = [q(zp, keep) for q, zp in zip(self.branches, self._split(z))]
        P = len(outs)
        losses = {k: sum(o.losses[k] for o in outs) / P for k in outs[0].losses}
        metrics = {"usage": sum(o.metrics["usage"] for o in outs) / P,
                   "perplexity": sum(o.metrics["perplexity"] for o in outs) / P,
                   "usage_per_scale": torch.stack([o.metrics["usage_per_scale"] for o in outs])}  # (P, S)
        return VQOutput(torch.cat([o.quantized for o in outs], -1), torch.stack([o.codes for o in outs], 1),
                        losses, metrics)

    @torch.no_grad()
    def quantize_codes(self, z: Tensor) -> Tensor:
        return torch.stack([q.quantize_codes(zp) for q, zp in zip(self.branches, self._split(z))], 1)

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dim() != 3 or codes.shape[1] != self.num_branches:
            raise TextokError(f"codes must have shape (batch, {self.num_branches}, length) for this "
                              f"{self.num_branches}-branch quantizer, got {tuple(codes.shape)}")

    def split_scales(self, codes: Tensor) -> list[Tensor]:
        """(B, P, L') -> one (B, P, pn, pn) map per scale the codes cover."""
        self._check_codes(codes)
        per_branch = [q.split_scales(codes[:, p]) for p, q in enumerate(self.branches)]
        return [torch.stack(maps, 1) for maps in zip(*per_branch)]

    def decode_codes(self, codes: Tensor, num_scales: int | None = None) -> Tensor:
        """(B, P, L') codes of a prefix of the scales -> f_hat tokens (B, K^2, P C)."""
        self._check_codes(codes)
        return torch.cat([q.decode_codes(codes[:, p], num_scales) for p, q in enumerate(self.branches)], -1)

    def teacher_forcing_inputs(self, codes: Tensor) -> Tensor:
        """(B, P, L) -> (B, L - pn_0^2, P C): every branch's teacher-forcing input, concatenated on channels."""
        self._check_codes(codes)
        return torch.cat([q.teacher_forcing_inputs(codes[:, p]) for p, q in enumerate(self.branches)], -1)

    # ---- step by step (a generator's sampling loop) ----------------------------------------------------
    def empty_fhat(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, P C, K, K) zeros: all branches' f_hat maps stacked on channels."""
        return torch.zeros(batch, self.num_branches * self.code_dim, self.grid, self.grid, device=device, dtype=dtype)

    def add_scale(self, fhat: Tensor, si: int, codes: Tensor) -> Tensor:
        """(B, P C, K, K) f_hat plus scale ``si`` of every branch, from codes (B, P, pn^2)."""
        parts = fhat.split(self.code_dim, dim=1)
        return torch.cat([q.add_scale(parts[p], si, codes[:, p]) for p, q in enumerate(self.branches)], 1)

    def scale_input(self, fhat: Tensor, si: int) -> Tensor:
        """(B, P C, K, K) -> (B, pn_si^2, P C): the next scale's input (area-downsampling is per channel)."""
        return self.branches[0].scale_input(fhat, si)


class MultiScaleCodes:
    """What a tokenizer over a :class:`ProductQuantizer` answers generators with (ImageFolder, VAR's VQVAE): its
    code layout and the images -> codes -> f_hat -> images conversions, all through ``self.quantizer``. The
    tokenizer (an ``nn.Module``) supplies ``encode_latents(images, text)`` (unquantized latents) and
    ``decode(f_hat, text)``."""

    is_discrete = True
    code_form = "scales"

    def code_layout(self) -> dict:
        """How the codes are laid out (what a VAR must model): scales, branches, codebook size, code channels."""
        q = self.config.quantizer
        return {"scales": [int(s) for s in q.scales], "branches": int(q.branches), "codebook_size": int(q.num_codes),
                "code_dim": int(q.code_dim)}

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.quantizer.scales

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.num_codes

    def encode(self, images: Tensor, text=None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> f_hat of all scales (B, K^2, P C)."""
        return self.quantizer(self.encode_latents(images, text)).quantized

    @torch.no_grad()
    def encode_codes(self, images: Tensor, text=None) -> Tensor:
        """images -> codes (B, P, sum(pn^2)) int64 in [0, codebook_size)."""
        return self.quantizer.quantize_codes(self.encode_latents(images, text))

    def codes_per_scale(self, codes: Tensor) -> list[Tensor]:
        """(B, P, L') codes -> [(B, P, pn, pn) for each scale they cover]."""
        return self.quantizer.split_scales(codes)

    def fhat_from_codes(self, codes: Tensor, num_scales: int | None = None) -> Tensor:
        """Codes of the first n scales (or all codes and ``num_scales=n``) -> f_hat (B, K^2, P C)."""
        return self.quantizer.decode_codes(codes.to(next(self.parameters()).device), num_scales)

    def decode_codes(self, codes: Tensor, text=None, num_scales: int | None = None) -> Tensor:
        """Codes of any prefix of the scales -> images (B, 3, H, W)."""
        return self.decode(self.fhat_from_codes(codes, num_scales), text)

    def teacher_forcing_inputs(self, codes: Tensor) -> Tensor:
        return self.quantizer.teacher_forcing_inputs(codes)


__all__ = ["MultiScaleCodes", "MultiScaleQuantizerConfig", "MultiScaleResidualQuantizer", "ProductQuantizer", "Phi",
           "phi_index", "PAPER_SCALES", "VAR_SCALES", "VAR_SCALES_512"]
