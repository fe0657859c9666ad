"""Dataclass configs: dict/JSON/YAML round trips, ``key=value`` overrides and named presets.

Every model takes its own small ``@dataclass`` config (``TexTokConfig``, ``DiTConfig``, ...). They all
derive from :class:`Config`, which gives them:

* ``to_dict`` / ``from_dict`` (nested dataclasses included) and JSON/YAML I/O;
* ``override(["encoder.width=256", "text_in_decoder=false"])`` with the values parsed by the field's
  type and unknown keys refused with the closest valid key;
* a preset registry per class: ``register_preset``, ``preset(name)`` and ``presets()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import yaml

from .errors import ConfigError
from .io import atomic_write_text

C = TypeVar("C", bound="Config")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string into the field's type."""
    optional = _unwrap_optional(tp) is not tp
    tp = _unwrap_optional(tp)
    if text.lower() in ("none", "null") and optional:
        return None
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            value = yaml.safe_load(text)
            if not isinstance(value, (list, tuple)):
                value = [v.strip() for v in text.split(",") if v.strip()]
            (inner, *_) = typing.get_args(tp) or (str,)
            return type(value)(parse_value(str(v), inner, key) for v in value) if inner is not Ellipsis else value
        return yaml.safe_load(text)
    except (ValueError, OverflowError, yaml.YAMLError):
        raise ConfigError(f"{key}={text!r}: expected a value of type {_type_name(tp)}") from None


def check_value(value: Any, tp: Any, key: str) -> Any:
    """A value read from a file (YAML/JSON) -> the field's type, or the same one-line error an override gets.

    Strings are parsed like command-line values (PyYAML reads ``1e-4`` as a string); ints are accepted for
    floats; anything else of the wrong kind (a list for an int, a mapping for a string, ...) is refused.
    """
    if value is None:
        if _unwrap_optional(tp) is not tp:
            return None
        raise ConfigError(f"{key}=None: expected a value of type {_type_name(_unwrap_optional(tp))}")
    tp = _unwrap_optional(tp)
    if isinstance(value, str) and tp is not str and not _is_config_type(tp):
        return parse_value(value, tp, key)
    wrong = ConfigError(f"{key}={value!r}: expected a value of type {_type_name(tp)}")
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of {tp.__name__} keys to values")
        return tp.from_dict(value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            raise wrong
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise wrong
        return str(value)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong
        args = typing.get_args(tp)
        inner = args[0] if args and (origin is list or len(args) == 2 and args[1] is Ellipsis) else None
        if inner is not None:
            items = [check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        elif args and len(args) == len(value):
            items = [check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        elif args:
            raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    return value


def read_yaml(path: str | Path) -> Any:
    """A YAML/JSON file's content; a file that does not parse (or asks for Python objects) is one line."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({what}{where}); only plain values, lists and "
                          "mappings are read (no !!python tags)") from None


@dataclasses.dataclass
class Config:
    """Base class of every config dataclass in textok."""

    _presets: ClassVar[dict[str, Callable[[], "Config"]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._presets = {}

    # ---- dict / file round trips -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, strict: bool = True, prefix: str = "") -> C:
        """Build from a (possibly nested) dict; unknown keys are an error naming the closest key, and a value
        of the wrong type is refused like the same mistake in a ``key=value`` override."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping of keys to values, "
                              f"got {type(data).__name__}")
        types = _field_types(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                if strict:
                    raise ConfigError(_unknown_key_message(cls, str(key), names, f"{prefix}{key}"))
                continue
            tp = _unwrap_optional(types[key])
            if _is_config_type(tp) and isinstance(value, dict):
                value = tp.from_dict(value, strict=strict, prefix=f"{prefix}{key}.")
            else:
                value = check_value(value, types[key], f"{prefix}{key}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a JSON or YAML file written by ``to_json``/by hand."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None

    # ---- overrides ---------------------------------------------------------------------------
    def override(self: C, assignments: Sequence[str | tuple[str, Any]] | Mapping[str, Any]) -> C:
        """Return a copy with assignments (dotted keys reach nested configs) applied in order: ``"key=value"``
        text as typed on a command line, ``(key, value)`` pairs or a ``{key: value}`` mapping, where a value is
        of the field's type or text to parse as one."""
        items = assignments.items() if isinstance(assignments, Mapping) else \
            [a if isinstance(a, tuple) else split_assignment(a) for a in assignments]
        result = self
        for key, value in items:
            result = _set_path(result, key.split("."), value, key)
        return result

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def register_preset(cls, name: str) -> Callable[[Callable[[], C]], Callable[[], C]]:
        def deco(fn: Callable[[], C]) -> Callable[[], C]:
            cls._presets[name] = fn
            return fn

        return deco

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(cls._presets)

    @classmethod
    def preset(cls: type[C], name: str) -> C:
        if name not in cls._presets:
            close = difflib.get_close_matches(name, cls._presets, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {cls.__name__} preset {name!r}{hint} (known: {', '.join(cls.presets())})")
        return cls._presets[name]()

    @classmethod
    def resolve(cls: type[C], spec: str | Path | C) -> C:
        """A preset name, a JSON/YAML file, or a config object -> config object."""
        if isinstance(spec, cls):
            return spec
        spec_s = str(spec)
        if spec_s in cls._presets:
            return cls.preset(spec_s)
        if spec_s.endswith((".json", ".yaml", ".yml")) or Path(spec_s).is_file():
            return cls.from_file(spec_s)
        return cls.preset(spec_s)  # raises with the closest preset


def split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def port_number(text: str) -> int:
    """A TCP port from the command line (an ``argparse`` type): 0 (any free port) to 65535, else one line."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0 (any free port) to 65535")
    return port


def _unknown_key_message(cls: type, key: str, names: list[str], full_key: str | None = None) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {cls.__name__} key {(full_key or key)!r}{hint} (valid keys: {', '.join(names)})"


def _set_path(cfg: Any, path: list[str], value: Any, full_key: str) -> Any:
    cls = type(cfg)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    head = path[0]
    if head not in names:
        raise ConfigError(_unknown_key_message(cls, head, names, full_key))
    tp = _unwrap_optional(_field_types(cls)[head])
    if len(path) > 1:
        child = getattr(cfg, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{full_key}: {head!r} is a plain value, not a nested config")
        return dataclasses.replace(cfg, **{head: _set_path(child, path[1:], value, full_key)})
    if isinstance(value, str):
        value = parse_value(value, tp, full_key)
    return dataclasses.replace(cfg, **{head: value})
