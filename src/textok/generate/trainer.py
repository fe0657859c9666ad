"""The generator training loop: a DiT (diffusion or flow) over continuous tokens, or MaskGIT over codes.

It mirrors the tokenizer loop (:mod:`textok.train.tokenizer`): set-up, resume from the latest checkpoint,
then per step an AdamW update (warm-up + cosine lr, gradient clipping), an EMA update, logs, checkpoints.
It trains on a latents directory written by :func:`textok.generate.latents.extract_latents`, never on pixels.

Exact resume: data order is a pure function of the step (:func:`batch_indices`), captions are picked per
(seed, step, image), and every random draw of a step (diffusion timesteps and noise, the CFG drop of the
condition, MaskGIT's masks) comes from a generator seeded by (seed, step, rank). Nothing random depends on
the history, so N + N steps equal 2N steps bit for bit on the CPU (the global RNG state is saved too).

``final/`` holds the EMA generator (``save_pretrained``; ``config.json`` also records the diffusion config
and the latents' meta: normalisation statistics, the tokenizer directory, the text encoder) and a copy of
the caption bank.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, read_yaml
from ..devices import autocast_for
from ..diffusion import DiffusionConfig, create_diffusion
from ..errors import ConfigError, TextokError
from ..models.dit import DiTConfig
from ..models.maskgit import MaskGITConfig
from ..models.registry import GENERATORS
from ..train.checkpoint import CheckpointManager
from ..train.common import (GracefulInterrupt, JsonlLog, batch_indices,
                            check_finite, lr_at, open_run, param_groups, pick_captions, progress_bar, rng_state,
                            set_lr, set_rng_state)
from ..train.config import OptimConfig, check_schedule
from ..distributed import DistInfo, barrier, distributed_session, wrap_ddp
from ..train.ema import EMA
from ..train.rundir import run_lock
from ..text.store import open_text_states
from .latents import BANK, LatentDataset, read_meta

KINDS = ("dit", "maskgit")
DEFAULT_MODEL = {"dit": "dit-b", "maskgit": "maskgit-b"}


# ---- configuration ----------------------------------------------------------------------------
def _generator_optim() -> OptimConfig:
    # DiT trains with AdamW at 1e-4, no weight decay, betas (0.9, 0.999); warm-up + cosine added here.
    return OptimConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=500, min_lr_ratio=0.1,
                       grad_clip=1.0)


def maskgit_optim() -> OptimConfig:
    """TiTok's MaskGIT recipe: AdamW 2e-4, betas (0.9, 0.96), weight decay 0.03, 10k warm-up steps, cosine to
    1e-5, gradient clipping at 1. A MaskGIT run starts from these unless its recipe or overrides say otherwise."""
    return OptimConfig(lr=2e-4, betas=(0.9, 0.96), weight_decay=0.03, warmup_steps=10_000, min_lr_ratio=0.05,
                       grad_clip=1.0)


@dataclasses.dataclass
class GeneratorTrainConfig(Config):
    """What generator to train on which latents, and how long."""

    latents: str = ""  # a directory written by `textok extract-latents`
    kind: str = "dit"  # "dit" (continuous tokens) | "maskgit" (discrete codes of a VQ tokenizer)
    model: str = ""  # a DiT or MaskGIT preset or config file ("" = dit-b / maskgit-b)
    model_overrides: tuple[str, ...] = ()
    diffusion: str = "dit"  # DiT only: "dit" (DDPM, learned sigma) | "flow" (rectified flow) | a config file
    text: bool = False  # DiT only: text-to-image on caption embeddings (else class-conditional)
    optim: OptimConfig = field(default_factory=_generator_optim)
    batch_size: int = 256  # per process
    max_steps: int = 100000
    ema_decay: float = 0.9999
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 2
    text_cache: str = ""  # where caption embeddings persist (default: OUT/text_cache.safetensors)
    text_store: str = "auto"  # "auto"/"off" (the one-file text_cache) | "on" (the user-level text-state store) | a store dir
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision {self.precision!r} must be auto, bf16 or fp32")
        check_schedule(self, positive=("batch_size", "max_steps", "log_every", "ckpt_every", "keep_last"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.kind == "maskgit" and self.text:
            raise ConfigError("text=true is for the DiT (text-to-image); MaskGIT here is class-conditional only")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL[self.kind]


def load_generator_config(config: str | None = None, overrides: list[str] = (), kind: str | None = None
                          ) -> GeneratorTrainConfig:
    """``config``: a DiT/MaskGIT preset (the kind follows from it), or a YAML/JSON GeneratorTrainConfig file.

    Overrides ``model.KEY=VALUE`` adjust the generator's model config; everything else the training config.
    """
    cfg = GeneratorTrainConfig()
    if config:
        if config in MaskGITConfig.presets():
            cfg = dataclasses.replace(cfg, kind="maskgit", model=config)
        elif config in DiTConfig.presets():
            cfg = dataclasses.replace(cfg, kind="dit", model=config)
        elif Path(config).is_file() and _looks_like_recipe(Path(config)):
            cfg = GeneratorTrainConfig.from_file(config)
        elif Path(config).is_file():
            cfg = dataclasses.replace(cfg, model=config)
        else:
            import difflib

            names = DiTConfig.presets() + MaskGITConfig.presets()
            close = difflib.get_close_matches(config, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--config {config!r} is neither a generator preset nor a config file; {hint}"
                              f"(presets: {', '.join(names)})")
    if kind is not None:
        if config and kind != cfg.kind and (config in DiTConfig.presets() or config in MaskGITConfig.presets()):
            raise ConfigError(f"--config {config} is a {cfg.kind} preset but --kind is {kind}; drop one of them")
        cfg = dataclasses.replace(cfg, kind=kind)
    if cfg.kind == "maskgit" and cfg.optim == _generator_optim():  # the DiT default was not chosen for it
        cfg = dataclasses.replace(cfg, optim=maskgit_optim())
    model_over = [o.split(".", 1)[1] for o in overrides if o.startswith("model.")]
    cfg = cfg.override([o for o in overrides if not o.startswith("model.")])
    if model_over:
        cfg = dataclasses.replace(cfg, model_overrides=tuple(cfg.model_overrides) + tuple(model_over))
    return cfg


def _looks_like_recipe(path: Path) -> bool:
    data = read_yaml(path) or {}
    return isinstance(data, dict) and any(k in data for k in ("kind", "latents", "optim", "max_steps", "model"))


def build_model_config(cfg: GeneratorTrainConfig, meta: dict[str, Any], text_dim: int = 0
                       ) -> tuple[str, Config, DiffusionConfig | None]:
    """(model_type, model config, diffusion config) for these latents: token count, channels, classes and
    codebook come from the latents' meta and override the preset."""
    if cfg.kind == "maskgit":
        if not meta.get("discrete"):
            raise TextokError(
                f"MaskGIT needs discrete codes, but {cfg.latents} holds continuous tokens of a "
                f"{meta.get('tokenizer_type')!r} tokenizer; extract latents with a TiTok tokenizer "
                "(quantizer.kind=vq), or train a DiT (--kind dit)")
        model_cfg = MaskGITConfig.resolve(cfg.model_name).override(list(cfg.model_overrides)).override(
            {"num_tokens": meta["num_tokens"], "codebook_size": meta["codebook_size"],
             "num_classes": max(1, meta["num_classes"])})
        return "maskgit", model_cfg, None
    diff = DiffusionConfig.resolve(cfg.diffusion)
    learn_sigma = diff.objective == "ddpm" and diff.learn_sigma
    model_cfg = DiTConfig.resolve(cfg.model_name).override(list(cfg.model_overrides)).override(
        {"num_tokens": meta["num_tokens"], "in_channels": meta["channels"], "learn_sigma": learn_sigma,
         "num_classes": 0 if cfg.text else meta["num_classes"], "text_dim": text_dim if cfg.text else 0})
    return "dit", model_cfg, diff


# ---- the loop -----------------------------------------------------------------------------------
def train_generator(cfg: GeneratorTrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a generator into ``out``; returns ``out/final`` (EMA weights, from_pretrained-ready)."""
    if not cfg.latents:
        raise ConfigError("no latents: pass --latents DIR (written by `textok extract-latents`)")
    with distributed_session(cfg.device) as info, run_lock(out, enabled=info.is_main):
        return _train(cfg, Path(out), info, progress)


def _train(cfg: GeneratorTrainConfig, out: Path, info: DistInfo, progress: bool) -> Path:
    device = info.device
    meta = read_meta(cfg.latents)
    data = LatentDataset(cfg.latents, normalize=True)
    text_cache = _text_cache(cfg, meta, data, out, info, progress) if cfg.text else None
    model_type, model_cfg, diff_cfg = build_model_config(cfg, meta, text_cache.dim if text_cache else 0)
    ckpts, latest = open_run(out, cfg.to_dict(), model_type, model_cfg.to_dict(), "generator", cfg.keep_last,
                             info.is_main)

    # ---- model, EMA, optimizer -------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GENERATORS[model_type](model_cfg).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    diffusion = create_diffusion(diff_cfg) if diff_cfg is not None else None
    start_step = 0
    if latest is not None:
        state, ck_meta = CheckpointManager.load(latest, device="cpu")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        set_rng_state(state["rng"])
        start_step = ck_meta["step"]
        if info.is_main:
            print(f"resuming from {latest} (step {start_step})")
    train_model = wrap_ddp(LossForward(model, diffusion), info)
    if cfg.compile:
        train_model = torch.compile(train_model)

    global_batch = cfg.batch_size * info.world
    order = batch_indices(len(data), global_batch, info.rank, cfg.batch_size, cfg.seed, start_step)
    log = JsonlLog(out / "log.jsonl", start_step) if info.is_main else None
    bar = progress_bar(progress and info.is_main, cfg.max_steps, start_step, f"train {model_type}")
    drop_p = (model_cfg.class_dropout if (model_type == "maskgit" or model_cfg.num_classes > 0)
              else model_cfg.text_dropout)

    # ---- the loop --------------------------------------------------------------------------------
    bad = torch.zeros((), dtype=torch.bool, device=device)
    step = start_step
    t0, seen = time.time(), 0
    with GracefulInterrupt() as interrupt:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio)
            set_lr(opt, lr)
            batch = data.batch(next(order))
            gen = step_generator(cfg.seed, step, info.rank, device)
            labels = batch["label"].to(device).clamp_min(0)
            with autocast_for(device, cfg.precision):
                if model_type == "maskgit":
                    terms = train_model(batch["codes"].to(device), labels, gen)
                else:
                    x0 = batch["latents"].to(device, non_blocking=True)
                    kwargs: dict[str, Any] = {}
                    if model_cfg.num_classes > 0:
                        kwargs["y"] = labels
                    if text_cache is not None:
                        captions = pick_captions(batch["captions"], batch["index"].tolist(), cfg.seed, step)
                        emb = text_cache.encode(captions).to(device)
                        kwargs.update(text=emb.states, text_mask=emb.mask)
                    # the CFG drop of the condition, drawn here so that it comes from the step's generator
                    kwargs["drop"] = torch.rand(x0.shape[0], generator=gen, device=gen.device).to(device) < drop_p
                    terms = train_model(x0, kwargs, gen)
                loss = terms["loss"]
            bad |= ~torch.isfinite(loss.detach())
            loss.backward()
            logs = {k: v.detach().float() for k, v in terms.items() if k in ("loss", "mse", "vb", "accuracy")}
            if cfg.optim.grad_clip > 0:
                logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step)
            seen += batch["label"].shape[0] * info.world
            step += 1

            stop = interrupt.requested  # read once: a signal arriving later in this step is seen at the next one
            save_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop
            if step % cfg.log_every == 0 or save_now:
                check_finite(bad, logs, step, ckpts.latest(), "the generator loss")
                values = {k: float(v) for k, v in logs.items()}
                elapsed = time.time() - t0
                if log is not None:
                    log.write(step, {**values, "lr": lr, "samples_per_s": seen / max(elapsed, 1e-9)})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k in ("loss", "mse", "accuracy")})
                t0, seen = time.time(), 0
            if bar is not None:
                bar.update(1)
            if save_now:
                if info.is_main:
                    ckpts.save(step, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                      "rng": rng_state()},
                               {"model_type": model_type, "model_config": model_cfg.to_dict(),
                                "train_config": cfg.to_dict()})
                barrier(info)
            if stop:
                if info.is_main:
                    print(f"\ninterrupted: saved step {step}; run the same command again to resume")
                break
    if bar is not None:
        bar.close()
    final = out / "final"
    if step >= cfg.max_steps and info.is_main:
        record = {"train_step": step, "kind": model_type, "text": cfg.text,
                  "diffusion": diff_cfg.to_dict() if diff_cfg is not None else None,
                  "latents_meta": {**meta, "latents_dir": str(Path(cfg.latents).resolve())}}
        ema.model.save_pretrained(final, extra=record)
        if (Path(cfg.latents) / BANK).is_file():
            shutil.copyfile(Path(cfg.latents) / BANK, final / BANK)
    barrier(info)
    return final


# ---- helpers ------------------------------------------------------------------------------------
class LossForward(nn.Module):
    """``forward`` = the generator's training loss, so DDP and torch.compile wrap the call the loop makes."""

    def __init__(self, model: nn.Module, diffusion: Any) -> None:
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def forward(self, x: torch.Tensor, cond: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.diffusion is None:  # MaskGIT: x = codes, cond = labels
            return self.model.training_loss(x, cond, generator=generator)
        return self.diffusion.training_loss(self.model, x, cond, generator=generator)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw of one step on one rank: a pure function of (seed, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 4099 + rank) % (2**63 - 1))
    return g


def _text_cache(cfg: GeneratorTrainConfig, meta: dict[str, Any], data: LatentDataset, out: Path, info: DistInfo,
                progress: bool):
    """Caption embeddings of the tokenizer's text encoder, computed once for every caption of the latents (in the
    one-file cache, or the text-state store as ``text_store`` says)."""
    spec = meta.get("text_encoder") or ""
    if not spec:
        raise TextokError(f"text=true but the tokenizer of {cfg.latents} names no text encoder")
    return open_text_states(spec, meta.get("text_max_length", 64), str(info.device), text_store=cfg.text_store,
                            text_cache=Path(cfg.text_cache) if cfg.text_cache else out / "text_cache.safetensors",
                            streaming=False, captions={c for caps in data.captions for c in caps},
                            is_main=info.is_main, barrier=lambda: barrier(info), progress=progress)


__all__ = ["GeneratorTrainConfig", "load_generator_config", "train_generator", "build_model_config", "step_generator"]
