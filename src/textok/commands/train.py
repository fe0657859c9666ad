"""Training verbs: ``train-tokenizer`` and ``train-generator`` (both resume when run again with the same --out)."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import split_assignment
from ..models.kinds import CODE_FORMS
from ..models.registry import GENERATOR_KINDS
from ..train.config import load_generator_config, load_train_config
from ..train.generator import train_generator
from ..train.rundir import check_run_directory
from ..train.tokenizer import train_tokenizer


def train_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="textok-demo",
                   help="a recipe in textok/configs (e.g. demo), a YAML/JSON recipe file, or a tokenizer preset")
    p.add_argument("--out", required=True, help="run directory; re-running with the same --out resumes")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to OUT/log.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. batch_size=64 optim.lr=2e-4 loss.perceptual=none model.num_tokens=64")


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    cfg = load_train_config(args.config, with_flags(args, "max_steps", "ckpt_every"))
    check_run_directory(args.out, [("data.source", cfg.data.source), ("data.captions_file", cfg.data.captions_file),
                                   ("data.caption_bank", cfg.data.caption_bank), ("init_from", cfg.init_from)])
    final = train_tokenizer(cfg, args.out, progress=not args.no_progress)
    if final.is_dir():
        print(f"final EMA weights: {final}")


def train_generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latents", required=True, help="a directory written by `textok extract-latents`")
    p.add_argument("--out", required=True, help="run directory; re-running with the same --out resumes")
    p.add_argument("--kind", choices=tuple(GENERATOR_KINDS), default=None,
                   help="a generator kind: " + ", ".join(f"{name} ({CODE_FORMS[k.consumes]})"
                                                         for name, k in GENERATOR_KINDS.items())
                        + "; default: dit, or the kind of the --config preset")
    p.add_argument("--config", default=None,
                   help="a DiT/MaskGIT/VAR preset (dit-tiny, dit-b, maskgit-tiny, maskgit-b, var-tiny, var-s-32, "
                        "var-imagefolder-b-256, ...) or a YAML/JSON training config")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. batch_size=64 optim.lr=2e-4 diffusion=flow text=true model.depth=4")


def cmd_train_generator(args: argparse.Namespace) -> None:
    overrides = [("latents", args.latents), *with_flags(args, "max_steps", "ckpt_every")]
    cfg = load_generator_config(args.config, overrides, kind=args.kind)
    check_run_directory(args.out, [("--latents", cfg.latents)])
    final = train_generator(cfg, args.out, progress=not args.no_progress)
    if final.is_dir():
        print(f"final EMA generator: {final}")


def with_flags(args: argparse.Namespace, *flags: str) -> list[tuple[str, Any]]:
    """The command line's ``key=value`` overrides, then those of ``flags`` that were given, typed
    (``--max-steps 10`` -> ``("max_steps", 10)``). Applied in order: every ``key=value`` is still checked, and a
    flag wins over the same key given as ``key=value``."""
    overrides = [split_assignment(o) for o in args.overrides]
    return overrides + [(flag, getattr(args, flag)) for flag in flags if getattr(args, flag) is not None]
