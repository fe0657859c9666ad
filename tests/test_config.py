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


# ---- one pass: every assignment at once, each config built and checked once ------------------------------------
import dataclasses  # noqa: E402
import json  # noqa: E402

from textok.config import OMIT_DEFAULT, Config, derived  # noqa: E402


@dataclasses.dataclass
class _Inner(Config):
    size: int = 4
    names: tuple[str, ...] = ("a",)


@dataclasses.dataclass
class _Outer(Config):
    grid: int = 4
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    area: int = derived(16, "grid", settable=True)
    later: str = dataclasses.field(default="", metadata=OMIT_DEFAULT)
    built: int = dataclasses.field(default=0, init=False)  # how often __post_init__ ran on this object's lineage

    def __post_init__(self) -> None:
        if self.inner.size != self.grid:  # two keys that must change together
            raise ConfigError(f"inner.size={self.inner.size} must equal grid={self.grid}")
        self.area = self.grid * self.grid
        _Outer.checks += 1


_Outer.checks = 0


def test_override_checks_cross_keys_once_in_any_order():
    cfg = _Outer()
    for order in (["grid=6", "inner.size=6"], ["inner.size=6", "grid=6"], {"inner.size": 6, "grid": "6"}):
        _Outer.checks = 0
        out = cfg.override(order)
        assert (out.grid, out.inner.size, out.area) == (6, 6, 36) and _Outer.checks == 1
    with pytest.raises(ConfigError, match="inner.size=4 must equal grid=6"):
        cfg.override(["grid=6"])
    assert cfg.override(["grid=5", "grid=6", "inner.size=6"]).grid == 6  # a later assignment of a key wins
    assert cfg.override([("inner.names", ["x", "y"]), ("grid", 4)]).inner.names == ("x", "y")  # typed: a tuple
    with pytest.raises(ConfigError, match=r"inner.size='big': expected a value of type int"):
        cfg.override({"inner.size": "big"})
    with pytest.raises(ConfigError, match=r"inner.size=2.5: expected a value of type int"):
        cfg.override({"inner.size": 2.5, "grid": 2})  # a non-text value is checked as a file's would be


def test_derived_and_omitted_fields_are_declared_not_hand_written():
    cfg = _Outer()
    assert cfg.to_dict() == {"grid": 4, "inner": {"size": 4, "names": ["a"]}}  # no derived area, no default `later`
    assert _Outer.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.override(["later=x"]).to_dict()["later"] == "x"
    assert _Outer.from_dict({"grid": 3, "inner": {"size": 3}, "area": 9}).area == 9  # a derived key that agrees
    with pytest.raises(ConfigError, match="area=10 does not follow from grid"):
        _Outer.from_dict({"grid": 3, "inner": {"size": 3}, "area": 10})
    with pytest.raises(ConfigError, match="built follows from"):
        cfg.override(["built=3"])
    with pytest.raises(ConfigError, match="inner.size=4 must equal grid=5"):  # settable: area=... sets grid
        cfg.override(["area=5"])


def test_model_overrides_are_stored_typed_and_old_text_still_reads(tmp_path):
    from textok.train.config import TrainConfig, load_generator_config, load_train_config

    cfg = load_train_config("textok-tiny", ["model.text_in_encoder=false", "model.num_tokens=4",
                                            "model.encoder.depth=1", "max_steps=3"])
    assert cfg.model_overrides == {"text_in_encoder": False, "num_tokens": 4, "encoder.depth": 1}
    again = load_train_config("textok-tiny", {**{f"model.{k}": v for k, v in cfg.model_overrides.items()}})
    assert again.model_overrides == cfg.model_overrides
    old = {**json.loads(json.dumps(cfg.to_dict())), "model_overrides": ["text_in_encoder=false", "num_tokens=4",
                                                                       "encoder.depth=1"]}
    assert TrainConfig.from_dict(old).model_overrides == cfg.model_overrides  # a run written before: same config
    with pytest.raises(ConfigError, match="unknown TexTokConfig key 'num_tokenz'; did you mean 'num_tokens'"):
        load_train_config("textok-tiny", ["model.num_tokenz=4"])  # refused when the config is made
    with pytest.raises(ConfigError, match="model_overrides='depth=2': expected a mapping"):
        TrainConfig.from_dict({"model_overrides": "depth=2"})
    gen = load_generator_config("maskgit-tiny", ["model.transformer.depth=1", "model.label_smoothing=0"])
    assert gen.model_overrides == {"transformer.depth": 1, "label_smoothing": 0.0}
    assert isinstance(gen.model_overrides["label_smoothing"], float)
