"""The generators' side of the training loop (:mod:`textok.train.loop`): a generator trained on a latents
directory written by :func:`textok.generate.latents.extract_latents`, never on pixels.

One task per kind of generator: :class:`DiTTask` (a DiT over continuous tokens, trained by DiT's diffusion or
by rectified flow), :class:`MaskGITTask` (MaskGIT over the codes of a VQ tokenizer) and :class:`VARTask` (VAR's
next-scale prediction over an ImageFolder's multi-scale codes). A kind says what model
config fits the latents, what its loss is and what one step feeds it; everything else is shared here.

Exact resume: batches come in an order that is a pure function of the step (:func:`batch_indices`), captions
are picked per (seed, step, image), and every random draw of a step (diffusion timesteps and noise, the CFG
drop of the condition, MaskGIT's masks, VAR's label drop) comes from a generator seeded by (seed, step, rank).

``fsdp=true`` (under torchrun) shards every kind's transformer blocks, its EMA and its optimizer state as the
tokenizer loop does, through the same calls (:mod:`textok.train.fsdp`): checkpoints and ``final/`` are gathered
whole and load into a single-process model.

``final/`` holds the EMA generator (``save_pretrained``; ``config.json`` also records the diffusion config and
the latents' meta: normalisation statistics, the tokenizer directory, the text encoder) and a copy of the
caption bank.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import Config
from ..devices import autocast_for
from ..diffusion import DiffusionConfig, create_diffusion
from ..distributed import DistInfo
from ..errors import ConfigError, TextokError
from ..generate.latents import BANK, LatentDataset, read_meta
from ..models.dit import DiTConfig
from ..io import sha256_file
from ..models.maskgit import MaskGITConfig
from ..models.registry import GENERATORS, generator_kind, load_tokenizer
from ..models.var import VARConfig
from .config import GeneratorTrainConfig
from .data_source import batch_indices, pick_captions
from .loop import StepResult, Task, run_text_states, train

C = TypeVar("C", bound=Config)

LOGGED = ("loss", "mse", "vb", "accuracy")  # the loss terms that go to the log


def train_generator(cfg: GeneratorTrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a generator into ``out``; returns ``out/final`` (EMA weights, from_pretrained-ready)."""
    if not cfg.latents:
        raise ConfigError("no latents: pass --latents DIR (written by `textok extract-latents`)")
    return train(generator_kind(cfg.kind).task_class(), cfg, out, progress)


class GeneratorTask(Task):
    """What every generator shares: the latents (and their captions' states), the model with its EMA and
    AdamW, the step's random generator, the checkpoint and the final record."""

    kind = "generator"
    rate_key = "samples_per_s"
    shown = ("loss", "mse", "accuracy")
    loss_name = "the generator loss"
    diffusion_config: DiffusionConfig | None = None
    logged: tuple[str, ...] = ()  # a kind's own log entries besides LOGGED

    def __init__(self, cfg: GeneratorTrainConfig, out: Path, info: DistInfo, progress: bool) -> None:
        super().__init__(cfg, out, info, progress)
        self.meta = read_meta(cfg.latents)
        self.data = LatentDataset(cfg.latents, normalize=True)
        self.text = self._text_states() if cfg.text else None
        self.model_type = cfg.kind
        self.model_config = self.configure(self.text.dim if self.text is not None else 0)

    def _text_states(self):
        """Caption embeddings of the tokenizer's text encoder, computed once for every caption of the latents."""
        encoder = self.meta.get("text_encoder") or ""
        if not encoder:
            raise TextokError(f"text=true but the tokenizer of {self.cfg.latents} names no text encoder")
        captions = {c for caps in self.data.captions for c in caps}
        return run_text_states(self.cfg, self.out, self.info, encoder, self.meta.get("text_max_length", 64),
                               captions, progress=self.progress)

    # ---- what a kind of generator says -------------------------------------------------------------
    def configure(self, text_dim: int) -> Config:
        """The model config for these latents: token count, channels, classes and codebook come from the
        latents' meta and override the preset."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, *inputs: Any) -> dict[str, torch.Tensor]:
        """The training loss terms (``"loss"`` is minimised) of ``model`` on one step's inputs."""
        raise NotImplementedError

    def inputs(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple:
        """What :meth:`loss` gets for one batch, on the device."""
        raise NotImplementedError

    # ---- the parts ---------------------------------------------------------------------------------------
    def make_model(self) -> torch.nn.Module:
        return GENERATORS[self.model_type](self.model_config)

    def begin(self, step: int) -> None:
        cfg, info = self.cfg, self.info
        self.order = batch_indices(len(self.data), cfg.batch_size * info.world, info.rank, cfg.batch_size, cfg.seed,
                                   step)

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, step: int, lr: float) -> StepResult:
        batch = self.data.batch(next(self.order))
        generator = step_generator(self.cfg.seed, step, self.info.rank, self.info.device)
        with autocast_for(self.info.device, self.cfg.precision):
            terms = self.train_model(*self.inputs(batch, step, generator))
            loss = terms["loss"]
        finite = torch.isfinite(loss.detach())
        loss.backward()
        logs = {k: v.detach().float() for k, v in terms.items() if k in LOGGED or k in self.logged}
        return StepResult(logs, finite, batch["label"].shape[0])

    def save_final(self, model: torch.nn.Module, final: Path, step: int) -> None:
        cfg = self.cfg
        # the tokenizer and the latents as paths relative to final/, so that a run directory can move with them
        where = {"latents_dir": Path(cfg.latents), "tokenizer_dir": Path(self.meta["tokenizer_dir"])}
        record = {"train_step": step, "kind": self.model_type, "text": cfg.text,
                  "diffusion": self.diffusion_config.to_dict() if self.diffusion_config is not None else None,
                  "latents_meta": {**self.meta, **{k: os.path.relpath(p.resolve(), final.resolve())
                                                   for k, p in where.items()}}}
        model.save_pretrained(final, extra=record)
        if (Path(cfg.latents) / BANK).is_file():
            shutil.copyfile(Path(cfg.latents) / BANK, final / BANK)


def set_by_training(asked: C, decided: dict[str, Any], cfg: GeneratorTrainConfig) -> C:
    """``asked`` with the fields training decides (from the latents, the diffusion and the text settings); a
    ``model.KEY`` override of one of them to another value is refused, since it would be replaced silently."""
    result = asked.override(decided)
    given = set(cfg.model_overrides)
    for key in sorted(given & set(decided)):
        if getattr(asked, key) != getattr(result, key):
            raise TextokError(f"model.{key}={getattr(asked, key)!r} cannot apply: training sets {key} to "
                              f"{getattr(result, key)!r} from the latents {cfg.latents} and the run's settings; "
                              f"drop model.{key}")
    return result


class DiTTask(GeneratorTask):
    """A DiT over continuous tokens, class-conditional or text-to-image, trained by ``cfg.diffusion``."""

    def configure(self, text_dim: int) -> DiTConfig:
        cfg, meta = self.cfg, self.meta
        self.diffusion_config = DiffusionConfig.resolve(cfg.diffusion)
        learn_sigma = self.diffusion_config.objective == "ddpm" and self.diffusion_config.learn_sigma
        return set_by_training(DiTConfig.resolve(cfg.model_name).override(cfg.model_overrides),
                               {"num_tokens": meta["num_tokens"], "in_channels": meta["channels"],
                                "learn_sigma": learn_sigma, "num_classes": 0 if cfg.text else meta["num_classes"],
                                "text_dim": text_dim if cfg.text else 0}, cfg)

    def build(self, fresh: bool) -> None:
        self.diffusion = create_diffusion(self.diffusion_config)

    def begin(self, step: int) -> None:
        super().begin(step)
        mc = self.model_config
        self.drop_p = mc.class_dropout if mc.num_classes > 0 else mc.text_dropout  # the CFG drop of the condition

    def loss(self, model, x0, model_kwargs, generator) -> dict[str, torch.Tensor]:
        return self.diffusion.training_loss(model, x0, model_kwargs, generator=generator)

    def inputs(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple:
        device = self.info.device
        x0 = batch["latents"].to(device, non_blocking=True)
        kwargs: dict[str, Any] = {}
        if self.model_config.num_classes > 0:
            kwargs["y"] = batch["label"].to(device).clamp_min(0)
        if self.text is not None:
            captions = pick_captions(batch["captions"], batch["index"].tolist(), self.cfg.seed, step)
            emb = self.text.encode(captions).to(device)
            kwargs.update(text=emb.states, text_mask=emb.mask)
        # the CFG drop of the condition, drawn here so that it comes from the step's generator
        kwargs["drop"] = torch.rand(x0.shape[0], generator=generator, device=generator.device).to(device) < self.drop_p
        return x0, kwargs, generator


class MaskGITTask(GeneratorTask):
    """MaskGIT over the discrete codes of a VQ tokenizer, class-conditional."""

    def configure(self, text_dim: int) -> MaskGITConfig:
        cfg, meta = self.cfg, self.meta
        if not meta.get("discrete"):
            raise TextokError(
                f"MaskGIT needs discrete codes, but {cfg.latents} holds continuous tokens of a "
                f"{meta.get('tokenizer_type')!r} tokenizer; extract latents with a TiTok tokenizer "
                "(quantizer.kind=vq), or train a DiT (--kind dit)")
        if len(meta.get("code_shape") or [meta["num_tokens"]]) != 1:
            raise TextokError(f"MaskGIT models one flat sequence of codes per image, but {cfg.latents} holds codes of "
                              f"shape {tuple(meta['code_shape'])} from a {meta.get('tokenizer_type')!r} tokenizer; "
                              "train a VAR on them (--kind var)")
        return set_by_training(MaskGITConfig.resolve(cfg.model_name).override(cfg.model_overrides),
                               {"num_tokens": meta["num_tokens"], "codebook_size": meta["codebook_size"],
                                "num_classes": max(1, meta["num_classes"])}, cfg)

    def loss(self, model, codes, labels, generator) -> dict[str, torch.Tensor]:
        return model.training_loss(codes, labels, generator=generator)

    def inputs(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple:
        device = self.info.device
        return batch["codes"].to(device), batch["label"].to(device).clamp_min(0), generator


LAYOUT_KEYS = ("scales", "branches", "codebook_size", "code_dim")  # what a VAR takes from its tokenizer


class VARTask(GeneratorTask):
    """VAR over an ImageFolder's codes (B, P, L), class-conditional with the null class dropped in for CFG.

    Teacher-forcing inputs (the area-downsampled cumulative f_hat before each scale) are computed per batch from
    the codes by the frozen tokenizer's quantizer, not stored at extraction: they are P C floats per position
    (64 channels x 285 positions = 73 KB per image in the paper's setting, 64 times the int16 codes), while
    rebuilding them costs a few small convolutions per batch (under 1% of a step here)."""

    def configure(self, text_dim: int) -> VARConfig:
        cfg, meta = self.cfg, self.meta
        layout = meta.get("code_layout")
        if not meta.get("discrete") or not layout:
            what = "flat codes" if meta.get("discrete") else "continuous tokens"
            raise TextokError(f"VAR needs the multi-scale codes of an ImageFolder tokenizer, but {cfg.latents} holds "
                              f"{what} of a {meta.get('tokenizer_type')!r} tokenizer; extract latents with an "
                              f"ImageFolder, or train a {'MaskGIT (--kind maskgit)' if meta.get('discrete') else 'DiT (--kind dit)'}")
        asked = VARConfig.resolve(cfg.model_name).override(cfg.model_overrides)
        theirs = _Layout(tuple(layout["scales"]), layout["branches"], layout["codebook_size"], layout["code_dim"])
        given = [k for k in cfg.model_overrides if k in LAYOUT_KEYS]
        if given or cfg.model_name not in VARConfig.presets():  # the user chose a layout: it must be the tokenizer's
            where = f"model {', '.join(given)}" if given else f"--config {cfg.model_name}"
            asked.check_compatible(theirs, fix=f"the tokenizer is {meta['tokenizer_dir']}; drop {where} "
                                               "(a VAR takes its layout from the latents' tokenizer)")
        self.logged = tuple(f"metric/ce_b{p}" for p in range(theirs.branches))
        return asked.override({"scales": list(theirs.scales), "branches": theirs.branches,
                               "codebook_size": theirs.num_codes, "code_dim": theirs.code_dim,
                               "num_classes": max(1, meta["num_classes"])})

    def build(self, fresh: bool) -> None:
        self.quantizer = frozen_quantizer(self.meta, self.cfg.latents).to(self.info.device)

    def begin(self, step: int) -> None:
        super().begin(step)
        self.drop_p = self.model_config.class_dropout

    def loss(self, model, codes, inputs, labels, drop, generator) -> dict[str, torch.Tensor]:
        terms = model.training_loss(codes, inputs, labels, drop=drop, generator=generator)
        ce = terms.pop("ce_per_branch")
        return {**terms, **{f"metric/ce_b{p}": ce[p] for p in range(ce.shape[0])}}

    def inputs(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple:
        device = self.info.device
        codes = batch["codes"].to(device)
        with torch.no_grad():
            inputs = self.quantizer.teacher_forcing_inputs(codes)
        labels = batch["label"].to(device).clamp_min(0)
        drop = torch.rand(codes.shape[0], generator=generator, device=generator.device).to(device) < self.drop_p
        return codes, inputs, labels, drop, generator


class _Layout:
    """A tokenizer's code layout, as :meth:`VARConfig.check_compatible` reads a quantizer config."""

    def __init__(self, scales: tuple[int, ...], branches: int, num_codes: int, code_dim: int) -> None:
        self.scales, self.branches, self.num_codes, self.code_dim = scales, branches, num_codes, code_dim


def frozen_quantizer(meta: dict[str, Any], latents: str | Path) -> torch.nn.Module:
    """The quantizer of the tokenizer that wrote ``latents``, frozen; refused when the tokenizer's weights changed
    since the extraction (its codes would then mean other vectors)."""
    tok_dir = Path(meta["tokenizer_dir"])
    if not (tok_dir / "config.json").is_file():
        raise TextokError(f"the tokenizer {tok_dir} that wrote {latents} is gone; a VAR's inputs are rebuilt from "
                          "its quantizer: restore it, or extract the latents again")
    want = meta.get("tokenizer_sha256")
    if want and sha256_file(tok_dir / "model.safetensors") != want:
        raise TextokError(f"the tokenizer {tok_dir} changed since {latents} was extracted from it; extract the "
                          "latents again")
    quantizer = load_tokenizer(tok_dir).quantizer.eval()
    quantizer.requires_grad_(False)
    return quantizer


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw of one step on one rank: a pure function of (seed, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 4099 + rank) % (2**63 - 1))
    return g


__all__ = ["DiTTask", "GeneratorTask", "MaskGITTask", "VARTask", "frozen_quantizer", "step_generator",
           "train_generator"]
