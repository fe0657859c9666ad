"""Claim C4 of ``textok study --generation``: do the text tokenizer's tokens give better generation?

At one token count N (default: the study's smallest, where the paper's gain is largest) it takes the best
text tokenizer (the text mode with the best headline reconstruction metric) and the no-text baseline, and for
each, with the same recipe, seed and data:

1. encodes the training split into latents (:func:`textok.generate.latents.extract_latents`);
2. trains the same small DiT on them (:func:`textok.train.generator.train_generator`; recipe
   ``configs/study-dit.yaml``): class-conditional when the data has classes, else text-to-image;
3. draws one sample per held-out reference image, conditioned on that image's class (the decoder of a text
   tokenizer then gets a caption from the class's bank) or on its first caption (text-to-image, the prompt is
   also the decoder's caption), once per sampling seed;
4. scores the samples against the reference images (gFID with the real Inception weights, else FD-opennsfw),
   and, for scale, the tokenizer's own reconstructions of the same images: the floor a generator over these
   tokens can reach.

The verdict compares the mean sample FD over seeds; a gap smaller than the spread between sampling seeds is
"inconclusive". Only sampling noise is measured: each generator is trained once.

Resumable like the study: latents are reused when they came from the same tokenizer and data, a generator run
resumes (or is skipped when finished), and the evaluation is cached in ``eval.json`` per settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ...data.images import save_image
from ...errors import ConfigError, TextokError
from ...eval.compare import higher_is_better
from ...eval.generation import evaluate_samples
from ...eval.reconstruction import reconstruct_batches
from ...generate.latents import extract_latents, read_meta
from ...generate.sampling import GenerationPipeline
from ...io import atomic_write_text
from ...models.registry import load_tokenizer
from ...train.config import RECIPES, load_generator_config
from ...train.generator import train_generator
from .claims import judge_generation
from .settings import DEFAULT_GENERATOR_RECIPE, GenerationSettings


def recipe_path(recipe: str) -> str:
    """A packaged generator recipe name or a YAML file -> a file path (an unknown name is an error)."""
    if (RECIPES / f"{recipe}.yaml").is_file():
        return str(RECIPES / f"{recipe}.yaml")
    if Path(recipe).is_file():
        return recipe
    raise ConfigError(f"--gen-recipe {recipe!r} is neither a recipe in textok/configs nor a YAML file "
                      f"(default: {DEFAULT_GENERATOR_RECIPE})")


def check_settings(settings: GenerationSettings, tokens: list[int], modes: list[str]) -> None:
    """Refuse a C4 request the study cannot serve before any training starts."""
    recipe_path(settings.recipe)
    if "none" not in modes or not [m for m in modes if m != "none"]:
        raise ConfigError("--generation compares a text tokenizer with the no-text one: --modes must include none "
                          "and at least one of both/encoder/decoder")
    if settings.tokens is not None and settings.tokens not in tokens:
        raise ConfigError(f"--gen-tokens {settings.tokens} is not one of the study's token counts "
                          f"({', '.join(map(str, tokens))})")


def pick_modes(result: dict[str, Any], tokens: int) -> tuple[str, str]:
    """(best text mode at ``tokens`` by the first headline metric, "none"); see :func:`check_settings`."""
    text_modes = [m for m in result["modes"] if m != "none"]
    metric = result["primary_metrics"][0] if result["primary_metrics"] else result["metrics"][0]
    higher = higher_is_better(metric)
    value = {m: result["cells"][f"n{tokens}-{m}"]["metrics"][metric] for m in text_modes}
    return (max if higher else min)(text_modes, key=value.__getitem__), "none"


def run_generation(out: Path, result: dict[str, Any], settings: GenerationSettings, base, reference,
                   eval_settings: dict[str, Any], device: torch.device, progress: bool) -> dict[str, Any]:
    """Train, sample and score a generator over the best text tokenizer and the no-text one (see module doc).

    ``base`` is the study's shared training config (data source, seed); ``reference`` the held-out images.
    Returns the ``generation`` record of ``results.json``.
    """
    n = settings.tokens if settings.tokens is not None else result["tokens"][0]
    text_mode, base_mode = pick_modes(result, n)
    num = min(settings.samples, len(reference))
    if num < 2:
        raise TextokError(f"the held-out split has {len(reference)} images: too few to score generation")
    recipe = recipe_path(settings.recipe)
    classes = len(getattr(reference, "class_names", []) or [])
    if settings.condition == "class" and not classes:
        raise TextokError("--gen-condition class: the held-out images have no class labels; use text (or auto)")
    text_to_image = settings.condition == "text" or (settings.condition == "auto" and not classes)
    sample_settings = {"samples": num, "seeds": list(settings.seeds), "sampling_steps": settings.sampling_steps,
                       "sampler": "the generator recipe's (default: euler for flow, ddpm for ddpm)",
                       "cfg_scale": settings.cfg_scale,
                       "condition": "first caption of each reference image" if text_to_image
                       else "class of each reference image", "reference": f"{eval_settings['val_split']} split, "
                       f"first {num} images", "fd_size": eval_settings["fd_size"],
                       "inception_weights": eval_settings["inception_weights"]}
    runs: dict[str, dict[str, Any]] = {}
    for mode in (text_mode, base_mode):
        name = f"n{n}-{mode}"
        tok_final = out / "cells" / name / "final"
        run = out / "generation" / name
        print(f"\n[C4] {name}: {'text-to-image' if text_to_image else 'class-conditional'} generator over "
              f"the tokens of {tok_final}")
        lat_dir = _latents(run / "latents", tok_final, base, progress)
        cfg = load_generator_config(recipe, {"latents": str(lat_dir.resolve()), "text": text_to_image,
                                             "text_cache": str((out / "text_cache.safetensors").resolve()),
                                             **({"max_steps": settings.steps} if settings.steps is not None else {})})
        runs[name] = _train_and_score(run, cfg, tok_final, reference, num, settings, sample_settings, device,
                                      progress, mode)
    t, b = runs[f"n{n}-{text_mode}"], runs[f"n{n}-{base_mode}"]
    verdict = judge_generation(t, b, text_mode, n)
    return {"tokens": n, "text_mode": text_mode, "baseline_mode": base_mode, "recipe": recipe,
            "text_to_image": text_to_image, "settings": sample_settings, "runs": runs, **verdict}


def _identity(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A generator config as JSON, without the paths that do not change what it learns."""
    out = json.loads(json.dumps(cfg_dict, default=str))
    return {k: v for k, v in out.items() if k not in ("latents", "text_cache")}


def _latents(lat_dir: Path, tok_final: Path, base, progress: bool) -> Path:
    """The training split's latents under this tokenizer, extracted once."""
    want = {"data": base.data.source, "split": "train", "num": base.data.train_size, "seed": base.data.seed}
    if (lat_dir / "meta.json").is_file():
        meta = read_meta(lat_dir)
        if meta["tokenizer_dir"] == str(tok_final.resolve()) and meta["dataset"] == want:
            return lat_dir
    t0 = time.time()
    extract_latents(tok_final, base.data.source, lat_dir, split="train", num=base.data.train_size, batch_size=64,
                    seed=base.data.seed, device="cpu" if base.device == "cpu" else "auto", progress=progress)
    print(f"[C4] latents of {read_meta(lat_dir)['count']} training images in {time.time() - t0:.0f} s")
    return lat_dir


def _conditions(reference, num: int, text_to_image: bool
                ) -> tuple[list[int] | None, list[str] | None, list[set[str]] | None]:
    """The class / first caption of each of the first ``num`` reference images (unreadable ones skipped), and
    for class-conditional samples each image's own captions, which its sample is not decoded with (the
    paper's protocol: a caption from the class bank that is not one of the image's)."""
    labels: list[int] = []
    prompts: list[str] = []
    own: list[set[str]] = []
    for i in range(num):
        item = reference[i]
        if item is None:
            continue
        labels.append(int(item["label"]))
        prompts.append(item["captions"][0])
        own.append(set(item["captions"]))
    return (None, prompts, None) if text_to_image else (labels, None, own)


def _train_and_score(run: Path, cfg, tok_final: Path, reference, num: int, settings: GenerationSettings,
                     sample_settings: dict[str, Any], device: torch.device, progress: bool, mode: str
                     ) -> dict[str, Any]:
    eval_path = run / "eval.json"
    cfg_dict = _identity(cfg.to_dict())
    cached = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    gen_final = run / "dit" / "final"
    if (cached and cached.get("generator_config") == cfg_dict and cached.get("settings") == sample_settings
            and (gen_final / "model.safetensors").is_file()):
        print(f"[C4] {run.name}: done (cached in {eval_path})")
        return cached
    old_cfg = run / "dit" / "train_config.json"
    if old_cfg.is_file():
        if _identity(json.loads(old_cfg.read_text())) != cfg_dict:
            raise TextokError(f"the generator in {run / 'dit'} was trained with another config: use the original "
                              "--gen-* options, another --out, or delete that directory")
    t0 = time.time()
    if not (gen_final / "model.safetensors").is_file():
        print(f"[C4] training the generator ({cfg.max_steps} steps of {cfg.batch_size})")
        gen_final = train_generator(cfg, run / "dit", progress=progress)
        if not (gen_final / "model.safetensors").is_file():
            raise TextokError("generator training stopped before max_steps; run the same command again to resume")
    train_seconds = round(time.time() - t0, 1)

    ref_stats = run / "reference_stats.npz"
    eval_kw = {"device": device, "inception_weights": sample_settings["inception_weights"],
               "fd_size": sample_settings["fd_size"], "batch_size": settings.batch_size, "progress": False}
    tok = load_tokenizer(tok_final).eval().to(device)
    recon = (r for _, r, _, _ in reconstruct_batches(tok, reference, num=num, batch_size=settings.batch_size,
                                                       device=device))
    recon_eval = evaluate_samples(recon, reference, num=num, ref_num=num, save_ref_stats=ref_stats, **eval_kw)
    metric = next(k for k in recon_eval if k in ("gFID",) or k.startswith("FD-"))
    del tok

    pipe = GenerationPipeline(gen_final, tok_final, device=str(device))
    labels, prompts, own = _conditions(reference, num, pipe.is_text_to_image)
    sample_fd, sample_evals, t1 = [], [], time.time()
    for seed in settings.seeds:
        batches = pipe.iter_samples(num, labels, prompts, batch_size=settings.batch_size,
                                    steps=settings.sampling_steps, cfg_scale=settings.cfg_scale, seed=seed,
                                    exclude_captions=own)
        ev = evaluate_samples(batches, str(ref_stats), num=num, **eval_kw)
        sample_fd.append(float(ev[metric]))
        sample_evals.append({k: v for k, v in ev.items() if k not in ("skipped", "metric_notes")})
        print(f"[C4] {run.name} seed {seed}: {metric} {ev[metric]:.2f} over {num} samples")
    record = {"mode": mode, "tokenizer": str(tok_final), "generator": str(gen_final), "metric": metric,
              "sample_fd": sample_fd, "recon_fd": float(recon_eval[metric]), "samples": sample_evals,
              "train_seconds": train_seconds if train_seconds > 1 else None,
              "sample_seconds": round(time.time() - t1, 1), "generator_config": cfg_dict,
              "settings": sample_settings, "metric_notes": recon_eval.get("metric_notes", {})}
    atomic_write_text(eval_path, json.dumps(record, indent=2, default=str))
    return record


@torch.no_grad()
def sample_grid_png(generation: dict[str, Any], reference, path: Path, device: torch.device, per_row: int = 8) -> Path:
    """One row per tokenizer of samples for the first ``per_row`` reference conditions, under a row of the
    reference images themselves."""
    items = [it for it in (reference[i] for i in range(min(per_row, len(reference)))) if it is not None]
    rows = [torch.stack([it["image"] for it in items])]
    k = rows[0].shape[0]
    for name, run in generation["runs"].items():
        pipe = GenerationPipeline(run["generator"], run["tokenizer"], device=str(device))
        labels, prompts, own = _conditions(reference, k, pipe.is_text_to_image)
        rows.append(pipe.generate(labels, prompts, steps=generation["settings"]["sampling_steps"],
                                  cfg_scale=generation["settings"]["cfg_scale"], seed=0, exclude_captions=own).cpu())
    save_image(torch.cat(rows), str(path), nrow=k)
    return path


__all__ = ["check_settings", "pick_modes", "recipe_path", "run_generation", "sample_grid_png"]
