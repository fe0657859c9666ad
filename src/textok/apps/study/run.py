"""``run_study``: the grid of cells trained and evaluated (each resumable), then the claims and the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...data.factory import build_dataset
from ...devices import resolve_device
from ...errors import TextokError
from ...eta import format_duration
from ...models.registry import resolve_tokenizer_config
from .cells import (PER_IMAGE, base_overrides, cell_config, cell_name, evaluate_cell, held_out, resolve_data, run_cell,
                    study_recipe)
from .claims import verdict_lines
from .intervals import load_cells, seed_values
from .generation import check_settings, run_generation, sample_grid_png
from .report import GRID_ORDER, assemble, print_summary, slug, write_report
from .settings import StudySettings


def run_study(out: str | Path, settings: StudySettings | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every (N, mode) cell of ``settings`` into ``out`` (skipping finished ones), then judge
    the claims and write the report; returns the content of ``results.json``.

    With ``settings.generation`` it also tests C4 (:mod:`.generation`). With ``settings.eval_data`` it trains
    nothing: it scores the finished cells on the ``eval_split`` of another captioned set and writes that report
    to ``OUT/eval-<name>/`` (the cells' own evaluations are left as they are).
    """
    s = settings or StudySettings()
    out = Path(out)
    recipe = study_recipe(s.recipe, s.data)
    if s.generation is not None:  # a C4 request the grid cannot serve fails before any training
        check_settings(s.generation, s.tokens, s.modes)
    over = base_overrides(out, s.data, recipe, s.steps, s.image_size, s.seed, s.overrides)
    configs = {(n, m): cell_config(recipe, n, m, over, s.init_from_study) for n in s.tokens for m in s.modes}
    base = next(iter(configs.values()))
    _, model_cfg = resolve_tokenizer_config(base.model, base.model_overrides)  # fails early on a bad model/override
    size = model_cfg.image_size
    fd = int(s.fd_size if s.fd_size is not None else base.loss.perceptual_size)
    val = held_out(base, size, s.val_num or base.data.val_size)
    num = len(val) if not s.val_num else min(s.val_num, len(val))
    eval_settings = {"val_split": base.data.val_split, "val_num": num, "fd_size": fd,
                     "inception_weights": s.inception_weights, "vgg16_weights": s.vgg16_weights,
                     "caption": "first caption of each image",
                     "wrong_caption": "text cells are also scored with the next image's first caption",
                     "other_caption": "and with the first caption of an image of another class (a far, random image "
                                      "when the data has no classes)",
                     "per_image": "PSNR/SSIM per image and the FD features kept in cells/<cell>/per_image.safetensors",
                     "kid": "KID beside every Fréchet distance"}
    if s.eval_data is not None:
        return _evaluate_elsewhere(out, recipe, base, configs, s, size, eval_settings)
    out.mkdir(parents=True, exist_ok=True)

    cells: dict[str, dict[str, Any]] = {}
    estimated = False
    for i, ((n, mode), cfg) in enumerate(configs.items(), 1):
        name = cell_name(n, mode)
        started = time.perf_counter()
        cells[name] = run_cell(out / "cells" / name, cfg, name, n, mode, val, num, eval_settings, progress,
                               f"[{i}/{len(configs)}]")
        seconds = time.perf_counter() - started
        if not estimated and seconds > 10 and i < len(configs):  # the first cell trained here, not one resumed
            estimated = True
            print(f"study: about {format_duration(seconds * (len(configs) - i))} for the {len(configs) - i} cells left "
                  f"at this cell's pace ({format_duration(seconds)}; cells without text train faster)")
    seeds = seed_values(s.replicates, configs) if s.replicates else None
    arrays = load_cells(out, s.tokens, s.modes)
    result = assemble(recipe, base, list(s.tokens), list(s.modes), cells, eval_settings, arrays, s.bootstrap, seeds)
    device = resolve_device(base.device)
    if s.generation is not None:
        reference = held_out(base, size, s.generation.samples)
        gen = run_generation(out, result, s.generation, base, reference, eval_settings, device, progress)
        gen["grid"] = sample_grid_png(gen, reference, out / "generation.png", device).name
        line = f"{gen['verdict']} ({gen['detail']})"
        result = {**result, "generation": gen,
                  "verdicts": verdict_lines(result["claims"], result["primary_metrics"], line)}
    finals = {m: out / "cells" / cell_name(s.tokens[0], m) / "final" for m in GRID_ORDER if m in s.modes}
    write_report(out, result, finals, val, device)
    print_summary(result)
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}, {out / 'grid.png'} and the plots")
    return result


def _evaluate_elsewhere(out: Path, recipe: str, base, configs: dict, s: StudySettings, size: int,
                        eval_settings: dict) -> dict[str, Any]:
    """``--eval-data``: the finished cells of ``out`` scored on another captioned set, nothing trained."""
    missing = [cell_name(n, m) for (n, m) in configs
               if not (out / "cells" / cell_name(n, m) / "final" / "model.safetensors").is_file()]
    if missing:
        raise TextokError(f"--eval-data scores finished cells, and {out} has no trained {', '.join(missing)}: run the "
                          "study without --eval-data first (with the same --tokens, --modes and options)")
    d = base.data
    source = resolve_data(s.eval_data)
    other = build_dataset(source, s.eval_split, size, size=s.val_num or 0, captions_file="", caption_bank="",
                          seed=d.seed, captions_per_image=d.captions_per_image)
    num = len(other)
    if num < 2:
        raise TextokError(f"{s.eval_data} has {num} image(s) in split {s.eval_split!r}: scoring needs at least 2 "
                          "(pass --eval-split to choose another split)")
    settings = {**eval_settings, "data": source, "val_split": s.eval_split, "val_num": num}
    dest = out / f"eval-{slug(Path(source).name.split('.')[0])}"
    cells = {}
    for i, ((n, mode), cfg) in enumerate(configs.items(), 1):
        name = cell_name(n, mode)
        print(f"[{i}/{len(configs)}] {name}: scoring on {num} images of {s.eval_data} ({s.eval_split})")
        cells[name] = evaluate_cell(out / "cells" / name / "final", cfg, name, n, mode, other, num, settings,
                                    dest / "cells" / name / PER_IMAGE)
    arrays = load_cells(dest, s.tokens, s.modes)
    result = assemble(recipe, base, list(s.tokens), list(s.modes), cells, settings, arrays, s.bootstrap)
    result["evaluated_on"] = source
    finals = {m: out / "cells" / cell_name(s.tokens[0], m) / "final" for m in GRID_ORDER if m in s.modes}
    write_report(dest, result, finals, other, resolve_device(base.device))
    for line in result["verdicts"]:
        print(line)
    print(f"\nwrote {dest / 'report.md'}")
    return result


__all__ = ["run_study"]
