"""Which model class a preset, a config file or a saved directory belongs to: the tokenizers and generators
textok trains, as two tables, so the training loops, the CLI and the applications need not know the families."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, read_yaml
from ..errors import ConfigError, TextokError
from ..hub import read_config_json
from .dit import DiT
from .imagefolder import ImageFolder
from .maskgit import MaskGIT
from .textok import TexTok
from .titok import TiTok
from .var import VAR
from .vqvae import VQVAE

TOKENIZERS: dict[str, type[nn.Module]] = {"textok": TexTok, "titok": TiTok, "imagefolder": ImageFolder,
                                         "vqvae": VQVAE}
GENERATORS: dict[str, type[nn.Module]] = {"dit": DiT, "maskgit": MaskGIT, "var": VAR}


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
    return model, data


__all__ = ["GENERATORS", "TOKENIZERS", "build_tokenizer", "load_generator", "load_tokenizer",
           "resolve_tokenizer_config"]
