import pytest

from textok import TexTokConfig
from textok.errors import ConfigError


def test_override_nested_and_typed():
    cfg = TexTokConfig.preset("textok-tiny").override(["encoder.width=64", "text_in_decoder=false", "num_tokens=6"])
    assert cfg.encoder.width == 64 and cfg.text_in_decoder is False and cfg.num_tokens == 6
    assert cfg.decoder.width == 32  # untouched


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'num_tokens'"):
        TexTokConfig.preset("textok-tiny").override(["num_token=6"])
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        TexTokConfig.preset("textok-tiny").override(["encoder.widht=6"])


def test_bad_value_and_bad_form():
    with pytest.raises(ConfigError, match="expected a value of type int"):
        TexTokConfig.preset("textok-tiny").override(["num_tokens=many"])
    with pytest.raises(ConfigError, match="key=value"):
        TexTokConfig.preset("textok-tiny").override(["num_tokens"])


def test_dict_and_file_round_trip(tmp_path):
    cfg = TexTokConfig.preset("textok-s-32-16")
    assert TexTokConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert TexTokConfig.resolve(str(tmp_path / "c.json")) == cfg
    (tmp_path / "c.yaml").write_text("num_tokens: 12\nencoder: {width: 48, heads: 4, depth: 1}\n")
    loaded = TexTokConfig.from_file(tmp_path / "c.yaml")
    assert loaded.num_tokens == 12 and loaded.encoder.width == 48


def test_presets_and_unknown_preset():
    names = TexTokConfig.presets()
    for res in (256, 512):
        for n in (32, 64, 128, 256):
            assert f"textok-b-{res}-{n}" in names
    assert "textok-tiny" in names and "textok-demo" in names
    with pytest.raises(ConfigError, match="did you mean 'textok-b-256-32'"):
        TexTokConfig.preset("textok-b-256-33")


def test_invalid_geometry():
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        TexTokConfig(image_size=30, patch_size=4)


def test_every_config_field_is_read_somewhere() -> None:
    """A config field no code reads is an option that silently does nothing: each field of every Config
    dataclass must be read (``.name`` or ``"name"``) somewhere in the package. A field whose name another
    attribute shares can slip through; the check catches the plain case of an option never wired in."""
    import dataclasses
    import importlib
    import pkgutil
    import re
    from pathlib import Path

    import textok
    from textok.config import Config

    for module in pkgutil.walk_packages(textok.__path__, "textok."):
        importlib.import_module(module.name)
    sources = [p.read_text() for p in Path(textok.__file__).parent.rglob("*.py")]

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    unread = []
    for cls in set(subclasses(Config)):
        if not cls.__module__.startswith("textok."):
            continue
        for f in dataclasses.fields(cls):
            pattern = re.compile(rf"\.{f.name}\b|[\"']{f.name}[\"']")
            if not any(pattern.search(text) for text in sources):
                unread.append(f"{cls.__name__}.{f.name}")
    assert not unread, f"config fields that no code reads: {unread}"
