"""Training configuration: what to train on, with which losses and schedule. Model shape lives in the
model's own config (named by ``model``, adjusted by ``model_overrides``)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..losses.adversarial import AdversarialConfig

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


@dataclasses.dataclass
class OptimConfig(Config):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 disables clipping
    d_lr: float = 1e-4  # discriminator learning rate


@dataclasses.dataclass
class LossConfig(Config):
    l2_weight: float = 1.0
    perceptual: str = "opennsfw"  # "opennsfw" (offline default) | "lpips-vgg" (needs local VGG16 weights) | "none"
    perceptual_weight: float = 0.1
    perceptual_size: int = 224  # input size of the open_nsfw feature network
    vgg16_weights: str = ""  # for lpips-vgg; else $TEXTOK_VGG16_WEIGHTS
    adversarial: AdversarialConfig = field(default_factory=lambda: AdversarialConfig(weight=0.1, start_step=20000))
    discriminator: str = "auto"  # a DiscriminatorConfig preset, or "auto" (StyleGAN sized to the images)
    d_every: int = 1  # discriminator update every k generator steps
    # Text grounding: w * relu(margin - (l2 with another image's caption - l2 with its own)), the same tokens
    # decoded twice; it pushes the decoder to read its caption (TexTok with text in the decoder only).
    text_contrast_weight: float = 0.0
    text_contrast_margin: float = 0.01


@dataclasses.dataclass
class TrainConfig(Config):
    model: str = "textok-demo"  # a tokenizer preset or config file
    model_overrides: tuple[str, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int = 10000
    ema_decay: float = 0.999
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state (fully_shard) instead of DDP
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500  # reconstruction grid every k steps (0 = never)
    ckpt_every: int = 500
    keep_last: int = 2
    text_cache: str = ""  # where caption embeddings persist (default: OUT/text_cache.safetensors)
    # Caption states: "auto" (shards -> the user-level text-state store, else the one-file text_cache), "off" (always
    # text_cache), "on" (the user-level store, ~/.cache/textok/text-states), or a store directory
    text_store: str = "auto"
    device: str = "auto"
    # A tokenizer directory (a run's final/) whose weights start this run: fine-tuning, e.g. a perceptual + GAN
    # stage after an l2 stage. Optimizer, discriminator and step start fresh; ignored when the run resumes.
    init_from: str = ""
    text_dropout: float = 0.0  # probability that an image trains without its caption (all its text tokens masked)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision {self.precision!r} must be auto, bf16 or fp32")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ConfigError(f"text_dropout must lie in [0, 1), got {self.text_dropout}")
        if self.loss.text_contrast_weight < 0 or self.loss.text_contrast_margin < 0:
            raise ConfigError("loss.text_contrast_weight and loss.text_contrast_margin must be >= 0")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ConfigError("batch_size, grad_accum and max_steps must be positive")


def load_train_config(spec: str, overrides: list[str] = ()) -> TrainConfig:
    """``spec``: a recipe name in textok/configs, a YAML/JSON file, or a tokenizer preset (default recipe).

    Overrides ``model.KEY=VALUE`` adjust the model config; everything else the training config.
    """
    recipe = RECIPES / f"{spec}.yaml"
    if recipe.is_file():
        cfg = TrainConfig.from_file(recipe)
    elif Path(spec).is_file() and TrainConfig.__name__ and _looks_like_recipe(Path(spec)):
        cfg = TrainConfig.from_file(spec)
    else:
        cfg = TrainConfig(model=spec)
    model_over = [o.split(".", 1)[1] for o in overrides if o.startswith("model.")]
    rest = [o for o in overrides if not o.startswith("model.")]
    cfg = cfg.override(rest)
    if model_over:
        cfg = dataclasses.replace(cfg, model_overrides=tuple(cfg.model_overrides) + tuple(model_over))
    return cfg


def _looks_like_recipe(path: Path) -> bool:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and ("data" in data or "optim" in data or "loss" in data or "max_steps" in data)
