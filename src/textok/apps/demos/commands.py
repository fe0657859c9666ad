"""The demos' verbs: ``demo``, ``demo-gen``, ``demo-titok`` and ``demo-imagefolder``."""

from __future__ import annotations

import argparse

from ...errors import TextokError
from ...io import check_output
from .generation import run_demo_gen
from .imagefolder import run_demo_imagefolder
from .titok import run_demo_titok
from .tokenizers import run_demo


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="a minimal run (for tests): few steps, few images")
    p.add_argument("--recipe", default="demo", choices=("demo", "demo-quick"),
                   help="demo (the main job, minutes) or demo-quick (the same comparison in about a minute of one core)")


def cmd_demo(args: argparse.Namespace) -> None:
    check_output(args.out, kind="folder")
    run_demo(args.out, steps=args.steps, quick=args.quick, recipe=args.recipe)


def demo_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="runs/demo/textok/final", help="a trained tokenizer (from `textok demo`)")
    p.add_argument("--out", default="runs/demo-gen")
    p.add_argument("--steps", type=int, default=None, help="generator training steps")
    p.add_argument("--quick", action="store_true", help="a minimal run (for tests)")


def cmd_demo_gen(args: argparse.Namespace) -> None:
    check_output(args.out, [("--tokenizer", args.tokenizer)], kind="folder")
    run_demo_gen(args.tokenizer, args.out, steps=args.steps, quick=args.quick)


def demo_titok_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo-titok", help="output directory; re-running with the same --out resumes")
    p.add_argument("--steps", type=int, default=None, help="TiTok training steps (default: the recipe's)")
    p.add_argument("--gen-steps", type=int, default=None, help="MaskGIT training steps (default 2000)")
    p.add_argument("--compare", default="runs/demo",
                   help="a `textok demo` output directory to compare with (skipped if it has no metrics.json)")
    p.add_argument("--quick", action="store_true", help="a minimal run (for tests)")


def cmd_demo_titok(args: argparse.Namespace) -> None:
    for name in ("steps", "gen_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TextokError(f"--{name.replace('_', '-')} {value} must be positive")
    check_output(args.out, kind="folder")
    run_demo_titok(args.out, steps=args.steps, gen_steps=args.gen_steps, quick=args.quick,
                   compare=args.compare or None)


def demo_imagefolder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo-imagefolder",
                   help="output directory; re-running with the same --out resumes")
    p.add_argument("--steps", type=int, default=None, help="ImageFolder training steps (default: the recipe's)")
    p.add_argument("--gen-steps", type=int, default=None, help="VAR training steps (default 1000)")
    p.add_argument("--no-compare", action="store_true",
                   help="no table beside runs/demo and runs/demo-titok (they join it when their metrics.json exists)")
    p.add_argument("--quick", action="store_true", help="a minimal run (for tests)")


def cmd_demo_imagefolder(args: argparse.Namespace) -> None:
    for name in ("steps", "gen_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TextokError(f"--{name.replace('_', '-')} {value} must be positive")
    check_output(args.out, kind="folder")
    run_demo_imagefolder(args.out, steps=args.steps, gen_steps=args.gen_steps, quick=args.quick,
                         compare=not args.no_compare)
