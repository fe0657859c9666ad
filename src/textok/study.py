"""``textok study``: the paper's TexTok-vs-baseline claims, measured, as one resumable command.

A grid of cells = token counts x text modes (``both``: text in encoder and decoder; ``encoder``; ``decoder``;
``none``: the no-text baseline). Every cell is a run directory ``OUT/cells/n{N}-{mode}/`` trained by
:func:`textok.train.tokenizer.train_tokenizer` with the same recipe, budget, seed and data (training picks
one caption per image at random each step), then evaluated on the held-out split with each image's first
caption. The caption embeddings are cached once for all cells (``OUT/text_cache.safetensors``).

Resumable: a cell whose ``final/`` and ``eval.json`` exist (for the same training config and evaluation
settings) is skipped; a cell interrupted mid-training resumes through ``train_tokenizer``; a finished
cell whose evaluation settings changed is only re-evaluated. A cell trained with a different config is
an error, never silently mixed.

The report (``OUT/report.md``, ``OUT/results.json``, ``OUT/plot_<metric>.png``, ``OUT/grid.png``) holds the
paper-style table (no text vs text at each N and the relative gain), the mode ablation, and a verdict per
claim computed from the numbers:

* C1 with text, reconstruction is better at every token count (``both`` beats ``none`` at every N);
* C2 the gain from text is largest with the fewest tokens (relative gain largest at the smallest N);
* C3 ``both > encoder > decoder > none`` (strictly, at each N);
* C4 with ``--generation``: a small DiT trained on the tokens of the best text tokenizer and of the no-text one
  at one N gives better samples with text (FD of samples vs the held-out images; see
  :mod:`textok.study_generation`). Without ``--generation`` it is reported as "not run".
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cli import args_for, command
from .data.factory import MismatchedCaptions, build_dataset
from .errors import ConfigError, TextokError
from .io import atomic_write_text
from .models.registry import load_tokenizer, resolve_tokenizer_config
from .report import captioned_grid, line_plot, markdown_table
from .train.config import load_train_config
from .train.tokenizer import train_tokenizer

MODES: dict[str, tuple[bool, bool]] = {  # mode -> (text_in_encoder, text_in_decoder)
    "both": (True, True),
    "encoder": (True, False),
    "decoder": (False, True),
    "none": (False, False),
}
MODE_LABELS = {"both": "text: both", "encoder": "text: encoder", "decoder": "text: decoder", "none": "no text"}
ORDER_C3 = ("both", "encoder", "decoder", "none")  # the paper's ablation order, best first
GRID_ORDER = ("none", "decoder", "encoder", "both")
CLAIMS = {
    "C1": "with text, reconstruction is better at every token count",
    "C2": "the gain from text is largest with the fewest tokens",
    "C3": "both > encoder > decoder > none",
    "C4": "a generator over the text tokenizer's tokens beats one over the no-text tokenizer's",
}
DEFAULT_TOKENS = (16, 32, 64, 128)
REPO_ROOT = Path(__file__).resolve().parents[2]
SET_BY_STUDY = ("model.num_tokens", "model.text_in_encoder", "model.text_in_decoder", "text_cache", "init_from")
# keys that do not change what a cell learns: a change in them does not invalidate a finished cell
NOT_IDENTITY = ("text_cache", "device", "log_every", "sample_every", "ckpt_every", "keep_last", "data.val_size",
                "data.workers", "data.decode_once")
GRID_IMAGES = 6

if TYPE_CHECKING:
    from .study_generation import GenerationSettings


# ---- metrics and claims ----------------------------------------------------------------------------
def higher_is_better(metric: str) -> bool:
    """PSNR and SSIM: higher is better; Fréchet distances (FD-*, rFID) and LPIPS: lower is better."""
    return metric.split("@")[0] in ("PSNR", "SSIM")


def is_better(a: float, b: float, higher: bool) -> bool:
    """Strictly better (ties and NaNs are not better)."""
    return a > b if higher else a < b


def relative_gain(text: float, base: float, higher: bool) -> float:
    """How much better ``text`` is than ``base``, as a fraction of ``base`` (positive = text better)."""
    if base == 0 or not (math.isfinite(text) and math.isfinite(base)):
        return float("nan")
    return ((text - base) if higher else (base - text)) / abs(base)


def primary_metrics(metrics: Sequence[str]) -> list[str]:
    """The headline metrics: rFID (when the real Inception ran), the FD-opennsfw family, and PSNR."""
    return [m for m in metrics if m == "rFID" or m.startswith("FD-opennsfw")] + [m for m in metrics if m == "PSNR"]


def _ns(ns) -> str:
    return ", ".join(str(n) for n in ns)


def judge(values: dict[str, dict[int, float]], higher: bool) -> dict[str, dict[str, Any]]:
    """Verdicts on C1-C3 for one metric, from ``values[mode][N]``.

    Each claim maps to ``{"holds": True | False | None, "detail": str}``; ``None`` = not testable with the
    modes / token counts given. Everything in ``detail`` is computed from the numbers.
    """
    out: dict[str, dict[str, Any]] = {}
    both, none = values.get("both", {}), values.get("none", {})
    ns = sorted(set(both) & set(none))
    # C1: both beats none at every N
    if not ns:
        out["C1"] = {"holds": None, "detail": "needs the modes both and none"}
    else:
        wins = [n for n in ns if is_better(both[n], none[n], higher)]
        losses = [n for n in ns if n not in wins]
        out["C1"] = {"holds": not losses,
                     "detail": (f"text beats no text at every N ({_ns(ns)})" if not losses else
                                (f"text beats no text at N={_ns(wins)}; not at N={_ns(losses)}" if wins else
                                 f"text beats no text at no N ({_ns(ns)})"))}
    # C2: the relative gain is largest at the smallest N
    gains = {n: relative_gain(both[n], none[n], higher) for n in ns}
    if len(ns) < 2:
        out["C2"] = {"holds": None, "detail": "needs both and none at two or more token counts"}
    else:
        smallest, rest = ns[0], ns[1:]
        g0 = gains[smallest]
        best_other = max(rest, key=lambda n: gains[n] if math.isfinite(gains[n]) else -math.inf)
        largest = math.isfinite(g0) and all(math.isfinite(gains[n]) and g0 > gains[n] for n in rest)
        listing = ", ".join(f"N={n}: {gains[n] * 100:+.1f}%" for n in ns)
        if not (math.isfinite(g0) and g0 > 0):  # a "largest" loss is no gain
            detail = f"text does not help at N={smallest} ({listing})"
        elif largest:
            detail = f"largest gain at N={smallest} ({listing})"
        else:
            detail = f"the gain at N={smallest} is not the largest (N={best_other} has more; {listing})"
        out["C2"] = {"holds": largest and g0 > 0, "detail": detail}
    # C3: both > encoder > decoder > none, strictly, at each N
    n3 = sorted(set.intersection(*(set(values.get(m, {})) for m in ORDER_C3)))
    if not n3:
        out["C3"] = {"holds": None, "detail": "needs the modes both, encoder, decoder and none"}
    else:
        ok, orders = [], {}
        for n in n3:
            chain = all(is_better(values[a][n], values[b][n], higher) for a, b in zip(ORDER_C3, ORDER_C3[1:]))
            if chain:
                ok.append(n)
            else:
                ranked = sorted(ORDER_C3, key=lambda m: values[m][n], reverse=higher)
                orders[n] = " > ".join(ranked)
        bad = [n for n in n3 if n not in ok]
        if not bad:
            detail = f"holds at every N ({_ns(n3)})"
        else:
            seen = "; ".join(f"N={n}: {o}" for n, o in orders.items())
            detail = (f"holds at N={_ns(ok)}; fails at N={_ns(bad)} ({seen})" if ok else
                      f"holds at no N (measured order {seen})")
        out["C3"] = {"holds": not bad, "detail": detail, "holds_at": ok}
    out["gains"] = {str(n): gains[n] for n in ns}
    return out


def verdicts(cells: dict[str, dict[int, dict[str, float]]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: :func:`judge` over ``cells[mode][N][metric]`` (metrics missing in a cell are left out)."""
    result = {}
    for metric in metrics:
        values = {mode: {n: float(m[metric]) for n, m in per_n.items() if metric in m} for mode, per_n in cells.items()}
        result[metric] = judge(values, higher_is_better(metric))
    return result


def _word(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "not testable"}[holds]


def verdict_lines(claims: dict[str, dict[str, Any]], primary: Sequence[str], generation: str | None = None) -> list[str]:
    """One line per claim over the primary metrics, e.g. ``C1 (...): FD-opennsfw@64 holds (...); PSNR ...``."""
    lines = []
    for cid in ("C1", "C2", "C3"):
        parts = [f"{m} {_word(claims[m][cid]['holds'])} ({claims[m][cid]['detail']})" for m in primary if m in claims]
        lines.append(f"{cid} — {CLAIMS[cid]}: " + ("; ".join(parts) if parts else "no metric to judge"))
    lines.append(f"C4 — {CLAIMS['C4']}: " + (generation or "not run (pass --generation)"))
    return lines


# ---- configuration -----------------------------------------------------------------------------------
def cell_name(tokens: int, mode: str) -> str:
    return f"n{tokens}-{mode}"


def resolve_data(source: str) -> str:
    """``scenes`` or an existing path (absolute, relative to the working directory, or to the repository)."""
    if source == "scenes":
        return source
    p = Path(source).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    where = " or ".join(str(c) for c in candidates)
    hint = (" (the shared data folder ../shared/data is absent on this machine)" if "shared/data" in source else "")
    raise TextokError(f"data {source!r} not found at {where}{hint}: pass --data PATH to an image folder/tar with "
                      "captions, or --data scenes for the embedded captioned scenes")


def _recipe_for(recipe: str | None, data: str | None) -> str:
    """The recipe name/file to use; an unknown name is an error (not silently a model preset)."""
    from .train.config import RECIPES

    if not recipe:
        return "study-scenes" if data in (None, "scenes") else "study-flickr"
    if (RECIPES / f"{recipe}.yaml").is_file() or Path(recipe).is_file():
        return recipe
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a recipe in textok/configs ({', '.join(known)}) nor a YAML file")


def base_overrides(out: Path, data: str | None, recipe: str, steps: int | None, image_size: int | None,
                   seed: int | None, overrides: Sequence[str]) -> list[str]:
    """The overrides every cell shares (user's ``key=value`` first, then the explicit flags)."""
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in SET_BY_STUDY:
            raise ConfigError(f"{key} is set per cell by the study: use --tokens / --modes / --init-from-study "
                              f"instead of {o!r}")
    source = load_train_config(recipe, list(overrides)).data.source if data is None else data
    over = list(overrides) + [f"data.source={resolve_data(source)}",
                              f"text_cache={(out / 'text_cache.safetensors').resolve()}"]
    if steps is not None:
        over.append(f"max_steps={steps}")
    if image_size is not None:
        over.append(f"model.image_size={image_size}")
    if seed is not None:
        over.append(f"seed={seed}")
    return over


def cell_config(recipe: str, tokens: int, mode: str, overrides: Sequence[str], init_from_study: str | Path | None = None):
    """The training config of one cell: the shared recipe + overrides, with this N and text mode (and, for a
    fine-tuning study, the same cell of an earlier study as the starting weights)."""
    enc, dec = MODES[mode]
    over = list(overrides) + [f"model.num_tokens={tokens}", f"model.text_in_encoder={str(enc).lower()}",
                              f"model.text_in_decoder={str(dec).lower()}"]
    if init_from_study:
        start = Path(init_from_study).resolve() / "cells" / cell_name(tokens, mode) / "final"
        if not (start / "model.safetensors").is_file():
            raise TextokError(f"--init-from-study {init_from_study}: it has no finished cell {cell_name(tokens, mode)} "
                              f"({start} is missing); run that study with the same --tokens and --modes first")
        over.append(f"init_from={start}")
    return load_train_config(recipe, over)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity(cfg_dict: dict) -> dict[str, Any]:
    """The parts of a train config that decide what a cell learns (JSON-normalised: tuples become lists)."""
    flat = _flat(json.loads(json.dumps(cfg_dict, default=str)))
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def _config_diff(old: dict, new: dict) -> list[str]:
    """What differs between two cells' configs; a field one of them lacks (written before the field existed)
    counts as its default value."""
    from .train.config import TrainConfig

    a, b, default = _identity(old), _identity(new), _identity(TrainConfig().to_dict())
    keys = sorted(set(a) | set(b))
    a = {k: a.get(k, default.get(k)) for k in keys}
    b = {k: b.get(k, default.get(k)) for k in keys}
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


# ---- the study --------------------------------------------------------------------------------------
def _device(cfg) -> torch.device:
    from .devices import resolve_device

    return resolve_device(cfg.device)


def held_out(base, image_size: int, count: int):
    """The first ``count`` images (0 = all / the default) of the recipe's held-out split."""
    d = base.data
    return build_dataset(d.source, d.val_split, image_size, size=count, captions_file=d.captions_file,
                         caption_bank=d.caption_bank, seed=d.seed, captions_per_image=d.captions_per_image)


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("num_images", "skipped_images")}


def run_study(out: str | Path, data: str | None = None, tokens: Sequence[int] = DEFAULT_TOKENS,
              modes: Sequence[str] = tuple(MODES), recipe: str | None = None, steps: int | None = None,
              image_size: int | None = None, val_num: int | None = None, seed: int | None = None,
              fd_size: int | None = None, inception_weights: str | None = None, vgg16_weights: str | None = None,
              overrides: Sequence[str] = (), progress: bool = True,
              generation: GenerationSettings | None = None, init_from_study: str | None = None,
              eval_data: str | None = None, eval_split: str = "val") -> dict[str, Any]:
    """Train and evaluate every (N, mode) cell (skipping finished ones), then write the report.

    ``generation``: also test C4 (see :mod:`textok.study_generation`). ``init_from_study``: every cell starts
    from the same cell of that finished study (a second training stage, e.g. perceptual + GAN after l2).
    ``eval_data``: train nothing; score the finished cells on the ``eval_split`` of another captioned set and
    write that report to ``OUT/eval-<name>/`` (the cells' own evaluations are left as they are).

    Returns the ``results.json`` content.
    """
    out = Path(out)
    tokens = sorted(dict.fromkeys(int(n) for n in tokens))
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"unknown text mode(s) {', '.join(bad) or '(none given)'}: choose from {', '.join(MODES)}")
    if not tokens or min(tokens) < 1:
        raise ConfigError(f"token counts must be positive integers; got {tokens}")
    recipe = _recipe_for(recipe, data)
    if generation is not None:  # a C4 request the grid cannot serve fails before any training
        from .study_generation import check_settings

        check_settings(generation, tokens, modes)
    over = base_overrides(out, data, recipe, steps, image_size, seed, overrides)
    configs = {(n, m): cell_config(recipe, n, m, over, init_from_study) for n in tokens for m in modes}
    base = next(iter(configs.values()))
    _, model_cfg = resolve_tokenizer_config(base.model, base.model_overrides)  # fails early on a bad model/override
    size = model_cfg.image_size
    fd = int(fd_size if fd_size is not None else base.loss.perceptual_size)
    val = held_out(base, size, val_num or base.data.val_size)
    num = len(val) if not val_num else min(val_num, len(val))
    eval_settings = {"val_split": base.data.val_split, "val_num": num, "fd_size": fd,
                     "inception_weights": inception_weights, "vgg16_weights": vgg16_weights,
                     "caption": "first caption of each image",
                     "wrong_caption": "text cells are also scored with the next image's first caption"}
    if eval_data is not None:
        if generation is not None:
            raise ConfigError("--eval-data scores the trained cells on other images; it does not run C4: drop "
                              "--generation")
        return _evaluate_elsewhere(out, recipe, base, configs, tokens, modes, size, eval_data, eval_split, val_num,
                                   eval_settings)
    out.mkdir(parents=True, exist_ok=True)

    cells: dict[str, dict[str, Any]] = {}
    total = len(configs)
    for i, ((n, mode), cfg) in enumerate(configs.items(), 1):
        name = cell_name(n, mode)
        cells[name] = _run_cell(out / "cells" / name, cfg, name, n, mode, val, num, eval_settings, progress,
                                f"[{i}/{total}]")
    result = _assemble(out, recipe, base, tokens, modes, cells, eval_settings)
    if generation is not None:
        result = _with_generation(out, result, generation, base, size, eval_settings, progress)
    finals = {m: out / "cells" / cell_name(tokens[0], m) / "final" for m in GRID_ORDER if m in modes}
    _grid(finals, val, out / "grid.png", _device(base))
    _plots(out, result)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "report.md", render_report(result))
    from .report import print_table

    print()
    print_table([{k: _fmt(v) for k, v in r.items()} for r in result["paper_table"] or result["ablation_table"]
                 if r["metric"].split(" (")[0] in result["primary_metrics"]])
    print()
    for line in result["verdicts"]:
        print(line)
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}, {out / 'grid.png'} and the plots")
    return result


def _run_cell(run: Path, cfg, name: str, n: int, mode: str, val, num: int, eval_settings: dict, progress: bool,
              counter: str) -> dict[str, Any]:
    """Train (or resume, or skip) one cell and evaluate it (or reuse its cached evaluation)."""
    cfg_dict = cfg.to_dict()
    final, eval_path, cfg_path = run / "final", run / "eval.json", run / "train_config.json"
    if cfg_path.is_file():  # a started or finished cell: it must be the same experiment
        diff = _config_diff(json.loads(cfg_path.read_text()), cfg_dict)
        if diff:
            raise TextokError(f"cell {name} in {run} was trained with another config ({'; '.join(diff)}): "
                              "use another --out, the original options, or delete that cell's directory")
    cached = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    finished = (final / "model.safetensors").is_file()
    if finished and cached is not None and cached.get("eval") == eval_settings:
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
    record = _evaluate_cell(final, cfg, name, n, mode, val, num, eval_settings)
    record["train_seconds"] = seconds
    atomic_write_text(eval_path, json.dumps(record, indent=2, default=str))
    return record


def _evaluate_cell(final: Path, cfg, name: str, n: int, mode: str, val, num: int, eval_settings: dict) -> dict[str, Any]:
    """One cell's metrics on ``val`` with each image's caption and, for text cells, with the next image's."""
    from .eval.reconstruction import evaluate_tokenizer

    model = load_tokenizer(final).eval()
    kw = {"num": num, "batch_size": 64, "device": _device(cfg), "fd_size": eval_settings["fd_size"],
          "inception_weights": eval_settings["inception_weights"], "vgg16_weights": eval_settings["vgg16_weights"],
          "progress": False}
    record = {"cell": name, "tokens": n, "mode": mode, "text_in_encoder": MODES[mode][0],
              "text_in_decoder": MODES[mode][1], "eval": eval_settings,
              "metrics": evaluate_tokenizer(model, val, **kw), "train_config": cfg.to_dict()}
    if mode != "none":  # how much does it rely on the text? the same images with another image's caption
        record["metrics_wrong_caption"] = _numeric(evaluate_tokenizer(model, MismatchedCaptions(val, num), **kw))
    return record


def _evaluate_elsewhere(out: Path, recipe: str, base, configs: dict, tokens: list[int], modes: list[str], size: int,
                        eval_data: str, split: str, val_num: int | None, eval_settings: dict) -> dict[str, Any]:
    """``--eval-data``: the finished cells of ``out`` scored on another captioned set, nothing trained."""
    missing = [cell_name(n, m) for (n, m) in configs
               if not (out / "cells" / cell_name(n, m) / "final" / "model.safetensors").is_file()]
    if missing:
        raise TextokError(f"--eval-data scores finished cells, and {out} has no trained {', '.join(missing)}: run the "
                          "study without --eval-data first (with the same --tokens, --modes and options)")
    d = base.data
    source = resolve_data(eval_data)
    other = build_dataset(source, split, size, size=val_num or 0, captions_file="", caption_bank="", seed=d.seed,
                          captions_per_image=d.captions_per_image)
    num = len(other)
    if num < 2:
        raise TextokError(f"{eval_data} has {num} image(s) in split {split!r}: scoring needs at least 2 "
                          "(pass --eval-split to choose another split)")
    settings = {**eval_settings, "data": source, "val_split": split, "val_num": num}
    dest = out / f"eval-{_slug(Path(source).name.split('.')[0])}"
    cells = {}
    for i, ((n, mode), cfg) in enumerate(configs.items(), 1):
        name = cell_name(n, mode)
        print(f"[{i}/{len(configs)}] {name}: scoring on {num} images of {eval_data} ({split})")
        cells[name] = _evaluate_cell(out / "cells" / name / "final", cfg, name, n, mode, other, num, settings)
    result = _assemble(dest, recipe, base, tokens, modes, cells, settings)
    result["evaluated_on"] = source
    dest.mkdir(parents=True, exist_ok=True)
    finals = {m: out / "cells" / cell_name(tokens[0], m) / "final" for m in GRID_ORDER if m in modes}
    _grid(finals, other, dest / "grid.png", _device(base))
    _plots(dest, result)
    atomic_write_text(dest / "results.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(dest / "report.md", render_report(result))
    for line in result["verdicts"]:
        print(line)
    print(f"\nwrote {dest / 'report.md'}")
    return result


def _assemble(out: Path, recipe: str, base, tokens: list[int], modes: list[str], cells: dict[str, dict],
              eval_settings: dict) -> dict[str, Any]:
    """Tables and verdicts from the per-cell metrics."""
    numeric = {name: _numeric(c["metrics"]) for name, c in cells.items()}
    metrics = [k for k in next(iter(numeric.values())) if all(k in m for m in numeric.values())]
    by_mode = {m: {n: numeric[cell_name(n, m)] for n in tokens} for m in modes}
    claims = verdicts(by_mode, metrics)
    primary = primary_metrics(metrics)
    paper_rows, ablation_rows = [], []
    for metric in metrics:
        higher = higher_is_better(metric)
        label = f"{metric} ({'↑' if higher else '↓'})"
        for n in tokens:
            if "both" in modes and "none" in modes:
                t, b = by_mode["both"][n][metric], by_mode["none"][n][metric]
                paper_rows.append({"metric": label, "tokens": n, "no text": b, "text (both)": t,
                                   "relative gain": f"{relative_gain(t, b, higher) * 100:+.1f}%",
                                   "text better": "yes" if is_better(t, b, higher) else "no"})
            row = {"metric": label, "tokens": n}
            row.update({MODE_LABELS[m]: by_mode[m][n][metric] for m in ORDER_C3 if m in modes})
            row["best"] = MODE_LABELS[(max if higher else min)((m for m in modes), key=lambda m: by_mode[m][n][metric])]
            ablation_rows.append(row)
    reliance_rows = []
    for name, c in cells.items():
        wrong = c.get("metrics_wrong_caption")
        if not wrong:
            continue
        for metric in primary:
            right, bad = numeric[name][metric], wrong[metric]
            higher = higher_is_better(metric)
            reliance_rows.append({"cell": name, "metric": f"{metric} ({'↑' if higher else '↓'})", "right caption": right,
                                  "another image's caption": bad,
                                  "cost of the wrong caption": f"{relative_gain(right, bad, higher) * 100:+.1f}%"})
    first = next(iter(cells.values()))["metrics"]
    base_dict = base.to_dict()
    per_cell = {name: {"model.num_tokens": c["tokens"], "model.text_in_encoder": c["text_in_encoder"],
                       "model.text_in_decoder": c["text_in_decoder"],
                       **({"init_from": c["train_config"]["init_from"]} if c["train_config"].get("init_from") else {})}
                for name, c in cells.items()}
    return {
        "recipe": recipe, "data": base.data.source, "tokens": tokens, "modes": modes, "seed": base.seed,
        "data_seed": base.data.seed, "max_steps": base.max_steps, "batch_size": base.batch_size,
        "model": base.model, "eval": eval_settings, "metrics": metrics, "primary_metrics": primary,
        "higher_is_better": {m: higher_is_better(m) for m in metrics},
        "paper_table": paper_rows, "ablation_table": ablation_rows, "claims": claims,
        "text_reliance_table": reliance_rows,
        "verdicts": verdict_lines(claims, primary), "generation": "not run",
        "metric_notes": first.get("metric_notes", {}), "skipped": first.get("skipped", {}),
        "train_config": base_dict, "cell_overrides": per_cell,
        "cells": cells,
    }


def _with_generation(out: Path, result: dict[str, Any], settings, base, size: int, eval_settings: dict,
                     progress: bool) -> dict[str, Any]:
    """Run C4 and fold its verdict into the result."""
    from .study_generation import run_generation, sample_grid_png

    reference = held_out(base, size, settings.samples)
    gen = run_generation(out, result, settings, base, reference, eval_settings, _device(base), progress)
    gen["grid"] = sample_grid_png(gen, reference, out / "generation.png", _device(base)).name
    line = f"{gen['verdict']} ({gen['detail']})"
    return {**result, "generation": gen, "verdicts": verdict_lines(result["claims"], result["primary_metrics"], line)}


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", metric)


def _plots(out: Path, result: dict) -> None:
    for metric in result["metrics"]:
        series = {MODE_LABELS[m]: [(n, result["cells"][cell_name(n, m)]["metrics"][metric]) for n in result["tokens"]]
                  for m in ORDER_C3 if m in result["modes"]}
        higher = result["higher_is_better"][metric]
        line_plot(series, "tokens N", f"{metric} ({'higher' if higher else 'lower'} is better)",
                  out / f"plot_{_slug(metric)}.png", logx=True, title=f"{metric} vs token count")


@torch.no_grad()
def _grid(finals: dict[str, Path], val, path: Path, device: torch.device) -> None:
    """Originals and each mode's reconstructions at the smallest N, the first caption beside each row."""
    from .eval.reconstruction import reconstruct_batches

    count = min(GRID_IMAGES, len(val))
    columns: dict[str, torch.Tensor] = {}
    captions: list[str] = []
    for mode, final in finals.items():
        model = load_tokenizer(final).to(device).eval()
        x, recon, caps, _ = next(iter(reconstruct_batches(model, val, num=count, batch_size=count, device=device)))
        if not columns:
            columns["original"], captions = x.cpu(), caps
        columns[MODE_LABELS[mode]] = recon.cpu()
    captioned_grid(columns, captions, path)


def _fmt(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else v


def render_report(result: dict) -> str:
    """``report.md`` from a ``results.json`` dict."""
    cfg = result["train_config"]
    n0 = result["tokens"][0]
    ev = result["eval"]
    lines = [
        "# textok study: what text buys a 1D image tokenizer", "",
        f"Data `{result['data']}`, recipe `{result['recipe']}`, model `{result['model']}` with N ∈ "
        f"{{{_ns(result['tokens'])}}} tokens and text modes {', '.join(result['modes'])}. Every cell: the same "
        f"{result['max_steps']} steps × {result['batch_size']} images, training seed {result['seed']} "
        f"(data seed {result['data_seed']}); one caption per image picked at random each step. Evaluated on "
        f"{ev['val_num']} held-out images (split `{ev['val_split']}`"
        + (f" of `{result['evaluated_on']}`, a set the cells were not trained or tuned on" if result.get("evaluated_on")
           else "") + "), each with its first caption."
        + (f" A second training stage: every cell starts from the same cell of "
           f"`{Path(cfg['init_from']).parents[2]}`." if cfg.get("init_from") else ""), "",
        "## Claims (verdicts computed from the numbers below)", "",
    ]
    lines += [f"- {v}" for v in result["verdicts"]]
    lines += ["", "Per metric:", ""]
    rows = []
    for metric in result["metrics"]:
        c = result["claims"][metric]
        rows.append({"metric": metric, **{cid: f"{_word(c[cid]['holds'])}" for cid in ("C1", "C2", "C3")},
                     "C3 holds at N": _ns(c["C3"].get("holds_at", [])) or "—"})
    lines += [markdown_table(rows), ""]
    if result["paper_table"]:
        lines += ["## No text vs text (encoder + decoder), the paper's comparison", "",
                  "Relative gain: how much better text is, as a fraction of the no-text value (positive = text "
                  "better).", "", markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["paper_table"]]), ""]
    lines += ["## Ablation: where the text goes", "",
              markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["ablation_table"]]), ""]
    if result.get("text_reliance_table"):
        lines += ["## Does the tokenizer use the text?", "",
                  "Each text cell scored on the same images with the next image's caption instead of its own; the "
                  "cost is how much worse that is, as a fraction of the score with the wrong caption (0% = the text "
                  "is ignored).", "",
                  markdown_table([{k: _fmt(v) for k, v in r.items()} for r in result["text_reliance_table"]]), ""]
    lines += ["## Plots", ""]
    lines += [f"![{m} vs tokens](plot_{_slug(m)}.png)" for m in result["metrics"]]
    lines += ["", f"## Reconstructions at N={n0}", "",
              f"![original | {' | '.join(MODE_LABELS[m] for m in GRID_ORDER if m in result['modes'])}](grid.png)", ""]
    gen = result.get("generation")
    if isinstance(gen, dict):
        lines += _generation_section(gen)
    secs = {name: c.get("train_seconds") for name, c in result["cells"].items()}
    lines += ["Training time per cell (s; blank = trained in an earlier run): "
              + ", ".join(f"{k} {v if v is not None else ''}" for k, v in secs.items()), ""]
    if result["metric_notes"]:
        lines += ["## Notes on the metrics", ""] + [f"- **{k}**: {v}" for k, v in result["metric_notes"].items()] + [""]
    if result["skipped"]:
        lines += ["Not computed:", ""] + [f"- **{k}**: {v}" for k, v in result["skipped"].items()] + [""]
    lines += ["## Exact configuration", "",
              f"Shared training config (cell `{next(iter(result['cells']))}`; every cell's full config is in "
              "`results.json` and `cells/<cell>/train_config.json`):", "", "```json",
              json.dumps(cfg, indent=2, default=str), "```", "",
              "Per cell, only these differ:", "",
              markdown_table([{"cell": k, **v} for k, v in result["cell_overrides"].items()]), "",
              f"Evaluation: `{json.dumps(ev, default=str)}`", ""]
    return "\n".join(lines)


def _generation_section(gen: dict[str, Any]) -> list[str]:
    s = gen["settings"]
    kind = "text-to-image" if gen["text_to_image"] else "class-conditional"
    rows = []
    for name, run in gen["runs"].items():
        row = {"tokenizer": f"{name} ({MODE_LABELS[run['mode']]})"}
        row.update({f"{run['metric']} samples, seed {sd}": _fmt(v) for sd, v in zip(s["seeds"], run["sample_fd"])})
        row[f"{run['metric']} mean"] = _fmt(sum(run["sample_fd"]) / len(run["sample_fd"]))
        row[f"{run['metric']} reconstructions"] = _fmt(run["recon_fd"])
        row["generator train s"] = run.get("train_seconds") or ""
        rows.append(row)
    return ["## Generation (C4)", "",
            f"The same {kind} DiT (recipe `{Path(gen['recipe']).name}`) trained on the tokens of the best text "
            f"tokenizer at N={gen['tokens']} (`{gen['text_mode']}`, by the first headline metric) and of the no-text "
            f"one; {s['samples']} samples per sampling seed, each conditioned on the {s['condition']} "
            f"({s['sampling_steps']} steps, guidance {s['cfg_scale']}), scored against the {s['reference']}. "
            "'reconstructions' = the tokenizer's own reconstructions of the same images, the floor for a generator "
            "over its tokens. Each generator is trained once: the seed spread measures sampling noise only.", "",
            markdown_table(rows), "", f"Verdict: **{gen['verdict']}** — {gen['detail']}", "",
            f"![reference row, then samples per tokenizer]({gen.get('grid', 'generation.png')})", ""]


# ---- the verb -----------------------------------------------------------------------------------------
def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="'scenes' (embedded) or a path to a captioned folder/tar "
                   "(default: the recipe's)")
    p.add_argument("--out", required=True, help="study directory; re-running with the same --out resumes")
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="token counts N")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="text modes: both (encoder+decoder), encoder, decoder, none (the no-text baseline)")
    p.add_argument("--recipe", default=None, help="study-scenes | study-flickr | a YAML recipe "
                   "(default: study-scenes for --data scenes, else study-flickr)")
    p.add_argument("--steps", type=int, default=None, help="training steps per cell (default: the recipe's)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--val-num", type=int, default=None, help="held-out images to evaluate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="training seed shared by all cells (default: the recipe's)")
    p.add_argument("--fd-size", type=int, default=None,
                   help="open_nsfw input side for FD-opennsfw (default: the recipe's loss.perceptual_size)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights, for rFID")
    p.add_argument("--vgg16-weights", default=None, help="torchvision VGG16 weights, for LPIPS")
    p.add_argument("--init-from-study", default=None, metavar="DIR",
                   help="start every cell from the same cell of that finished study (a second stage, e.g. "
                        "loss.perceptual=opennsfw loss.adversarial.weight=0.05 after an l2 study)")
    p.add_argument("--eval-data", default=None, metavar="PATH",
                   help="train nothing: score the finished cells on another captioned folder/tar (resized to the "
                        "cells' image size) and write OUT/eval-<name>/report.md")
    p.add_argument("--eval-split", default="val", help="the split of --eval-data to score (default: val)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("generation (claim C4)")
    g.add_argument("--generation", action="store_true",
                   help="also train a small DiT on the tokens of the best text and the no-text tokenizer and compare samples")
    g.add_argument("--gen-tokens", type=int, default=None, help="the token count N to compare at (default: the smallest)")
    g.add_argument("--gen-recipe", default=None, help="generator recipe: study-dit (default) or a YAML GeneratorTrainConfig")
    g.add_argument("--gen-steps", type=int, default=None, help="generator training steps (default: the recipe's)")
    g.add_argument("--gen-samples", type=int, default=None,
                   help="samples per seed = held-out reference images (default: 1000, capped by the split)")
    g.add_argument("--gen-seeds", type=int, nargs="+", default=None, help="sampling seeds (default: 0 1)")
    g.add_argument("--gen-cfg", type=float, default=None, help="classifier-free guidance scale (default: 1.5)")
    g.add_argument("--gen-sampling-steps", type=int, default=None, help="sampler steps (default: 50)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training overrides for every cell, e.g. batch_size=64 model.token_channels=16")


@command("study", "TexTok vs the no-text baseline over token counts and text modes: trains a grid, reports the claims")
@args_for(_study_args)
def cmd_study(args: argparse.Namespace) -> None:
    run_study(args.out, data=args.data, tokens=args.tokens, modes=args.modes, recipe=args.recipe, steps=args.steps,
              image_size=args.image_size, val_num=args.val_num, seed=args.seed, fd_size=args.fd_size,
              inception_weights=args.inception_weights, vgg16_weights=args.vgg16_weights,
              overrides=args.overrides, progress=not args.no_progress, generation=_generation_settings(args),
              init_from_study=args.init_from_study, eval_data=args.eval_data, eval_split=args.eval_split)


def _generation_settings(args: argparse.Namespace):
    from .study_generation import GenerationSettings

    flags = {"tokens": "--gen-tokens", "recipe": "--gen-recipe", "steps": "--gen-steps", "samples": "--gen-samples",
             "seeds": "--gen-seeds", "cfg_scale": "--gen-cfg", "sampling_steps": "--gen-sampling-steps"}
    given = {"tokens": args.gen_tokens, "recipe": args.gen_recipe, "steps": args.gen_steps,
             "samples": args.gen_samples, "seeds": tuple(args.gen_seeds) if args.gen_seeds else None,
             "cfg_scale": args.gen_cfg, "sampling_steps": args.gen_sampling_steps}
    chosen = {k: v for k, v in given.items() if v is not None}
    if not args.generation:
        if chosen:
            raise ConfigError(f"{flags[next(iter(chosen))]} is given without --generation: add --generation "
                              "(or drop the --gen-* options)")
        return None
    return GenerationSettings(**chosen)


__all__ = ["MODES", "cell_config", "higher_is_better", "judge", "relative_gain", "render_report", "resolve_data",
           "run_study", "verdict_lines", "verdicts"]
