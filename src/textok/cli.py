"""The ``textok`` command.

Each verb is a thin layer over the library: parse arguments, call one function, print a table. Errors the
user can fix (``TextokError``, and what the file system refuses) are printed as one line and exit with status
2; Ctrl-C and SIGTERM exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Callable

from .errors import Interrupted, TextokError
from .report import print_table

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def command(name: str, help: str):  # noqa: A002
    """Register ``fn(args)`` as verb ``name``; its ``add_args`` is attached by :func:`args_for`."""

    def deco(fn):
        COMMANDS[name] = (help, getattr(fn, "_add_args", lambda p: None), fn)
        return fn

    return deco


def args_for(add: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        fn._add_args = add
        return fn

    return deco


# ---- info ---------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a preset name (omit to list them all)")


@command("info", "show the presets, or a parameter table per part of one preset")
@args_for(_info_args)
def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .models.textok import TexTok, TexTokConfig

    if not args.preset:
        print("TexTok presets:", ", ".join(TexTokConfig.presets()))
        return
    cfg = TexTokConfig.preset(args.preset)
    with torch.device("meta"):
        model = TexTok(cfg)
    counts = model.num_parameters()
    rows = [{"part": k, "parameters": f"{v:,}", "millions": f"{v / 1e6:.2f}"} for k, v in counts.items()]
    print(f"{args.preset}: {cfg.image_size}px, patch {cfg.patch_size}, {cfg.num_tokens} tokens x {cfg.token_channels} "
          f"channels, text in encoder={cfg.text_in_encoder} decoder={cfg.text_in_decoder} ({cfg.text_encoder})")
    print_table(rows)
    print(f"forward GFLOPs per image (32 text tokens): {model.flops_per_image(32) / 1e9:.2f}")


# ---- reconstruct --------------------------------------------------------------------------------
def _reconstruct_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a from_pretrained directory (config.json + model.safetensors)")
    p.add_argument("--image", required=True, nargs="+", help="one or more image files")
    p.add_argument("--caption", nargs="+", default=None, help="one caption per image (quote each)")
    p.add_argument("--out", required=True, help="output PNG (originals on the top row, reconstructions below)")


@command("reconstruct", "encode and decode images with a trained tokenizer")
@args_for(_reconstruct_args)
def cmd_reconstruct(args: argparse.Namespace) -> None:
    import torch

    from pathlib import Path

    from .data.images import check_output_image, load_image, save_image
    from .models.textok import TexTok
    from .text.encoders import check_captions

    check_output_image(args.out)  # before any work
    if Path(args.out).resolve() in {Path(p).resolve() for p in args.image}:
        raise TextokError(f"--out {args.out} is one of the input images; write the grid to another file")
    if args.caption is not None:
        check_captions(args.caption)
    model = TexTok.from_pretrained(args.model).eval()
    images = torch.stack([load_image(p, model.config.image_size) for p in args.image])
    captions = args.caption
    if model.config.uses_text and captions is None:
        raise TextokError("this tokenizer uses text: pass --caption with one caption per image")
    if captions is not None and len(captions) != len(args.image):
        raise TextokError(f"got {len(captions)} captions for {len(args.image)} images: give one --caption per image")
    with torch.no_grad():
        recon, z = model(images, captions)
    save_image(torch.cat([images, recon]), args.out, nrow=len(images))
    mse = torch.mean((recon.clamp(-1, 1) - images) ** 2, dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse)
    for path, p in zip(args.image, psnr.tolist()):
        print(f"{path}: PSNR {p:.2f} dB, tokens {tuple(z.shape[1:])}")
    print(f"wrote {args.out}")


# ---- bench --------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["train-step", "sampling"], help="benchmarks/train_step.py or benchmarks/sampling.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")


@command("bench", "run a benchmark of the source checkout (prints a table, writes JSON to benchmarks/results/)")
@args_for(_bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.which.replace('-', '_')}.py"
    if not script.is_file():
        raise TextokError(f"{script} not found: the benchmarks ship with the source checkout, not the installed package")
    return subprocess.call([sys.executable, str(script), *args.args])


# ---- entry point --------------------------------------------------------------------------------
def _load_verbs() -> None:
    """Import the modules that register the heavier verbs (training, evaluation, generation)."""
    import importlib

    for module in ("textok.train.commands", "textok.eval.commands", "textok.generate.commands",
                   "textok.data_commands", "textok.apps.demos.commands", "textok.apps.study.commands",
                   "textok.apps.serve.command"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):  # the verb module itself is absent
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_verbs()
    parser = argparse.ArgumentParser(prog="textok", description="Text-conditioned image tokenization and generation.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
    return parser


def _raise_interrupted(signum, frame) -> None:  # noqa: ANN001
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Exit status: 0 done, 2 an error stated in one line, 130 / 143 interrupted by Ctrl-C /
    SIGTERM (a training run saves a checkpoint first)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse only takes the first run of positionals)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verb:
        parser.print_help()
        return 0
    # Warnings are one line each, like errors.
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"textok {args.verb}: warning: {message}\n"
    # SIGTERM raises like Ctrl-C, so the same clean-up runs (temporary files removed, training saves).
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread
        previous = None
    try:
        result = COMMANDS[args.verb][2](args)
        return int(result or 0)
    except TextokError as err:
        print(f"textok {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no: a read-only or missing directory, a full disk, ...
        where = f": {err.filename}" if err.filename else ""
        print(f"textok {args.verb}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, Interrupted):
            print(f"textok {args.verb}: {err}", file=sys.stderr)
            return err.exit_code
        print(f"textok {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    # `python -m textok.cli` (and `torchrun -m textok.cli`) runs this file as __main__, but the verb modules
    # register themselves in `textok.cli`: run that module's main, not this copy's.
    from textok.cli import main as textok_main

    sys.exit(textok_main())
