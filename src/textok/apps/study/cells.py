"""The study's cells: one tokenizer per (token count N, text mode), trained and evaluated the same way.

A cell is a run directory ``OUT/cells/n{N}-{mode}/`` trained by :func:`textok.train.tokenizer.train_tokenizer`
with the shared recipe, budget, seed and data, then evaluated on the held-out split with each image's first
caption (and, for a text cell, twice more: with the next image's caption and with that of an image of another
class, or of a far, random image when the data has no classes: does it use the text?). A cell whose ``final/``
and ``eval.json`` exist for the same training config and evaluation settings is skipped; an interrupted one
resumes; a finished one whose evaluation settings changed is only re-evaluated. A cell trained with another
config is an error, never silently mixed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_numpy, save as save_numpy

from ...data.factory import MismatchedCaptions, build_dataset, resolve_source
from ...devices import resolve_device
from ...config import split_assignment
from ...errors import ConfigError, TextokError
from ...eval.reconstruction import evaluate_tokenizer
from ...hub import config_diff, flatten
from ...io import atomic_write_bytes, atomic_write_text
from ...models.registry import load_tokenizer
from ...train.config import RECIPES, Overrides, TrainConfig, load_train_config
from ...train.tokenizer import train_tokenizer
from .settings import MODES

MODE_LABELS = {"both": "text: both", "encoder": "text: encoder", "decoder": "text: decoder", "none": "no text"}
PER_IMAGE = "per_image.safetensors"  # a cell's per-image metrics and features, for the bootstrap intervals
SWAP_SEED = 0  # which image of another class (or far away) lends its caption, the same for every cell
SET_BY_STUDY = ("model.num_tokens", "model.text_in_encoder", "model.text_in_decoder", "text_cache", "init_from")
# keys that do not change what a cell learns: a change in them does not invalidate a finished cell
NOT_IDENTITY = ("text_cache", "device", "log_every", "sample_every", "ckpt_every", "keep_last", "data.val_size",
                "data.workers", "data.decode_once")


def cell_name(tokens: int, mode: str) -> str:
    return f"n{tokens}-{mode}"


def resolve_data(source: str) -> str:
    """``scenes``, or the absolute path of an existing folder/tar (given, or found in ``$TEXTOK_DATA``)."""
    found = resolve_source(source)
    return found if found == "scenes" else str(Path(found).resolve())


def study_recipe(recipe: str | None, data: str | None) -> str:
    """The recipe name/file to use; an unknown name is an error (not silently a model preset)."""
    if not recipe:
        return "study-scenes" if data in (None, "scenes") else "study-flickr"
    if (RECIPES / f"{recipe}.yaml").is_file() or Path(recipe).is_file():
        return recipe
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a recipe in textok/configs ({', '.join(known)}) nor a YAML file")


def base_overrides(out: Path, data: str | None, recipe: str, steps: int | None, image_size: int | None,
                   seed: int | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The overrides every cell shares: the user's ``key=value`` ones, then the study's settings."""
    user = dict(split_assignment(o) for o in overrides)
    for key in user:
        if key in SET_BY_STUDY:
            raise ConfigError(f"{key} is set per cell by the study: use --tokens / --modes / --init-from-study "
                              f"instead of {f'{key}={user[key]}'!r}")
    source = load_train_config(recipe, user).data.source if data is None else data
    given = {"max_steps": steps, "model.image_size": image_size, "seed": seed}
    return {**user, "data.source": resolve_data(source), "text_cache": str((out / "text_cache.safetensors").resolve()),
            **{k: v for k, v in given.items() if v is not None}}


def cell_config(recipe: str, tokens: int, mode: str, overrides: Overrides, init_from_study: str | Path | None = None):
    """The training config of one cell: the shared recipe + overrides, with this N and text mode (and, for a
    fine-tuning study, the same cell of an earlier study as the starting weights)."""
    enc, dec = MODES[mode]
    cell: dict[str, Any] = {"model.num_tokens": tokens, "model.text_in_encoder": enc, "model.text_in_decoder": dec}
    if init_from_study:
        start = Path(init_from_study).resolve() / "cells" / cell_name(tokens, mode) / "final"
        if not (start / "model.safetensors").is_file():
            raise TextokError(f"--init-from-study {init_from_study}: it has no finished cell {cell_name(tokens, mode)} "
                              f"({start} is missing); run that study with the same --tokens and --modes first")
        cell["init_from"] = str(start)
    shared = overrides if isinstance(overrides, Mapping) else dict(split_assignment(o) for o in overrides)
    return load_train_config(recipe, {**shared, **cell})


def identity(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flattened settings of a train config that decide what a cell learns (as JSON has them: tuples are
    lists); a setting the config lacks (written before it existed) takes its default."""
    as_json = lambda d: flatten(json.loads(json.dumps(d, default=str)))  # noqa: E731
    flat = {**as_json(TrainConfig().to_dict()), **as_json(cfg_dict)}
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def cell_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a cell's recorded train config and the one asked for now (``key: old != new``)."""
    return config_diff(identity(old), identity(new))


def held_out(base, image_size: int, count: int):
    """The first ``count`` images (0 = all / the default) of the recipe's held-out split."""
    d = base.data
    return build_dataset(d.source, d.val_split, image_size, size=count, captions_file=d.captions_file,
                         caption_bank=d.caption_bank, seed=d.seed, captions_per_image=d.captions_per_image)


def numeric(metrics: dict) -> dict[str, float]:
    """The metric values of an evaluation (without the image counts)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("num_images", "skipped_images")}


def run_cell(run: Path, cfg, name: str, n: int, mode: str, val, num: int, eval_settings: dict, progress: bool,
             counter: str) -> dict[str, Any]:
    """Train (or resume, or skip) one cell and evaluate it (or reuse its cached evaluation)."""
    cfg_dict = cfg.to_dict()
    final, eval_path, cfg_path = run / "final", run / "eval.json", run / "train_config.json"
    if cfg_path.is_file():  # a started or finished cell: it must be the same experiment
        diff = cell_changes(json.loads(cfg_path.read_text()), cfg_dict)
        if diff:
            raise TextokError(f"cell {name} in {run} was trained with another config ({'; '.join(diff)}): "
                              "use another --out, the original options, or delete that cell's directory")
    cached = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    finished = (final / "model.safetensors").is_file()
    if finished and cached is not None and cached.get("eval") == eval_settings and (run / PER_IMAGE).is_file():
        print(f"{counter} {name}: done (cached in {eval_path})")
        return cached
    seconds = (cached or {}).get("train_seconds")
    if not finished:
        print(f"\n{counter} {name}: training {cfg.max_steps} steps of {cfg.batch_size} images "
              f"(N={n}, text in encoder={MODES[mode][0]}, decoder={MODES[mode][1]})")
        t0 = time.time()
        final = train_tokenizer(cfg, run, progress=progress)
        seconds = round(time.time() - t0, 1)
        if not (final / "model.safetensors").is_file():
            raise TextokError(f"training of cell {name} stopped before max_steps; run the same command again to resume")
    print(f"{counter} {name}: evaluating on {num} held-out images")
    record = evaluate_cell(final, cfg, name, n, mode, val, num, eval_settings, run / PER_IMAGE)
    record["train_seconds"] = seconds
    atomic_write_text(eval_path, json.dumps(record, indent=2, default=str))
    return record


def evaluate_cell(final: Path, cfg, name: str, n: int, mode: str, val, num: int, eval_settings: dict,
                  arrays: Path) -> dict[str, Any]:
    """One cell's metrics on ``val`` with each image's caption and, for text cells, with the next image's and with
    one of another class (or a far image); the per-image values and features behind them go to ``arrays``
    (:func:`save_per_image`) for the bootstrap intervals."""
    model = load_tokenizer(final).eval()
    kw = {"num": num, "batch_size": 64, "device": resolve_device(cfg.device), "fd_size": eval_settings["fd_size"],
          "inception_weights": eval_settings["inception_weights"], "vgg16_weights": eval_settings["vgg16_weights"],
          "progress": False, "kid": True, "per_image": True}
    right = evaluate_tokenizer(model, val, **kw)
    per_image = {k: v for k, v in right.pop("per_image").items()}
    for metric, (originals, recons) in right.pop("features").items():
        per_image[f"originals/{metric}"], per_image[f"reconstructions/{metric}"] = originals, recons
    record = {"cell": name, "tokens": n, "mode": mode, "text_in_encoder": MODES[mode][0],
              "text_in_decoder": MODES[mode][1], "eval": eval_settings, "metrics": right,
              "train_config": cfg.to_dict()}
    if mode != "none":  # how much does it rely on the text? the same images with another image's caption
        for key, swap in (("next", MismatchedCaptions(val, num)),
                          ("other", MismatchedCaptions(val, num, swap="other", seed=SWAP_SEED))):
            wrong = evaluate_tokenizer(model, swap, **kw)
            per_image.update({f"{metric}/{key}": v for metric, v in wrong.pop("per_image").items()})
            wrong.pop("features")
            record["metrics_wrong_caption" if key == "next" else "metrics_other_caption"] = numeric(wrong)
            if key == "other":
                record["other_caption_kind"] = swap.kind
    save_per_image(arrays, per_image)
    return record


def save_per_image(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Per-image metrics and features of one cell as safetensors (float64), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_numpy({k: np.ascontiguousarray(v, np.float64) for k, v in arrays.items()}))


def load_per_image(path: Path) -> dict[str, np.ndarray] | None:
    """What :func:`save_per_image` wrote, or None when the cell has none (evaluated before it existed)."""
    if not path.is_file():
        return None
    return dict(load_numpy(path.read_bytes()))


__all__ = ["MODE_LABELS", "PER_IMAGE", "load_per_image", "save_per_image", "base_overrides", "cell_changes", "cell_config", "cell_name", "evaluate_cell", "held_out",
           "identity", "numeric", "resolve_data", "run_cell", "study_recipe"]
