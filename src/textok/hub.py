"""``save_pretrained`` / ``from_pretrained`` in the Hugging Face layout: ``config.json`` + ``model.safetensors``.

``from_pretrained`` (and every loader above it) also takes a Hub name ``org/name``, read from the local Hub
cache only; ``push_to_hub`` uploads a model with a model card (:mod:`textok.hub_repo`).

``config.json`` holds the model's own config plus ``model_type`` (which class wrote it) and the textok
version. Loading checks both: a directory written by another model type, or weights whose shapes do not
fit the requested config, fail with one line that names what differs.

Saved models are what users copy around, so ``SHA256SUMS`` (the ``sha256sum`` format) records every file's
sha256 when it is written, and every load checks the files it reads against it: a truncated copy or a flipped
bit is named in one line instead of loading silently. A directory without ``SHA256SUMS`` (written before
checksums, or by hand) loads unchecked.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config
from .errors import CheckpointMismatchError, TextokError
from .hub_repo import push_folder, resolve_model_dir
from .io import (atomic_directory, check_safetensors, check_sha256, read_json, read_sha256sums, sha256_files,
                 write_sha256sums)
from .version import __version__

M = TypeVar("M", bound="PretrainedMixin")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SUMS_NAME = "SHA256SUMS"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``["field: a_value != b_value", ...]`` over the flattened keys of two config dicts."""
    fa, fb = flatten(a), flatten(b)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def state_dict_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors that share storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def read_config_json(directory: str | Path) -> dict[str, Any]:
    directory = resolve_model_dir(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise TextokError(f"{directory} is not a textok model directory: {CONFIG_NAME} is missing "
                          "(write one with save_pretrained, or point to a training run's final/ directory)")
    check_model_file(directory, CONFIG_NAME)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict):
        raise TextokError(f"{path} is corrupt (not a textok model config); write it again with save_pretrained")
    return data


def check_model_file(directory: str | Path, name: str) -> None:
    """Refuse file ``name`` of a saved model when it no longer matches the sha256 its ``SHA256SUMS`` recorded."""
    sums = read_sha256sums(directory, SUMS_NAME)
    if sums is not None:
        check_sha256(directory, sums, [name], fix=f"copy the model again from an intact source (if you edited {name} "
                                                  f"yourself, delete {SUMS_NAME} to load it unchecked)")


class PretrainedMixin:
    """Adds ``save_pretrained``/``from_pretrained`` to an ``nn.Module`` built from ``config_class``."""

    config_class: ClassVar[type[Config]]
    model_type: ClassVar[str]
    config: Config

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ their ``SHA256SUMS``) atomically; ``extra`` adds keys
        to ``config.json``.

        An existing ``directory`` is replaced only when it is a saved model (or empty); anything else is refused.
        """
        assert isinstance(self, nn.Module)
        meta = {"model_type": self.model_type, "textok_version": __version__, **(extra or {})}
        with atomic_directory(directory, markers=(CONFIG_NAME,)) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps({**meta, "config": self.config.to_dict()}, indent=2) + "\n")
            save_file(state_dict_for_saving(self), str(tmp / WEIGHTS_NAME), metadata={"model_type": self.model_type})
            write_sha256sums(tmp, sha256_files(tmp), SUMS_NAME)
        return Path(directory)

    def push_to_hub(self, repo_id: str, *, training_data: str = "", metrics: dict[str, float] | None = None,
                    private: bool = False, token: str | None = None) -> str:
        """Upload this model to the Hub repository ``repo_id``: ``config.json`` + ``model.safetensors`` as
        ``save_pretrained`` writes them and a model card (``README.md``). Returns the commit's URL. (A saved
        directory with its training records: :func:`textok.hub_repo.push_folder`.)"""
        with tempfile.TemporaryDirectory(prefix="textok-save-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, training_data=training_data, metrics=metrics, private=private,
                               token=token)

    @classmethod
    def read_config(cls, directory: str | Path) -> Config:
        data = read_config_json(directory)
        found = data.get("model_type")
        if found != cls.model_type:
            raise CheckpointMismatchError(
                f"{directory} holds a {found!r} model, not a {cls.model_type!r} one; load it with the matching class"
            )
        if "config" not in data:
            raise TextokError(f"{directory}/{CONFIG_NAME} is corrupt (it has no \"config\" entry); write it again "
                              "with save_pretrained")
        return cls.config_class.from_dict(data["config"])

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, config: Config | None = None,
                        map_location: str | torch.device = "cpu") -> M:
        """Build the model from ``directory``'s config (or ``config``) and load its weights strictly."""
        saved = cls.read_config(directory)
        model = cls(config or saved)  # type: ignore[call-arg]
        model.load_weights(directory, saved_config=saved, map_location=map_location)
        return model

    def load_weights(self, directory: str | Path, saved_config: Config | None = None,
                     map_location: str | torch.device = "cpu") -> None:
        """Load ``model.safetensors`` into this model; shape/key mismatches name the config fields that differ."""
        assert isinstance(self, nn.Module)
        directory = resolve_model_dir(directory)
        saved_config = saved_config or type(self).read_config(directory)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise TextokError(f"{path} is missing: the directory has a config but no weights")
        check_model_file(directory, WEIGHTS_NAME)
        check_safetensors(path)
        weights = load_file(str(path), device=str(map_location))
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
        if missing or unexpected or wrong:
            diff = config_diff(saved_config.to_dict(), self.config.to_dict())
            what = "; ".join(diff) if diff else (
                f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors "
                f"(first: {(missing + unexpected + wrong)[0]})")
            raise CheckpointMismatchError(
                f"weights in {directory} were written by a model with another config ({what}); "
                "build the model from the saved config (from_pretrained without config=)"
            )
        self.load_state_dict(weights, strict=True)
