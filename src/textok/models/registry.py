"""The model kinds textok knows, one row each (:mod:`textok.models.kinds` says what a row declares), and which
kind a preset, a config file or a saved directory belongs to. The training loops, the sampling pipeline, the CLI
and the applications ask these rows instead of knowing the families; :func:`register_kind` adds one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, read_yaml
from ..errors import ConfigError, TextokError
from ..hub import read_config_json
from . import dit, maskgit, var
from .dit import DiT
from .imagefolder import ImageFolder
from .kinds import GeneratorKind, TokenizerKind
from .maskgit import MaskGIT
from .sdvae import SDVAE
from .textok import TexTok
from .titok import TiTok
from .var import VAR
from .vqvae import VQVAE

TOKENIZER_KINDS: dict[str, TokenizerKind] = {}
GENERATOR_KINDS: dict[str, GeneratorKind] = {}
# name -> model class, kept in step with the rows by register_kind
TOKENIZERS: dict[str, type[TexTok]] = {}
GENERATORS: dict[str, type[nn.Module]] = {}


def register_kind(kind: TokenizerKind | GeneratorKind) -> None:
    """Add (or replace) a kind's row: from then on it trains, saves, loads and samples through every verb."""
    if isinstance(kind, GeneratorKind):
        GENERATOR_KINDS[kind.name], GENERATORS[kind.name] = kind, kind.model
    else:
        TOKENIZER_KINDS[kind.name], TOKENIZERS[kind.name] = kind, kind.model


def generator_kind(name: str) -> GeneratorKind:
    if name not in GENERATOR_KINDS:
        raise ConfigError(f"kind {name!r} is unknown; use one of {', '.join(GENERATOR_KINDS)}")
    return GENERATOR_KINDS[name]


for _row in (
    TokenizerKind("textok", TexTok),
    TokenizerKind("titok", TiTok),
    TokenizerKind("imagefolder", ImageFolder),
    TokenizerKind("vqvae", VQVAE),  # FoundationVision VAR's VQVAE, converted (textok convert --from var-vqvae)
    TokenizerKind("sdvae", SDVAE),  # Stable Diffusion's KL VAE, converted (textok convert --from sd-vae)
    # Guidance w in uncond + w (cond - uncond). For pictures: DiT's visualisation scale; for FID (`sample --npz`):
    # DiT's evaluation scale 1.5. A MaskGIT samples with the guidance stored in its config (TiTok's per-model
    # sampler, MaskGITSamplerConfig; L-32's 4.5 in cond + 4.5 (cond - uncond) is w = 5.5). VAR ramps guidance over
    # the scales, (1 + t) cond - t uncond with t = cfg s / (S - 1): w = 1 + t at the last scale, so the paper's
    # cfg 3.25 is w = 4.25 here (for both).
    GeneratorKind("dit", "DiT", DiT, "textok.train.generator:DiTTask", preset="dit-b", consumes="tokens",
                  sample=dit.sample_images, check_pair=dit.check_tokenizer, default_cfg=4.0, eval_cfg=1.5,
                  eval_note="DiT's FID setting", controls="--steps, --cfg and --sampler", text_to_image=True,
                  cuda_graph=True),
    # TiTok's MaskGIT recipe: AdamW 2e-4, betas (0.9, 0.96), weight decay 0.03, 10k warm-up steps, cosine to 1e-5,
    # gradient clipping at 1.
    GeneratorKind("maskgit", "MaskGIT", MaskGIT, "textok.train.generator:MaskGITTask", preset="maskgit-b",
                  consumes="codes", sample=maskgit.sample_images, check_pair=maskgit.check_tokenizer,
                  default_cfg=5.5, eval_cfg=5.5, eval_note="TiTok's sampler",
                  stored_guidance=lambda model: model.config.sampler.guidance_scale,
                  options={"temperature": None, "temperature_schedule": None, "softmax_annealing": None,
                           "guidance_schedule": None, "guidance_exponent": None},
                  controls="--steps, --cfg, --temperature and its schedules",
                  optim={"lr": 2e-4, "betas": (0.9, 0.96), "weight_decay": 0.03, "warmup_steps": 10_000,
                         "min_lr_ratio": 0.05, "grad_clip": 1.0}),
    # VAR's recipe (ImageFolder's generator trainer): AdamW, betas (0.9, 0.95), weight decay 0.05, lr 1e-4 per 256
    # images, gradient clipping at 2. Its sampler is stored with it (VARSamplerConfig: the paper's 4.25, top_k 750,
    # top_p 0.95 for a VAR textok trains; a converted release's own).
    GeneratorKind("var", "VAR", VAR, "textok.train.generator:VARTask", preset="var-imagefolder-b-256",
                  consumes="scales", sample=var.sample_images, check_pair=var.check_tokenizer, default_cfg=4.25,
                  eval_cfg=4.25, eval_note="its stored sampler", options={"top_k": None, "top_p": None},
                  stored_guidance=lambda model: model.config.sampler.cfg,
                  controls="--cfg, --top-k and --top-p",
                  optim={"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "warmup_steps": 1000,
                         "min_lr_ratio": 0.01, "grad_clip": 2.0}),
):
    register_kind(_row)


def resolve_tokenizer_config(spec: str, overrides: Any = ()) -> tuple[str, Config]:
    """A preset name, or a JSON/YAML file (with ``model_type`` or a TexTok config) -> (model_type, config), with
    ``overrides`` (anything :meth:`Config.override` takes) applied."""
    for model_type, model_cls in TOKENIZERS.items():
        if spec in model_cls.config_class.presets():
            return model_type, model_cls.config_class.preset(spec).override(overrides)
    path = Path(spec)
    if path.is_file():
        data = read_yaml(path)  # JSON is YAML
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values (a training recipe or a "
                              f"tokenizer config), not a {type(data).__name__}")
        model_type = data.pop("model_type", "textok")
        data = data.get("config", data)
        if model_type not in TOKENIZERS:
            raise ConfigError(f"{path}: unknown model_type {model_type!r} (known: {', '.join(TOKENIZERS)})")
        try:
            return model_type, TOKENIZERS[model_type].config_class.from_dict(data).override(overrides)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
    names = sorted(n for model_cls in TOKENIZERS.values() for n in model_cls.config_class.presets())
    close = difflib.get_close_matches(spec, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown tokenizer preset or file {spec!r}{hint} (see `textok info`)")


def build_tokenizer(model_type: str, config: Config) -> TexTok:
    """A freshly initialised tokenizer of ``model_type``."""
    return TOKENIZERS[model_type](config)


def load_tokenizer(directory: str | Path) -> TexTok:
    """Any tokenizer from a ``save_pretrained`` directory (a training run's ``final/``)."""
    model_type = read_config_json(directory).get("model_type")
    if model_type not in TOKENIZERS:
        raise ConfigError(f"{directory} holds a {model_type!r} model, which is not a tokenizer "
                          f"(tokenizers: {', '.join(TOKENIZERS)})")
    return TOKENIZERS[model_type].from_pretrained(directory)


def load_generator(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A trained generator from ``directory`` (a ``train-generator`` run's ``final/``) and its record:
    ``{"model_type", "diffusion", "latents_meta", "text", ...}`` as the training loop wrote it."""
    data = read_config_json(directory)
    kind = data.get("model_type")
    if kind not in GENERATORS:
        raise TextokError(f"{directory} holds a {kind!r} model, not a generator ({', '.join(GENERATORS)}); "
                          "point --generator to a train-generator run's final/ directory")
    if "latents_meta" not in data:
        raise TextokError(f"{directory} has no latents record (normalisation, tokenizer); it was not written by "
                          "`textok train-generator`")
    model = GENERATORS[kind].from_pretrained(directory, map_location=map_location)
    meta = data["latents_meta"]
    for key in ("tokenizer_dir", "latents_dir"):  # relative to the generator's directory (absolute in older runs)
        if meta.get(key) and not Path(meta[key]).is_absolute():
            meta[key] = str((Path(directory).resolve() / meta[key]).resolve())
    return model, data


__all__ = ["GENERATORS", "GENERATOR_KINDS", "TOKENIZERS", "TOKENIZER_KINDS", "build_tokenizer", "generator_kind",
           "load_generator", "load_tokenizer", "register_kind", "resolve_tokenizer_config"]
