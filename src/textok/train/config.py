"""Training configurations: ``TrainConfig`` (a tokenizer: what to train on, with which losses and schedule) and
``GeneratorTrainConfig`` (a DiT or MaskGIT on extracted latents), and how a recipe, a preset or a file with
``key=value`` overrides becomes one. A model's shape lives in its own config (named by ``model``, adjusted by
``model_overrides``)."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar, Union

from ..config import Config, assignment_items, read_yaml, typed_assignments
from ..data.augment import check_crop
from ..errors import ConfigError
from ..losses.adversarial import AdversarialConfig
from ..models.registry import GENERATOR_KINDS, generator_kind, resolve_tokenizer_config

C = TypeVar("C", bound=Config)
# {"optim.lr": 2e-4}, [("optim.lr", 2e-4)] or ["optim.lr=2e-4"], applied in order
Overrides = Union[Mapping[str, Any], Sequence[Union[str, tuple[str, Any]]]]

RECIPES = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass
class DataConfig(Config):
    source: str = "scenes"  # "scenes" (embedded) or a path to an image folder / tar
    train_size: int = 0  # scenes: images in the split (0 = default 4,000); folders: a limit (0 = all)
    val_size: int = 0  # scenes: default 500; folders: a limit (0 = all)
    val_split: str = "val"
    captions_file: str = ""  # a captions.jsonl outside the data (default: the one inside it, if any)
    caption_bank: str = ""  # a {class_name: [captions]} JSON for class folders
    captions_per_image: int = 0  # use only the first k captions of each image (0 = all)
    seed: int = 0  # the scenes' generator seed
    workers: int = 0  # DataLoader worker processes (shards: one reading stream per worker)
    shuffle_buffer: int = 1000  # shards: samples per shuffle window of each reading stream (memory: that many encoded images)
    decode_once: bool = False  # decode every image once and keep the pixels in memory (small data sets, fast GPUs)
    # Training augmentation (never for extraction or evaluation; see data/augment.py): random crops of a square of
    # side in [crop_min, 1] x the image's centre square, resized to the model's size (1 = the centre crop alone;
    # ImageFolder's recipe: 0.8), and left-right flips with probability 0.5
    crop_min: float = 1.0
    flip: bool = False


@dataclasses.dataclass
class OptimConfig(Config):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 disables clipping
    d_lr: float = 1e-4  # discriminator learning rate
    d_weight_decay: float | None = None  # the discriminator's weight decay (None: weight_decay)
    lr_batch: int = 0  # > 0: lr and d_lr are given for this global batch and scale linearly to the run's

    def lr_for(self, global_batch: int) -> float:
        """The peak learning rate of a run whose optimizer step sees ``global_batch`` images (``lr_batch``)."""
        return self.lr * global_batch / self.lr_batch if self.lr_batch > 0 else self.lr

    def __post_init__(self) -> None:
        if not (self.lr >= 0 and self.d_lr >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ConfigError(f"optim: lr ({self.lr}), d_lr ({self.d_lr}), weight_decay ({self.weight_decay}) and "
                              f"grad_clip ({self.grad_clip}) must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.lr_batch < 0 or (self.d_weight_decay is not None and self.d_weight_decay < 0):
            raise ConfigError(f"optim: lr_batch ({self.lr_batch}) and d_weight_decay ({self.d_weight_decay}) must be "
                              ">= 0")
        if not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError(f"optim: min_lr_ratio ({self.min_lr_ratio}) must lie in [0, 1] and warmup_steps "
                              f"({self.warmup_steps}) be >= 0")


@dataclasses.dataclass
class LossConfig(Config):
    l2_weight: float = 1.0
    # "opennsfw" (offline default) | "lpips-vgg" (needs local VGG16 weights) | "none" | "auto" (lpips-vgg when
    # VGG16 weights are given, here or in $TEXTOK_VGG16_WEIGHTS, else opennsfw at OPENNSFW_FOR_LPIPS x the weight)
    perceptual: str = "opennsfw"
    perceptual_weight: float = 0.1
    perceptual_size: int = 224  # input size of the open_nsfw feature network (0: the images' own size, no resize)
    vgg16_weights: str = ""  # for lpips-vgg; else $TEXTOK_VGG16_WEIGHTS
    adversarial: AdversarialConfig = field(default_factory=lambda: AdversarialConfig(weight=0.1, start_step=20000))
    discriminator: str = "auto"  # a DiscriminatorConfig preset, or "auto" (StyleGAN sized to the images)
    d_every: int = 1  # discriminator update every k generator steps
    # The discriminator's and perceptual network's convolutions: channels_last memory format (the GPU's fast
    # layout for convolutions) and torch.compile (in place); both off by default (the eager NCHW numerics)
    channels_last: bool = False
    compile_nets: bool = False
    # Text grounding: w * relu(margin - (l2 with another image's caption - l2 with its own)), the same tokens
    # decoded twice; it pushes the decoder to read its caption (TexTok with text in the decoder only).
    text_contrast_weight: float = 0.0
    text_contrast_margin: float = 0.01


    def resolved_perceptual(self) -> tuple[str, float]:
        """The perceptual loss this config trains with and its weight (``auto`` resolved)."""
        if self.perceptual != "auto":
            return self.perceptual, self.perceptual_weight
        if self.vgg16_weights or os.environ.get(VGG16_ENV):
            return "lpips-vgg", self.perceptual_weight
        return "opennsfw", self.perceptual_weight * OPENNSFW_FOR_LPIPS


VGG16_ENV = "TEXTOK_VGG16_WEIGHTS"
# perceptual=auto without VGG16 weights: open_nsfw replaces LPIPS at this fraction of its weight, the weight
# textok's other recipes give open_nsfw (0.1 beside l2 1.0); it is not calibrated against LPIPS
OPENNSFW_FOR_LPIPS = 0.1


@dataclasses.dataclass
class RunConfig(Config):
    """What every training run has, whatever it trains (the loop reads these): the model, the optimizer, the
    schedule, the precision and parallelism, the run's seed and bookkeeping. ``TrainConfig`` and
    ``GeneratorTrainConfig`` add their own fields and defaults."""

    model: str = ""  # a preset or config file of the model trained
    model_overrides: dict[str, Any] = field(default_factory=dict)  # {"KEY": value} of the model's config, typed
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32  # per process (a tokenizer: per micro-batch)
    max_steps: int = 10000
    ema_decay: float = 0.999
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state (fully_shard) instead of DDP
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    text_cache: str = ""  # where caption embeddings persist (default: OUT/text_cache.safetensors)
    text_store: str = "auto"  # where caption states live (see TrainConfig / GeneratorTrainConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        self.model_overrides = typed_model_overrides(self, self.model_overrides)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision {self.precision!r} must be auto, bf16 or fp32")
        check_schedule(self, positive=("batch_size", "max_steps", "log_every", "ckpt_every", "keep_last"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in [0, 1)")

    def model_config_class(self) -> type[Config]:
        """The config class of the model trained (its ``model_overrides`` are typed by it)."""
        raise NotImplementedError


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """A tokenizer's training run: RunConfig's fields plus the data, the losses and their schedule."""

    model: str = "textok-demo"  # a tokenizer preset or config file
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_accum: int = 1  # micro-batches of batch_size per step
    sample_every: int = 500  # reconstruction grid every k steps (0 = never)
    # Caption states: "auto" (shards -> the user-level text-state store, else the one-file text_cache), "off" (always
    # text_cache), "on" (the user-level store, ~/.cache/textok/text-states), or a store directory
    text_store: str = "auto"
    # A tokenizer directory (a run's final/) whose weights start this run: fine-tuning, e.g. a perceptual + GAN
    # stage after an l2 stage. Optimizer, discriminator and step start fresh; ignored when the run resumes.
    init_from: str = ""
    text_dropout: float = 0.0  # probability that an image trains without its caption (all its text tokens masked)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.text_dropout < 1.0:
            raise ConfigError(f"text_dropout must lie in [0, 1), got {self.text_dropout}")
        if self.loss.text_contrast_weight < 0 or self.loss.text_contrast_margin < 0:
            raise ConfigError("loss.text_contrast_weight and loss.text_contrast_margin must be >= 0")
        check_schedule(self, positive=("grad_accum",), non_negative=("sample_every",))
        if self.loss.perceptual_size < 0:
            raise ConfigError(f"loss.perceptual_size={self.loss.perceptual_size} must be >= 0 (0: the images' own size)")
        if self.loss.d_every < 1:
            raise ConfigError(f"loss.d_every={self.loss.d_every} must be at least 1 (a discriminator update every "
                              "k steps)")
        check_crop(self.data.crop_min)
        if self.data.workers < 0:
            raise ConfigError(f"data.workers={self.data.workers} must be 0 (load in the main process) or more")

    def model_config_class(self) -> type[Config]:
        """The config class of the tokenizer ``model`` names (its ``model_overrides`` are typed by it)."""
        return type(resolve_tokenizer_config(self.model)[1])


def typed_model_overrides(cfg: RunConfig, overrides: Any) -> dict[str, Any]:
    """``model_overrides`` as ``{KEY: value}`` of the model config's types. Files written before they were stored
    typed hold ``["KEY=VALUE", ...]`` text; both forms are read."""
    if isinstance(overrides, str) or not isinstance(overrides, (Mapping, list, tuple)):
        raise ConfigError(f"model_overrides={overrides!r}: expected a mapping of model config keys to values")
    if not overrides:
        return {}
    return typed_assignments(cfg.model_config_class(), overrides)


def check_schedule(cfg: Config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse step counts that cannot work (``ckpt_every=0``, ``log_every=-1``) when the config is made, not
    after the data has loaded."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at least 1")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be 0 (never) or more")


def load_train_config(spec: str, overrides: Overrides = ()) -> TrainConfig:
    """``spec``: a recipe name in textok/configs, a YAML/JSON recipe file, or a tokenizer preset / model file.

    A tokenizer preset (or model file) trains with a recipe of its size (:func:`recipe_for_model`). Overrides
    (see :func:`with_overrides`) ``model.KEY`` adjust the model config; everything else the training config.
    """
    recipe = RECIPES / f"{spec}.yaml"
    path = recipe if recipe.is_file() else Path(spec)
    if path.is_file() and is_recipe(read_yaml(path)):
        cfg = TrainConfig.from_file(path)
    else:
        cfg = recipe_for_model(spec, model_overrides(overrides))
    return with_overrides(cfg, overrides)


# A tokenizer preset used as the training config trains with a recipe of its size: a CPU-size model (at most
# this many pixels a side: textok-tiny, textok-demo, textok-s-*) with the `demo` recipe, measured on 2 CPU cores
# (2,000 scenes x 2 captions, l2 loss, 3,000 steps); a larger one with TrainConfig's defaults, the paper's
# recipe for a GPU (all the scenes' captions, perceptual + GAN losses at 224 px).
CPU_MODEL_MAX_SIZE = 64
CPU_RECIPE = "demo"


# A larger model of a family with a recipe of its own trains with it: ImageFolder with its reference's recipe.
FAMILY_RECIPES = {"imagefolder": "imagefolder"}


def recipe_for_model(model: str, model_overrides: Overrides = ()) -> TrainConfig:
    """The training recipe for tokenizer preset or model file ``model`` (see ``CPU_MODEL_MAX_SIZE`` and
    ``FAMILY_RECIPES``)."""
    model_type, model_cfg = resolve_tokenizer_config(model, model_overrides)  # an unknown preset fails here
    if model_cfg.image_size <= CPU_MODEL_MAX_SIZE:
        return dataclasses.replace(TrainConfig.from_file(RECIPES / f"{CPU_RECIPE}.yaml"), model=model)
    if model_type in FAMILY_RECIPES:
        return dataclasses.replace(TrainConfig.from_file(RECIPES / f"{FAMILY_RECIPES[model_type]}.yaml"), model=model)
    return TrainConfig(model=model)


RECIPE_KEYS = ("data", "optim", "loss", "max_steps", "kind", "latents", "model")


def is_recipe(data: object) -> bool:
    """A file's content is a training recipe (a ``TrainConfig`` or ``GeneratorTrainConfig``), not a model config:
    it has a key that only training configs have."""
    return isinstance(data, dict) and any(k in data for k in RECIPE_KEYS)


def with_overrides(cfg: C, overrides: Overrides) -> C:
    """``cfg`` with all overrides applied at once: ``{"key": value}`` or ``[("key", value)]`` (a value of the field's
    type, or text to parse as one) or ``["key=value", ...]`` as typed on a command line; dotted keys reach nested
    configs (``optim.lr``), and a later assignment of a key wins.

    ``model.KEY`` ones are kept, typed, in ``model_overrides`` (the model's config is built from its preset and
    them when the model is built); the others set the training config's fields.
    """
    items = assignment_items(overrides)
    cfg = cfg.override([(k, v) for k, v in items if not k.startswith("model.")])
    model = model_overrides(items)
    if model:
        cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **dict(model)})
    return cfg


def model_overrides(overrides: Overrides) -> list[tuple[str, Any]]:
    """The ``model.KEY`` entries of ``overrides`` as ``(KEY, value)`` pairs."""
    return [(k[len("model."):], v) for k, v in assignment_items(overrides) if k.startswith("model.")]


# ---- generators ------------------------------------------------------------------------------------
def _generator_optim() -> OptimConfig:
    # DiT trains with AdamW at 1e-4, no weight decay, betas (0.9, 0.999); warm-up + cosine added here.
    return OptimConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=500, min_lr_ratio=0.1,
                       grad_clip=1.0)


def kind_optim(kind: str) -> OptimConfig:
    """The optimizer a generator kind's run starts from unless its recipe or overrides say otherwise: its own
    recipe's (MaskGIT: TiTok's; VAR: ImageFolder's), else the DiT's."""
    own = generator_kind(kind).optim
    return OptimConfig(**own) if own else _generator_optim()


@dataclasses.dataclass
class GeneratorTrainConfig(RunConfig):
    """What generator to train on which latents, and how long: RunConfig's fields (a generator's defaults) plus
    the latents, the kind and the DiT's diffusion and text."""

    latents: str = ""  # a directory written by `textok extract-latents`
    kind: str = "dit"  # a generator kind: "dit" (continuous tokens) | "maskgit" (codes of a TiTok) | "var" (ImageFolder)
    model: str = ""  # a generator preset or config file ("" = the kind's: dit-b / maskgit-b / var-imagefolder-b-256)
    diffusion: str = "dit"  # DiT only: "dit" (DDPM, learned sigma) | "flow" (rectified flow) | a config file
    text: bool = False  # DiT only: text-to-image on caption embeddings (else class-conditional)
    optim: OptimConfig = field(default_factory=_generator_optim)
    batch_size: int = 256  # per process
    max_steps: int = 100000
    ema_decay: float = 0.9999
    ckpt_every: int = 1000
    text_store: str = "auto"  # "auto"/"off" (the one-file text_cache) | "on" (the user-level text-state store) | a store dir

    def __post_init__(self) -> None:
        generator_kind(self.kind)  # an unknown kind is refused, naming the known ones
        super().__post_init__()
        if self.text and not generator_kind(self.kind).text_to_image:
            able = ", ".join(k.label for k in GENERATOR_KINDS.values() if k.text_to_image)
            raise ConfigError(f"text=true is for a text-to-image kind ({able}); {self.kind} here is class-conditional "
                              "only")

    @property
    def model_name(self) -> str:
        return self.model or generator_kind(self.kind).preset

    def model_config_class(self) -> type[Config]:
        """The config class of this kind's generator (its ``model_overrides`` are typed by it)."""
        return generator_kind(self.kind).model.config_class


def load_generator_config(config: str | None = None, overrides: Overrides = (), kind: str | None = None
                          ) -> GeneratorTrainConfig:
    """``config``: a DiT/MaskGIT preset (the kind follows from it), or a YAML/JSON GeneratorTrainConfig file.

    Overrides (see :func:`with_overrides`) ``model.KEY`` adjust the generator's model config; everything else the
    training config.
    """
    cfg = GeneratorTrainConfig()
    presets = {name: kind.model.config_class.presets() for name, kind in GENERATOR_KINDS.items()}
    preset_kind = next((name for name, names in presets.items() if config in names), None) if config else None
    if config:
        if preset_kind is not None:
            cfg = dataclasses.replace(cfg, kind=preset_kind, model=config)
        elif Path(config).is_file() and is_recipe(read_yaml(config)):
            cfg = GeneratorTrainConfig.from_file(config)
        elif Path(config).is_file():
            cfg = dataclasses.replace(cfg, model=config)
        else:
            names = [n for kind in presets.values() for n in kind]
            close = difflib.get_close_matches(config, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--config {config!r} is neither a generator preset nor a config file; {hint}"
                              f"(presets: {', '.join(names)})")
    if kind is not None:
        if preset_kind is not None and kind != cfg.kind:
            raise ConfigError(f"--config {config} is a {cfg.kind} preset but --kind is {kind}; drop one of them")
        cfg = dataclasses.replace(cfg, kind=kind)
    if cfg.optim == _generator_optim():  # the generators' default, not chosen for this kind
        cfg = dataclasses.replace(cfg, optim=kind_optim(cfg.kind))
    return with_overrides(cfg, overrides)
