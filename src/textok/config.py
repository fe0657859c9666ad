"""Dataclass configs: dict/JSON/YAML round trips, ``key=value`` overrides and named presets.

Every model takes its own small ``@dataclass`` config (``TexTokConfig``, ``DiTConfig``, ...). They all
derive from :class:`Config`, which gives them:

* ``to_dict`` / ``from_dict`` (nested dataclasses included) and JSON/YAML I/O; fields computed from others
  (:func:`derived`) and fields added later (``OMIT_DEFAULT``) are declared, not hand-written per class;
* ``override(["encoder.width=256", "text_in_decoder=false"])`` with the values parsed by the field's
  type and unknown keys refused with the closest valid key; all assignments are applied in one pass, so
  each config is built and checked once (keys that check each other may come in any order);
* a preset registry per class: ``register_preset``, ``preset(name)`` and ``presets()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
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


def check_value(value: Any, tp: Any, key: str, *, strict: bool = True) -> Any:
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
        return tp.from_dict(value, strict=strict, prefix=f"{key}.")
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
            items = [check_value(v, inner, f"{key}[{i}]", strict=strict) for i, v in enumerate(value)]
        elif args and len(args) == len(value):
            items = [check_value(v, a, f"{key}[{i}]", strict=strict) for i, (v, a) in enumerate(zip(value, args))]
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


def derived(default: Any, source: str, *, settable: bool = False) -> Any:
    """A field that ``__post_init__`` computes from ``source`` (a key, or a phrase naming several): not a
    constructor, override or file key. ``to_dict`` leaves it out; ``from_dict`` accepts it only when it agrees.
    With ``settable``, an override of it sets ``source`` instead (``token_channels=8`` -> ``quantizer.code_dim=8``)."""
    return field(default=default, init=False, metadata={"derived_from": source, "settable": settable})


# Field metadata: ``to_dict`` leaves the field out while it holds its default, so files written before the field
# existed compare equal to the config read back from them (a run resumes, two config.json files match).
OMIT_DEFAULT = {"omit_default": True}


def _json_form(value: Any) -> Any:
    """Tuples as lists, as JSON stores them (so a saved and a live config compare equal)."""
    if isinstance(value, (list, tuple)):
        return [_json_form(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_form(v) for k, v in value.items()}
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


@dataclasses.dataclass
class Config:
    """Base class of every config dataclass in textok."""

    _presets: ClassVar[dict[str, Callable[[], "Config"]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._presets = {}

    # ---- dict / file round trips -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The constructor's keys and values in JSON form (nested configs as dicts, tuples as lists); derived
        fields, and ``OMIT_DEFAULT`` fields at their default, are left out."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.metadata.get("omit_default"):
                default = _field_default(f)
                if value == default:
                    continue
            data[f.name] = value.to_dict() if isinstance(value, Config) else _json_form(
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        return data

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, strict: bool = True, prefix: str = "") -> C:
        """Build from a (possibly nested) dict; unknown keys are an error naming the closest key, and a value
        of the wrong type is refused like the same mistake in a ``key=value`` override. A derived field's key is
        accepted when its value agrees with the config built from the others."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping of keys to values, "
                              f"got {type(data).__name__}")
        derived_fields = {f.name: f for f in dataclasses.fields(cls) if not f.init}
        names = _init_names(cls)
        types = _field_types(cls)
        kwargs: dict[str, Any] = {}
        given_derived: dict[str, Any] = {}
        for key, value in data.items():
            if key in derived_fields:
                given_derived[key] = value
                continue
            if key not in names:
                if strict:
                    raise ConfigError(_unknown_key_message(cls, str(key), names, f"{prefix}{key}"))
                continue
            kwargs[key] = check_value(value, types[key], f"{prefix}{key}", strict=strict)
        cfg = cls(**kwargs)
        for key, value in given_derived.items():
            if value != getattr(cfg, key):
                source = derived_fields[key].metadata.get("derived_from", "the other fields")
                raise ConfigError(f"{prefix}{key}={value} does not follow from {source} ({getattr(cfg, key)}); "
                                  f"set {source} instead")
        return cfg

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
        """Return a copy with all assignments applied at once (dotted keys reach nested configs): ``"key=value"``
        text as typed on a command line, ``(key, value)`` pairs or a ``{key: value}`` mapping, where a value is
        of the field's type or text to parse as one. A later assignment of a key wins; each config (nested ones
        included) is built, and so checked, once from all of them."""
        return _assign(self, [(key.strip(), value) for key, value in assignment_items(assignments)])

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


def assignment_items(assignments: Sequence[str | tuple[str, Any]] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Overrides in any accepted form -> ``[(key, value), ...]`` in order."""
    if isinstance(assignments, Mapping):
        return list(assignments.items())
    return [a if isinstance(a, tuple) else split_assignment(a) for a in assignments]


def _init_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _assign(cfg: C, items: list[tuple[str, Any]], prefix: str = "") -> C:
    """``cfg`` rebuilt once with ``items`` (keys relative to ``cfg``; ``prefix`` names it in messages)."""
    cls = type(cfg)
    names = _init_names(cls)
    derived_fields = {f.name: f for f in dataclasses.fields(cls) if not f.init}
    types = _field_types(cls)
    direct: dict[str, Any] = {}
    nested: dict[str, list[tuple[str, Any]]] = {}
    for key, value in items:
        head, _, rest = key.partition(".")
        full_key = f"{prefix}{key}"
        if head in derived_fields and not rest:
            meta = derived_fields[head].metadata
            if meta.get("settable"):
                head, _, rest = f"{meta['derived_from']}".partition(".")
            else:
                raise ConfigError(f"{full_key} follows from {meta.get('derived_from', 'the other fields')}; set that "
                                  "instead")
        if head not in names:
            raise ConfigError(_unknown_key_message(cls, head, names, full_key))
        if rest:
            current = direct.get(head, getattr(cfg, head))
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"{full_key}: {head!r} is a plain value, not a nested config")
            nested.setdefault(head, []).append((rest, value))
        else:
            nested.pop(head, None)  # a whole value set after some of its keys replaces them
            if isinstance(value, str):
                value = parse_value(value, types[head], full_key)
            else:
                value = check_value(value, types[head], full_key)
            direct[head] = value
    for head, child_items in nested.items():
        child = direct.get(head, getattr(cfg, head))
        direct[head] = _assign(child, child_items, f"{prefix}{head}.")
    if not direct:
        return cfg
    return dataclasses.replace(cfg, **direct)


def typed_assignments(cls: type, assignments: Sequence[str | tuple[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """``{key: value}`` with each value of its field's type in config class ``cls`` (text parsed as a command line
    would be); an unknown key is refused naming the closest. Nothing is built: the config checks the values
    together when it is made from them."""
    out: dict[str, Any] = {}
    for key, value in assignment_items(assignments):
        key = key.strip()
        tp = _field_type(cls, key.split("."), key)
        out.pop(key, None)  # a later assignment of a key wins, in its own place
        out[key] = parse_value(value, tp, key) if isinstance(value, str) else check_value(value, tp, key)
    return out


def _field_type(cls: type, path: list[str], full_key: str) -> Any:
    derived_fields = {f.name: f for f in dataclasses.fields(cls) if not f.init}
    head = path[0]
    if head in derived_fields and len(path) == 1 and derived_fields[head].metadata.get("settable"):
        return _field_type(cls, derived_fields[head].metadata["derived_from"].split("."), full_key)
    names = _init_names(cls)
    if head not in names:
        raise ConfigError(_unknown_key_message(cls, head, names, full_key))
    tp = _unwrap_optional(_field_types(cls)[head])
    if len(path) == 1:
        return _field_types(cls)[head]
    if not _is_config_type(tp):
        raise ConfigError(f"{full_key}: {head!r} is a plain value, not a nested config")
    return _field_type(tp, path[1:], full_key)
