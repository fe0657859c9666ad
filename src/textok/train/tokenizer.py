"""The tokenizers' side of the training loop (:mod:`textok.train.loop`), for every tokenizer in textok (TexTok,
TiTok, ImageFolder).

Parts: the tokenizer, its EMA and AdamW, a discriminator with LeCAM and its own AdamW (when the GAN term is on),
the perceptual network. One step: the tokenizer's update over ``grad_accum`` micro-batches (ℓ2 + perceptual +
GAN + the model's own extra terms, e.g. a quantizer's; text dropout and the text-grounding term when asked),
then the discriminator's update with LeCAM on the last micro-batch. The checkpoint adds the discriminator, LeCAM
and both optimizers' states, and the data position; captions (and dropped captions) are drawn as pure
functions of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import augment, augment_generator, load_size
from ..data.factory import build_dataset
from ..data.folder import collate
from ..data.images import save_image
from ..data.shards import ShardSet
from ..devices import autocast_for
from ..distributed import DistInfo, wrap_ddp
from ..errors import TextokError
from ..hub import read_config_json
from ..losses.adversarial import LeCAM, adaptive_weight, d_loss, g_loss, r1_penalty
from ..losses.diffaug import diff_augment
from ..losses.perceptual import build_perceptual
from ..models.discriminator import Discriminator, DiscriminatorConfig
from ..models.registry import build_tokenizer, resolve_tokenizer_config
from ..text.embeddings import TextEmbeddings
from .config import TrainConfig
from .data_source import BatchSource, captions_of, pick_captions
from .ema import EMA
from .loop import StepResult, Task, adamw, run_text_states, set_lr, train
from .stages import check_stage_recipe


def train_tokenizer(cfg: TrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) a tokenizer into ``out``; returns ``out/final`` (EMA weights, from_pretrained-ready)."""
    return train(TokenizerTask, cfg, out, progress)


class TokenizerTask(Task):
    """A tokenizer trained on images (and captions) with reconstruction, perceptual and GAN losses."""

    kind = "tokenizer"
    shown = ("l2", "perceptual", "gan_g", "d_loss")
    micro: Iterator[dict[str, Any]] | None = None  # the training micro-batches, from begin() on

    def __init__(self, cfg: TrainConfig, out: Path, info: DistInfo, progress: bool) -> None:
        super().__init__(cfg, out, info, progress)
        self.model_type, self.model_config = resolve_tokenizer_config(cfg.model, cfg.model_overrides)
        check_stage_recipe(cfg, self.model_config)
        adv = cfg.loss.adversarial
        self.contrast = cfg.loss.text_contrast_weight > 0
        if self.contrast and not (self.model_type == "textok" and self.model_config.text_in_decoder):
            raise TextokError("loss.text_contrast_weight trains a TexTok decoder to read its caption: it needs "
                              f"model_type textok with text_in_decoder=true (this run: {self.model_type}, "
                              f"text_in_decoder={getattr(self.model_config, 'text_in_decoder', False)}); "
                              "set loss.text_contrast_weight=0")
        if cfg.fsdp and adv.adaptive and adv.weight > 0:
            raise TextokError("loss.adversarial.adaptive differentiates through the decoder's whole last layer, which "
                              "fsdp=true shards; set loss.adversarial.adaptive=false or fsdp=false")

    # ---- parts -----------------------------------------------------------------------------------
    def make_model(self) -> nn.Module:
        return build_tokenizer(self.model_type, self.model_config)

    def loss(self, model: nn.Module, *inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        return tokenizer_losses(model, *inputs, contrast=(cfg.loss.text_contrast_weight, cfg.loss.text_contrast_margin))

    def build(self, fresh: bool) -> None:
        cfg, info = self.cfg, self.info
        self.disc, self.lecam, self.opt_d = build_discriminator(cfg, self.model_config.image_size, info.device)
        self.perceptual = build_perceptual_loss(cfg, info.device)
        if fresh and cfg.init_from:
            init_weights(self.model, self.ema, cfg.init_from, self.model_type)
            if info.is_main:
                print(f"starting from the weights in {cfg.init_from}")

    def extra_state(self) -> dict[str, Any]:
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "lecam": self.lecam.state_dict(), "opt_d": self.opt_d.state_dict()}

    def restore_extra(self, state: dict[str, Any]) -> None:
        if self.disc is not None:
            if "disc" not in state:
                raise TextokError("the checkpoint has no discriminator but this run uses one; resume with the same loss config")
            self.disc.load_state_dict(state["disc"])
            self.lecam.load_state_dict(state["lecam"])
            self.opt_d.load_state_dict(state["opt_d"])

    def begin(self, step: int) -> None:
        cfg, info = self.cfg, self.info
        self.last_layer = self.model.last_layer() if cfg.loss.adversarial.adaptive else None
        self.disc_model = wrap_ddp(self.disc, info) if self.disc is not None else None
        d, size = cfg.data, self.model_config.image_size
        self.augmenting = d.crop_min < 1.0 or d.flip
        train_set = build_dataset(d.source, "train", load_size(size, d.crop_min), size=d.train_size,
                                  captions_file=d.captions_file,
                                  caption_bank=d.caption_bank, seed=d.seed, captions_per_image=d.captions_per_image,
                                  decode_once=d.decode_once)
        val_set = build_dataset(d.source, d.val_split, size, size=d.val_size, captions_file=d.captions_file,
                                caption_bank=d.caption_bank, seed=d.seed, captions_per_image=d.captions_per_image)
        if isinstance(val_set, ShardSet):
            val_set = val_set.take(8)  # the reconstruction grid's images
        self.source = BatchSource(train_set, cfg.batch_size, rank=info.rank, world=info.world, workers=d.workers,
                                  seed=cfg.seed, shuffle_buffer=d.shuffle_buffer)
        self.text = self._text_states(val_set)
        self.micro = iter(self.source.batches(step * cfg.grad_accum))
        self.val_batch = collate([val_set[i] for i in range(min(8, len(val_set)))])

    def end(self) -> None:
        if self.micro is not None:
            self.micro.close()  # its DataLoader, and so its worker processes, go with it
            self.micro = None

    def _text_states(self, val_set):
        """The caption encoder: captions that can be listed (all but shards') are encoded once, up front."""
        if not getattr(self.model_config, "uses_text", False):
            return None
        captions = {c for i in range(len(val_set)) for c in captions_of(val_set, i)}
        captions.update(self.source.captions() or ())
        mc = self.model_config
        return run_text_states(self.cfg, self.out, self.info, mc.text_encoder, mc.text_max_length,
                               None if self.source.streaming else captions, streaming=self.source.streaming,
                               pooled=bool(getattr(mc, "text_pooled", False)), progress=self.progress)

    # ---- one step --------------------------------------------------------------------------------
    def step(self, step: int, lr: float) -> StepResult:
        cfg, info, device = self.cfg, self.info, self.info.device
        gan_on = self.disc is not None and cfg.loss.adversarial.active(step, cfg.max_steps)
        logs: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=device)
        images_seen = skipped = 0
        for k in range(cfg.grad_accum):  # the tokenizer's gradient, over grad_accum micro-batches
            batch = next(self.micro)
            skipped += batch["skipped"]
            images = batch["image"]
            if self.augmenting:
                images = augment(images, self.model_config.image_size, cfg.data.crop_min, cfg.data.flip,
                                 augment_generator(cfg.seed, step, k, info.rank))
            images = images.to(device, non_blocking=True)
            text = self._text_for(batch, step)
            if text is not None and cfg.text_dropout > 0:
                text = text.without(dropped_rows(len(text), cfg.text_dropout, cfg.seed, step, k, info.rank))
            wrong = TextEmbeddings(text.states.roll(1, 0), text.mask.roll(1, 0)) if self.contrast else None
            last_micro = k == cfg.grad_accum - 1
            sync = (contextlib.nullcontext() if (last_micro or not info.enabled or cfg.fsdp)
                    else self.train_model.no_sync())
            if cfg.fsdp and info.enabled:
                self.train_model.set_requires_gradient_sync(last_micro)
            with sync, autocast_for(device, cfg.precision):
                recon, terms, extra = generator_losses(self.train_model, self.disc if gan_on else None,
                                                       self.perceptual, images, text, cfg, self.last_layer, wrong,
                                                       self._disc_aug(step, k, "generator"))
                loss = sum(terms.values())
            finite &= torch.isfinite(loss.detach())
            (loss / cfg.grad_accum).backward()
            for name, value in {**terms, **{k2: v for k2, v in extra.items() if k2.startswith("metric/")}}.items():
                logs[name] = logs.get(name, 0.0) + value.detach().float() / cfg.grad_accum
            images_seen += images.shape[0]
        if gan_on and step % cfg.loss.d_every == 0:  # the discriminator's update, on the last micro-batch
            opt_d = self.opt_d
            set_lr(opt_d, lr / cfg.optim.lr * cfg.optim.d_lr)
            opt_d.zero_grad(set_to_none=True)
            with autocast_for(device, cfg.precision):
                d_terms = discriminator_losses(self.disc_model, self.lecam, images, recon, cfg,
                                               r1=cfg.loss.adversarial.r1_at(step // cfg.loss.d_every),
                                               disc_aug=self._disc_aug(step, 0, "discriminator"))
                d_total = sum(d_terms.values())
            finite &= torch.isfinite(d_total.detach())
            d_total.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs.update({f"{k}_loss": v.detach() for k, v in d_terms.items()})
            logs["d_updates"] = torch.ones(())
        return StepResult(logs, finite, images_seen, skipped)

    def _disc_aug(self, step: int, micro: int, side: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """DiffAugment for one pass through the discriminator (``loss.adversarial.diffaug``), drawing from a
        generator seeded by the pass's position, so a resumed run draws the same augmentations."""
        adv = self.cfg.loss.adversarial
        if not adv.diffaug:
            return None
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step * 1_019 + micro * 107 + self.info.rank
                                           + (0 if side == "generator" else 500_009)) % (2**63 - 1))
        return functools.partial(diff_augment, generator=g, cutout=adv.diffaug_cutout)

    def _text_for(self, batch: dict, step: int, train: bool = True):
        if self.text is None:
            return None
        captions = pick_captions(batch["captions"], batch["index"].tolist(), self.cfg.seed, step, train)
        return self.text.encode(captions).to(self.info.device)

    def after_step(self, step: int) -> None:
        cfg, info = self.cfg, self.info
        if (info.is_main or cfg.fsdp) and cfg.sample_every and step % cfg.sample_every == 0:  # FSDP: all ranks
            self._save_grid(self.out / "samples" / f"step-{step:07d}.png", write=info.is_main)

    @torch.no_grad()
    def _save_grid(self, path: Path, write: bool = True) -> None:
        """The EMA model's reconstructions of the first validation images, under the images."""
        batch = self.val_batch
        if not batch["captions"]:  # none of the first validation images could be decoded
            return
        images = batch["image"].to(self.info.device)
        recon, _ = self.ema.model(images, self._text_for(batch, 0, train=False))
        if not write:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat([images, recon.clamp(-1, 1)]).cpu(), str(path), nrow=images.shape[0])

    # ---- the record --------------------------------------------------------------------------------
    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        return {**super().checkpoint_meta(step), "data_position": self.source.position(step * self.cfg.grad_accum)}


# ---- the parts -----------------------------------------------------------------------------------------
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
    """A tokenizer training step's parts outside the loop (benchmarks, tests): the model with its EMA and optimizer,
    and the discriminator with LeCAM and its optimizer when the GAN loss is on."""

    model: nn.Module
    ema: EMA
    opt_g: torch.optim.Optimizer
    disc: nn.Module | None = None
    lecam: LeCAM | None = None
    opt_d: torch.optim.Optimizer | None = None


def build_components(cfg: TrainConfig, model_type: str, model_cfg, device: torch.device
                     ) -> tuple[Components, nn.Module | None]:
    """The parts a run of ``cfg`` trains, built in the loop's order, and the perceptual net."""
    model = build_tokenizer(model_type, model_cfg).to(device)
    parts = Components(model, EMA(model, cfg.ema_decay), adamw(model, cfg.optim),
                       *build_discriminator(cfg, model_cfg.image_size, device))
    return parts, build_perceptual_loss(cfg, device)


def build_discriminator(cfg: TrainConfig, image_size: int, device: torch.device
                        ) -> tuple[nn.Module | None, LeCAM | None, torch.optim.Optimizer | None]:
    """The discriminator, its LeCAM regulariser and its optimizer when the GAN loss is on, else Nones."""
    adv = cfg.loss.adversarial
    if adv.weight <= 0:
        return None, None, None
    disc = Discriminator(discriminator_config(cfg.loss.discriminator, image_size)).to(device)
    d_wd = cfg.optim.weight_decay if cfg.optim.d_weight_decay is None else cfg.optim.d_weight_decay
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.betas, weight_decay=d_wd)
    return _prepare_net(cfg, disc), LeCAM(adv.lecam_decay).to(device), opt_d


def build_perceptual_loss(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    """The perceptual network the recipe names (None when it is off)."""
    name, weight = cfg.loss.resolved_perceptual()
    if name == "none" or weight <= 0:
        return None
    kwargs = ({"size": cfg.loss.perceptual_size or None} if name == "opennsfw"
              else {"vgg16_weights": cfg.loss.vgg16_weights or None})
    return _prepare_net(cfg, build_perceptual(name, **kwargs).to(device))


def _prepare_net(cfg: TrainConfig, net: nn.Module) -> nn.Module:
    """The discriminator or the perceptual net in channels_last memory and compiled, as the recipe asks."""
    if cfg.loss.channels_last:
        net.to(memory_format=torch.channels_last)
    if cfg.loss.compile_nets:
        net.compile()  # in place: the state dict keeps its keys
    return net


def init_weights(model: nn.Module, ema: EMA, directory: str | Path, model_type: str) -> None:
    """Start the model and its EMA from a saved tokenizer of the same type and shape (``init_from``)."""
    if not (Path(directory) / "config.json").is_file():
        raise TextokError(f"init_from={directory}: no saved tokenizer there (config.json is missing); point it at "
                          "a run's final/ directory")
    saved_type = read_config_json(directory).get("model_type")
    if saved_type != model_type:
        raise TextokError(f"init_from={directory} holds a {saved_type!r} model but this run trains a {model_type!r}; "
                          "start from a tokenizer of the same kind")
    model.load_weights(directory)  # names the config fields that differ when shapes do not match
    ema.model.load_state_dict(model.state_dict())

# ---- the losses (shared with benchmarks/train_step.py) ----------------------------------------------
def tokenizer_losses(model: nn.Module, images: torch.Tensor, text, wrong_text=None,
                     contrast: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The tokenizer's own training losses: ``(reconstruction, terms)`` of ``model.training_losses``.

    With ``wrong_text`` (another image's caption per image) it decodes the same tokens with both captions instead
    and the term is the text-grounding one, ``weight * relu(margin - (l2_wrong - l2_right))`` for
    ``contrast = (weight, margin)``."""
    if wrong_text is None:
        return model.training_losses(images, text)
    recon, recon_wrong = model.decode_right_and_wrong(images, text, wrong_text)
    gap = F.mse_loss(recon_wrong.float(), images) - F.mse_loss(recon.float(), images)
    weight, margin = contrast
    return recon, {"text_contrast": weight * F.relu(margin - gap), "metric/wrong_caption_gap": gap.detach()}


def generator_losses(train_model: nn.Module, disc: nn.Module | None, perceptual: nn.Module | None,
                     images: torch.Tensor, text, cfg: TrainConfig, last_layer: torch.Tensor | None = None,
                     wrong_text=None, disc_aug: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """(reconstruction, weighted loss terms, the model's extra outputs) for one tokenizer update.

    ``disc`` is the plain discriminator module (not its DDP wrapper): its parameters are frozen for this
    pass, so the generator's backward reaches the reconstruction through it but never writes into its
    ``.grad``. ``last_layer`` (the decoder's output weight) is needed for ``loss.adversarial.adaptive``;
    ``wrong_text`` (another image's caption per image) for the text-grounding term. ``disc_aug`` (DiffAugment)
    transforms the reconstructions before the discriminator sees them.
    """
    recon, extra = train_model(images, text) if wrong_text is None else train_model(images, text, wrong_text)
    extra = dict(extra)
    terms = {"l2": F.mse_loss(recon.float(), images) * cfg.loss.l2_weight}
    if perceptual is not None:
        terms["perceptual"] = perceptual(recon.float(), images).mean() * cfg.loss.resolved_perceptual()[1]
    if disc is not None:
        adv = cfg.loss.adversarial
        with frozen(disc):
            gan = g_loss(disc(disc_aug(recon) if disc_aug is not None else recon), adv.kind)
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
                         cfg: TrainConfig, r1: bool = False,
                         disc_aug: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weighted discriminator terms: the GAN loss on real vs (detached) reconstructions, LeCAM, and (when
    ``r1``) the lazy R1 penalty on the real images, scaled by its interval as in StyleGAN2. ``disc_aug``
    (DiffAugment) transforms the real images and the reconstructions, each with its own draws."""
    adv = cfg.loss.adversarial
    real_in = images.detach().requires_grad_(True) if r1 else images
    aug = disc_aug if disc_aug is not None else (lambda x: x)
    real, fake = disc(aug(real_in)), disc(aug(recon.detach()))
    terms = {"d": d_loss(real, fake, adv.kind)}
    if lecam is not None and adv.lecam_weight > 0:
        terms["lecam"] = lecam(real.float(), fake.float()) * adv.lecam_weight
    if r1:
        terms["r1"] = r1_penalty(real, real_in) * (adv.r1_weight * adv.r1_every)
    return terms


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


def dropped_rows(batch: int, p: float, seed: int, step: int, micro: int, rank: int) -> torch.Tensor:
    """Which images of a micro-batch train without their caption: a pure function of the position (exact resume)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**63 - 1))
    return torch.rand(batch, generator=g) < p


__all__ = ["Components", "TokenizerTask", "build_components", "build_discriminator", "build_perceptual_loss", "discriminator_config", "discriminator_losses",
           "dropped_rows", "frozen", "generator_losses", "init_weights", "tokenizer_losses", "train_tokenizer"]
