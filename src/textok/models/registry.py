"""Which config/model classes a tokenizer preset, file or checkpoint belongs to.

Families register here (TexTok, TiTok and ImageFolder add themselves), so the training loop and the CLI
resolve ``textok-b-256-32``, ``titok-b-64`` or a saved ``config.json`` without knowing the families.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, read_yaml
from ..errors import ConfigError

TOKENIZERS: dict[str, tuple[type[Config], type]] = {}


def register_tokenizer(model_type: str, config_cls: type[Config], model_cls: type) -> None:
    TOKENIZERS[model_type] = (config_cls, model_cls)


def _ensure_loaded() -> None:
    from . import textok  # noqa: F401  (registers itself)

    try:
        from . import titok  # noqa: F401
    except ImportError:
        pass
    from . import imagefolder  # noqa: F401


def resolve_tokenizer_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[str, Config]:
    """A preset name, or a JSON/YAML file (with ``model_type`` or a TexTok config) -> (model_type, config)."""
    _ensure_loaded()
    for model_type, (config_cls, _) in TOKENIZERS.items():
        if spec in config_cls.presets():
            return model_type, config_cls.preset(spec).override(list(overrides))
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
            return model_type, TOKENIZERS[model_type][0].from_dict(data).override(list(overrides))
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
    names = sorted(n for c, _ in TOKENIZERS.values() for n in c.presets())
    import difflib

    close = difflib.get_close_matches(spec, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown tokenizer preset or file {spec!r}{hint} (see `textok info`)")


def build_tokenizer(model_type: str, config: Config):
    _ensure_loaded()
    return TOKENIZERS[model_type][1](config)


def load_tokenizer(directory: str | Path):
    """Any registered tokenizer from a ``save_pretrained`` directory."""
    from ..hub import read_config_json

    _ensure_loaded()
    model_type = read_config_json(directory).get("model_type")
    if model_type not in TOKENIZERS:
        raise ConfigError(f"{directory} holds a {model_type!r} model, which is not a tokenizer "
                          f"(tokenizers: {', '.join(TOKENIZERS)})")
    return TOKENIZERS[model_type][1].from_pretrained(directory)
