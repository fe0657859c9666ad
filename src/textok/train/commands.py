"""CLI verb of the training side: ``train-tokenizer``."""

from __future__ import annotations

import argparse

from ..cli import args_for, command


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="textok-demo",
                   help="a recipe in textok/configs (e.g. demo), a YAML/JSON recipe file, or a tokenizer preset")
    p.add_argument("--out", required=True, help="run directory; re-running with the same --out resumes")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to OUT/log.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. batch_size=64 optim.lr=2e-4 loss.perceptual=none model.num_tokens=64")


@command("train-tokenizer", "train (or resume) a tokenizer; final EMA weights go to OUT/final")
@args_for(_train_args)
def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .config import load_train_config
    from .tokenizer import train_tokenizer

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.ckpt_every is not None:
        overrides.append(f"ckpt_every={args.ckpt_every}")
    cfg = load_train_config(args.config, overrides)
    final = train_tokenizer(cfg, args.out, progress=not args.no_progress)
    if final.is_dir():
        print(f"final EMA weights: {final}")
