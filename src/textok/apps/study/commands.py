"""The ``study`` verb: TexTok vs the no-text baseline over token counts and text modes."""

from __future__ import annotations

import argparse

from ...errors import ConfigError
from ...io import check_output
from .run import run_study
from .settings import DEFAULT_BOOTSTRAP, DEFAULT_TOKENS, MODES, GenerationSettings, StudySettings

STUDY_MARKERS = ("cells", "results.json")  # what makes a folder a study (cells/ appears with the first cell)
STUDY_EARLY = ("text_cache.safetensors",)  # what a study writes before its first cell


def study_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="R",
                   help="paired bootstrap resamplings of the evaluation images for the verdicts' intervals "
                        f"(default {DEFAULT_BOOTSTRAP}; 0 = none: every verdict decided by the point values)")
    p.add_argument("--replicate", action="append", default=[], metavar="DIR",
                   help="a finished study of the same cells with another training seed (--seed); repeatable: a "
                        "comparison whose sign differs between the seeds is undecided")
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
    g.add_argument("--gen-condition", choices=("auto", "class", "text"), default=None,
                   help="class-conditional, or text-to-image on each held-out image's first caption (default: auto, "
                        "class when the data has classes)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training overrides for every cell, e.g. batch_size=64 model.token_channels=16")


def cmd_study(args: argparse.Namespace) -> None:
    inputs = [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in (
        "data", "recipe", "init_from_study", "eval_data", "inception_weights", "vgg16_weights", "gen_recipe")]
    check_output(args.out, inputs, kind="run", markers=STUDY_MARKERS, what="textok study", ignore=STUDY_EARLY)
    settings = StudySettings(data=args.data, tokens=args.tokens, modes=args.modes, recipe=args.recipe,
                             steps=args.steps, image_size=args.image_size, val_num=args.val_num, seed=args.seed,
                             fd_size=args.fd_size, inception_weights=args.inception_weights,
                             vgg16_weights=args.vgg16_weights, overrides=args.overrides,
                             generation=_generation_settings(args), init_from_study=args.init_from_study,
                             eval_data=args.eval_data, eval_split=args.eval_split, bootstrap=args.bootstrap,
                             replicates=tuple(args.replicate))
    run_study(args.out, settings, progress=not args.no_progress)


def _generation_settings(args: argparse.Namespace) -> GenerationSettings | None:
    flags = {"tokens": "--gen-tokens", "recipe": "--gen-recipe", "steps": "--gen-steps", "samples": "--gen-samples",
             "seeds": "--gen-seeds", "cfg_scale": "--gen-cfg", "sampling_steps": "--gen-sampling-steps",
             "condition": "--gen-condition"}
    given = {"tokens": args.gen_tokens, "recipe": args.gen_recipe, "steps": args.gen_steps,
             "samples": args.gen_samples, "seeds": tuple(args.gen_seeds) if args.gen_seeds else None,
             "cfg_scale": args.gen_cfg, "sampling_steps": args.gen_sampling_steps, "condition": args.gen_condition}
    chosen = {k: v for k, v in given.items() if v is not None}
    if not args.generation:
        if chosen:
            raise ConfigError(f"{flags[next(iter(chosen))]} is given without --generation: add --generation "
                              "(or drop the --gen-* options)")
        return None
    return GenerationSettings(**chosen)
