"""The tokenizer training loop: one loop for every tokenizer in textok (TexTok, TiTok, ...).

Read it top to bottom: set-up (model, EMA, discriminator, losses, optimizers), resume from the latest
checkpoint when there is one, then per step: a generator update (ℓ2 + perceptual + GAN + the model's own
extra terms, e.g. a quantizer's), an EMA update, a discriminator update with LeCAM, logging, grids and
checkpoints. Everything a resumed run needs (weights, EMA, both optimizers, LeCAM state, RNG, step) is in
the checkpoint; data order and caption choice are pure functions of the step, so a resumed run is
bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.factory import build_dataset
from ..data.shards import ShardSet
from ..data.folder import collate
from ..data.images import save_image
from ..devices import autocast_for
from ..errors import TextokError
from ..losses.adversarial import LeCAM, adaptive_weight, d_loss, g_loss, r1_penalty
from ..losses.perceptual import build_perceptual
from ..models.discriminator import Discriminator, DiscriminatorConfig
from ..models.registry import build_tokenizer, resolve_tokenizer_config
from ..text.embeddings import TextEmbeddings
from ..text.store import open_text_states
from .checkpoint import CheckpointManager
from .common import (GracefulInterrupt, JsonlLog, check_finite,
                     lr_at, open_run, param_groups, pick_captions, progress_bar, rng_state, set_lr,
                     set_rng_state)
from .config import TrainConfig
from .data_source import BatchSource, captions_of
from ..distributed import DistInfo, barrier, distributed_session, wrap_ddp
from .ema import EMA
from .rundir import run_lock
from .stages import check_stage_recipe
from . import fsdp


def discriminator_config(name: str, image_size: int) -> DiscriminatorConfig:
    """``auto``: the paper's StyleGAN discriminator at 256/512 px, a narrow one for small CPU images."""
    if name == "auto":
        if image_size >= 256:
            return DiscriminatorConfig.preset("stylegan-512" if image_size >= 512 else "stylegan-256").override(
                {"image_size": image_size})
        return DiscriminatorConfig.preset("stylegan-tiny").override({"image_size": image_size})
    return DiscriminatorConfig.resolve(name).override({"image_size": image_size})


@dataclasses.dataclass
class Components:
    """Everything the loop trains, so it can be checkpointed and restored in one place."""

    model: nn.Module
    ema: EMA
    opt_g: torch.optim.Optimizer
    disc: nn.Module | None = None
    lecam: LeCAM | None = None
    opt_d: torch.optim.Optimizer | None = None

    def state(self, sharded: DistInfo | None = None) -> dict[str, Any]:
        """Everything to resume; ``sharded`` (an FSDP run): gathered whole, collectively, keyed as a plain model's."""
        if sharded is not None:
            out = {"model": fsdp.full_state(self.model, sharded), "ema": fsdp.full_state(self.ema.model, sharded),
                   "opt_g": fsdp.optimizer_state(self.model, self.opt_g, sharded), "rng": rng_state()}
        else:
            out = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt_g": self.opt_g.state_dict(),
                   "rng": rng_state()}
        if self.disc is not None:
            out.update(disc=self.disc.state_dict(), lecam=self.lecam.state_dict(), opt_d=self.opt_d.state_dict())
        return out

    def restore(self, state: dict[str, Any], sharded: DistInfo | None = None) -> None:
        if sharded is not None:
            fsdp.load_full_state(self.model, state["model"], sharded)
            fsdp.load_full_state(self.ema.model, state["ema"], sharded)
        else:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
        fsdp.load_optimizer(self.model, self.opt_g, state["opt_g"], sharded or DistInfo())
        if self.disc is not None:
            if "disc" not in state:
                raise TextokError("the checkpoint has no discriminator but this run uses one; resume with the same loss config")
            self.disc.load_state_dict(state["disc"])
            self.lecam.load_state_dict(state["lecam"])
            self.opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])


def build_components(cfg: TrainConfig, model_type: str, model_cfg, device: torch.device) -> tuple[Components, nn.Module | None]:
    """The tokenizer, its EMA and optimizer, the discriminator + LeCAM + optimizer, and the perceptual net."""
    model = build_tokenizer(model_type, model_cfg).to(device)
    opt_g = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    parts = Components(model, EMA(model, cfg.ema_decay), opt_g)
    adv = cfg.loss.adversarial
    if adv.weight > 0:
        parts.disc = Discriminator(discriminator_config(cfg.loss.discriminator, model_cfg.image_size)).to(device)
        parts.lecam = LeCAM(adv.lecam_decay).to(device)
        parts.opt_d = torch.optim.AdamW(parts.disc.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.betas,
                                        weight_decay=cfg.optim.weight_decay)
    perceptual = None
    if cfg.loss.perceptual != "none" and cfg.loss.perceptual_weight > 0:
        kwargs = ({"size": cfg.loss.perceptual_size} if cfg.loss.perceptual == "opennsfw"
                  else {"vgg16_weights": cfg.loss.vgg16_weights or None})
        perceptual = build_perceptual(cfg.loss.perceptual, **kwargs).to(device)
    return parts, perceptual


def init_weights(parts: Components, directory: str | Path, model_type: str) -> None:
    """Start the model and its EMA from a saved tokenizer of the same type and shape (``init_from``)."""
    from ..hub import read_config_json

    if not (Path(directory) / "config.json").is_file():
        raise TextokError(f"init_from={directory}: no saved tokenizer there (config.json is missing); point it at "
                          "a run's final/ directory")
    saved_type = read_config_json(directory).get("model_type")
    if saved_type != model_type:
        raise TextokError(f"init_from={directory} holds a {saved_type!r} model but this run trains a {model_type!r}; "
                          "start from a tokenizer of the same kind")
    parts.model.load_weights(directory)  # names the config fields that differ when shapes do not match
    parts.ema.model.load_state_dict(parts.model.state_dict())


def train_tokenizer(cfg: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a tokenizer into ``out``; returns ``out/final`` (EMA weights, from_pretrained-ready)."""
    with distributed_session(cfg.device) as info, run_lock(out, enabled=info.is_main):
        return _train(cfg, Path(out), info, progress)


def _train(cfg: TrainConfig, out: Path, info: DistInfo, progress: bool) -> Path:
    device = info.device
    model_type, model_cfg = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
    check_stage_recipe(cfg, model_cfg)
    ckpts, latest = open_run(out, cfg.to_dict(), model_type, model_cfg.to_dict(), "tokenizer", cfg.keep_last,
                             info.is_main)

    # ---- models --------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    parts, perceptual = build_components(cfg, model_type, model_cfg, device)
    model, ema, opt_g = parts.model, parts.ema, parts.opt_g
    adv = cfg.loss.adversarial

    loss_module = LossForward(model, (cfg.loss.text_contrast_weight, cfg.loss.text_contrast_margin))
    if latest is None and cfg.init_from:
        init_weights(parts, cfg.init_from, model_type)
        if info.is_main:
            print(f"starting from the weights in {cfg.init_from}")
    if cfg.fsdp:
        if adv.adaptive and adv.weight > 0:
            raise TextokError("loss.adversarial.adaptive differentiates through the decoder's whole last layer, which "
                              "fsdp=true shards; set loss.adversarial.adaptive=false or fsdp=false")
        fsdp.shard(loss_module, model, info)
        fsdp.shard(ema.model, ema.model, info)
        parts.opt_g = opt_g = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                                betas=cfg.optim.betas)  # over the sharded parameters
    start_step = 0
    if latest is not None:
        state, meta = CheckpointManager.load(latest, device="cpu")
        parts.restore(state, info if cfg.fsdp else None)
        start_step = meta["step"]
        if info.is_main:
            print(f"resuming from {latest} (step {start_step})")

    contrast = cfg.loss.text_contrast_weight > 0
    if contrast and not (model_type == "textok" and model_cfg.text_in_decoder):
        raise TextokError("loss.text_contrast_weight trains a TexTok decoder to read its caption: it needs "
                          f"model_type textok with text_in_decoder=true (this run: {model_type}, text_in_decoder="
                          f"{getattr(model_cfg, 'text_in_decoder', False)}); set loss.text_contrast_weight=0")
    train_model = loss_module if cfg.fsdp else wrap_ddp(loss_module, info)
    last_layer = model.last_layer() if adv.adaptive else None
    disc_model = wrap_ddp(parts.disc, info) if parts.disc is not None else None
    if cfg.compile:
        train_model = torch.compile(train_model)

    # ---- data and text -------------------------------------------------------------------------
    d = cfg.data
    train_set = build_dataset(d.source, "train", model_cfg.image_size, size=d.train_size,
                              captions_file=d.captions_file, caption_bank=d.caption_bank, seed=d.seed,
                              captions_per_image=d.captions_per_image, decode_once=d.decode_once)
    val_set = build_dataset(d.source, d.val_split, model_cfg.image_size, size=d.val_size,
                            captions_file=d.captions_file, caption_bank=d.caption_bank, seed=d.seed,
                            captions_per_image=d.captions_per_image)
    if isinstance(val_set, ShardSet):
        val_set = val_set.take(8)  # the reconstruction grid's images
    source = BatchSource(train_set, cfg.batch_size, rank=info.rank, world=info.world, workers=d.workers,
                         seed=cfg.seed, shuffle_buffer=d.shuffle_buffer)
    text_cache = _text_cache(cfg, model_cfg, out, source, val_set, info, progress)
    micro = iter(source.batches(start_step * cfg.grad_accum))
    val_batch = collate([val_set[i] for i in range(min(8, len(val_set)))])

    log = JsonlLog(out / "log.jsonl", start_step) if info.is_main else None
    bar = progress_bar(progress and info.is_main, cfg.max_steps, start_step, f"train {out.name} ({model_type})")

    # ---- the loop ------------------------------------------------------------------------------
    skipped_total = 0
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check (no sync)
    step = start_step
    t0, images_seen = time.time(), 0
    with GracefulInterrupt() as interrupt:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio)
            set_lr(opt_g, lr)
            gan_on = parts.disc is not None and adv.active(step)
            logs: dict[str, torch.Tensor] = {}

            # generator (tokenizer) update, over grad_accum micro-batches
            for k in range(cfg.grad_accum):
                batch = next(micro)
                skipped_total += batch["skipped"]
                images = batch["image"].to(device, non_blocking=True)
                text = _text_for(text_cache, batch, cfg.seed, step, device)
                if text is not None and cfg.text_dropout > 0:
                    text = text.without(_dropped_rows(len(text), cfg.text_dropout, cfg.seed, step, k, info.rank))
                wrong = TextEmbeddings(text.states.roll(1, 0), text.mask.roll(1, 0)) if contrast else None
                last_micro = k == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if (last_micro or not info.enabled or cfg.fsdp) else train_model.no_sync()
                if cfg.fsdp and info.enabled:
                    train_model.set_requires_gradient_sync(last_micro)
                with sync, autocast_for(device, cfg.precision):
                    recon, terms, extra = generator_losses(train_model, parts.disc if gan_on else None, perceptual,
                                                           images, text, cfg, last_layer, wrong)
                    loss = sum(terms.values())
                bad |= ~torch.isfinite(loss.detach())
                (loss / cfg.grad_accum).backward()
                for name, value in {**terms, **{k2: v for k2, v in extra.items() if k2.startswith("metric/")}}.items():
                    logs[name] = logs.get(name, 0.0) + value.detach().float() / cfg.grad_accum
                images_seen += images.shape[0] * info.world
            if cfg.optim.grad_clip > 0:
                logs["grad_norm"] = fsdp.local_value(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                                     cfg.optim.grad_clip))
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            ema.update(model, step)

            # discriminator update (on the last micro-batch), LeCAM-regularised
            if gan_on and step % cfg.loss.d_every == 0:
                set_lr(parts.opt_d, lr / cfg.optim.lr * cfg.optim.d_lr)
                parts.opt_d.zero_grad(set_to_none=True)
                with autocast_for(device, cfg.precision):
                    d_terms = discriminator_losses(disc_model, parts.lecam, images, recon, cfg,
                                                   r1=adv.r1_at(step // cfg.loss.d_every))
                    d_total = sum(d_terms.values())
                bad |= ~torch.isfinite(d_total.detach())
                d_total.backward()
                parts.opt_d.step()
                parts.opt_d.zero_grad(set_to_none=True)
                logs.update({f"{k}_loss": v.detach() for k, v in d_terms.items()})
                logs["d_updates"] = torch.ones(())
            step += 1

            # bookkeeping: host syncs only here, every log_every steps and before a checkpoint
            stop = interrupt.requested  # read once: a signal arriving later in this step is seen at the next one
            save_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop
            if step % cfg.log_every == 0 or save_now:
                check_finite(bad, logs, step, ckpts.latest())
                values = {k: float(v) for k, v in logs.items()}
                elapsed = time.time() - t0
                if log is not None:
                    log.write(step, {**values, "lr": lr, "images_per_s": images_seen / max(elapsed, 1e-9),
                                     "skipped_images": float(skipped_total)})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k in ("l2", "perceptual", "gan_g", "d_loss")})
                t0, images_seen = time.time(), 0
            if bar is not None:
                bar.update(1)
            if (info.is_main or cfg.fsdp) and cfg.sample_every and step % cfg.sample_every == 0:  # FSDP: all ranks
                _save_grid(ema.model, val_batch, text_cache, out / "samples" / f"step-{step:07d}.png", device,
                           info.is_main)
            if save_now:
                _save_checkpoint(ckpts, parts, step, model_type, model_cfg, cfg, info,
                                 source.position(step * cfg.grad_accum))
            if stop:
                if info.is_main:
                    print(f"\ninterrupted: saved step {step}; run the same command again to resume")
                break
    if bar is not None:
        bar.close()
    if skipped_total and info.is_main:
        print(f"skipped {skipped_total} images that could not be decoded")
    final = out / "final"
    if step >= cfg.max_steps and cfg.fsdp:  # gathered into a plain single-process model, written by the main rank
        weights = fsdp.full_state(ema.model, info)
        if info.is_main:
            plain = build_tokenizer(model_type, model_cfg)
            plain.load_state_dict(weights)
            plain.save_pretrained(final, extra={"train_step": step})
    elif step >= cfg.max_steps and info.is_main:
        ema.model.save_pretrained(final, extra={"train_step": step})
    barrier(info)
    return final


# ---- the two loss computations (shared with benchmarks/train_step.py) ---------------------------
def generator_losses(train_model: nn.Module, disc: nn.Module | None, perceptual: nn.Module | None,
                     images: torch.Tensor, text, cfg: TrainConfig, last_layer: torch.Tensor | None = None,
                     wrong_text=None):
    """(reconstruction, weighted loss terms, the model's extra outputs) for one tokenizer update.

    ``disc`` is the plain discriminator module (not its DDP wrapper): its parameters are frozen for this
    pass, so the generator's backward reaches the reconstruction through it but never writes into its
    ``.grad``. ``last_layer`` (the decoder's output weight) is needed for ``loss.adversarial.adaptive``;
    ``wrong_text`` (another image's caption per image) for the text-grounding term.
    """
    recon, extra = train_model(images, text) if wrong_text is None else train_model(images, text, wrong_text)
    extra = dict(extra)
    terms = {"l2": F.mse_loss(recon.float(), images) * cfg.loss.l2_weight}
    if perceptual is not None:
        terms["perceptual"] = perceptual(recon.float(), images).mean() * cfg.loss.perceptual_weight
    if disc is not None:
        adv = cfg.loss.adversarial
        with frozen(disc):
            gan = g_loss(disc(recon), adv.kind)
        weight: float | torch.Tensor = adv.weight
        if adv.adaptive:
            if last_layer is None:
                raise TextokError("loss.adversarial.adaptive needs the decoder's last layer; this model has none "
                                  "(set loss.adversarial.adaptive=false)")
            ratio = adaptive_weight(sum(terms.values()), gan, last_layer, adv.adaptive_max)
            extra["metric/adaptive_weight"] = ratio
            weight = weight * ratio
        terms["gan_g"] = gan * weight
    terms.update({k: v for k, v in extra.items() if not k.startswith("metric/")})
    return recon, terms, extra


def discriminator_losses(disc: nn.Module, lecam: LeCAM | None, images: torch.Tensor, recon: torch.Tensor,
                         cfg: TrainConfig, r1: bool = False) -> dict[str, torch.Tensor]:
    """Weighted discriminator terms: the GAN loss on real vs (detached) reconstructions, LeCAM, and (when
    ``r1``) the lazy R1 penalty on the real images, scaled by its interval as in StyleGAN2."""
    adv = cfg.loss.adversarial
    real_in = images.detach().requires_grad_(True) if r1 else images
    real, fake = disc(real_in), disc(recon.detach())
    terms = {"d": d_loss(real, fake, adv.kind)}
    if lecam is not None and adv.lecam_weight > 0:
        terms["lecam"] = lecam(real.float(), fake.float()) * adv.lecam_weight
    if r1:
        terms["r1"] = r1_penalty(real, real_in) * (adv.r1_weight * adv.r1_every)
    return terms


# ---- helpers (kept out of the loop body so it reads top to bottom) ------------------------------
@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` do not require grad inside the block (graphs recorded there stay frozen)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class LossForward(nn.Module):
    """``forward`` = the tokenizer's ``training_losses``, so DDP and torch.compile wrap the call the loop makes.

    With ``wrong_text`` (another image's caption per image) it also decodes the same tokens with it and adds the
    text-grounding term ``weight * relu(margin - (l2_wrong - l2_right))`` (``text_contrast``)."""

    def __init__(self, model: nn.Module, text_contrast: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.model = model
        self.text_contrast = text_contrast

    def forward(self, images: torch.Tensor, text, wrong_text=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if wrong_text is None:
            return self.model.training_losses(images, text)
        recon, recon_wrong = self.model.decode_right_and_wrong(images, text, wrong_text)
        gap = F.mse_loss(recon_wrong.float(), images) - F.mse_loss(recon.float(), images)
        weight, margin = self.text_contrast
        return recon, {"text_contrast": weight * F.relu(margin - gap), "metric/wrong_caption_gap": gap.detach()}


def _save_checkpoint(ckpts, parts: Components, step: int, model_type: str, model_cfg, cfg: TrainConfig,
                     info: DistInfo, data_position: dict | None = None) -> None:
    state = parts.state(info if cfg.fsdp else None) if (info.is_main or cfg.fsdp) else None  # FSDP: collective
    if info.is_main:
        ckpts.save(step, state, {"model_type": model_type, "model_config": model_cfg.to_dict(),
                                          "train_config": cfg.to_dict(), "data_position": data_position})
    barrier(info)


def _text_cache(cfg: TrainConfig, model_cfg, out: Path, source: BatchSource, val_set, info: DistInfo, progress: bool):
    """The run's caption encoder: the one-file cache for listable data, the text-state store for shards (or as
    ``text_store`` says); captions that can be listed are encoded once up front by the main process."""
    if not getattr(model_cfg, "uses_text", False):
        return None
    captions = {c for i in range(len(val_set)) for c in captions_of(val_set, i)}
    captions.update(source.captions() or ())
    return open_text_states(model_cfg.text_encoder, model_cfg.text_max_length, str(info.device),
                            text_store=cfg.text_store,
                            text_cache=Path(cfg.text_cache) if cfg.text_cache else out / "text_cache.safetensors",
                            streaming=source.streaming, captions=None if source.streaming else captions,
                            pooled_model=bool(getattr(model_cfg, "text_pooled", False)), is_main=info.is_main,
                            barrier=lambda: barrier(info), progress=progress)


def _dropped_rows(batch: int, p: float, seed: int, step: int, micro: int, rank: int) -> torch.Tensor:
    """Which images of a micro-batch train without their caption: a pure function of the position (exact resume)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**63 - 1))
    return torch.rand(batch, generator=g) < p


def _text_for(cache, batch: dict, seed: int, step: int, device, train: bool = True):
    if cache is None:
        return None
    captions = pick_captions(batch["captions"], batch["index"].tolist(), seed, step, train)
    return cache.encode(captions).to(device)


@torch.no_grad()
def _save_grid(model: nn.Module, batch: dict, cache, path: Path, device, write: bool = True) -> None:
    if not batch["captions"]:  # none of the first validation images could be decoded
        return
    images = batch["image"].to(device)
    text = _text_for(cache, batch, 0, 0, device, train=False)
    recon, _ = model(images, text)
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([images, recon.clamp(-1, 1)]).cpu(), str(path), nrow=images.shape[0])
