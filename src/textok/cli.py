"""The ``textok`` command: the table of verbs, and how one runs.

Each verb is a thin layer over the library or an application: the module that holds it adds its arguments and runs
it (parse, call one function, print a table). This file sits on top: nothing in textok imports it, and a new verb is
one row of :data:`VERBS`, which names the verb's module and functions rather than importing them: ``textok --help``
lists the verbs without loading torch, and a run imports only its own verb's module. Errors the user can fix
(``TextokError``, and what the file system refuses) are printed as one line and exit with status 2; Ctrl-C and
SIGTERM exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from collections.abc import Iterable
from typing import NamedTuple

from .errors import Interrupted, TextokError
from .io import target_of


class Verb(NamedTuple):
    help: str
    module: str  # the module that holds the verb, imported when the verb is parsed
    add_args: str  # its function (argparse.ArgumentParser) -> None that adds the verb's arguments
    run: str  # its function (argparse.Namespace) -> int | None that runs it

    def function(self, name: str):
        return getattr(importlib.import_module(self.module), name)


DEMOS, SERVE, STUDY = "textok.apps.demos.commands", "textok.apps.serve.commands", "textok.apps.study.commands"


VERBS: dict[str, Verb] = {
    "demo": Verb("the main job: train TexTok and the no-text baseline on the embedded scenes and compare them",
                 DEMOS, "demo_args", "cmd_demo"),
    "demo-gen": Verb("class-conditional generation demo: latents of the scenes -> a small DiT -> samples per class",
                     DEMOS, "demo_gen_args", "cmd_demo_gen"),
    "demo-titok": Verb("TiTok baseline demo: a small VQ tokenizer + MaskGIT on the scenes, samples per class",
                       DEMOS, "demo_titok_args", "cmd_demo_titok"),
    "demo-imagefolder": Verb("ImageFolder demo: a tiny product-quantized multi-scale tokenizer + its folded VAR on the "
                             "scenes, reconstructions per scale prefix, samples per class",
                             DEMOS, "demo_imagefolder_args", "cmd_demo_imagefolder"),
    "info": Verb("show the presets, or a parameter table per part of one preset", "textok.commands.models", "info_args",
                 "cmd_info"),
    "convert": Verb("convert a published checkpoint (TiTok, ...) into a textok model directory that every verb loads",
                    "textok.commands.convert", "convert_args", "cmd_convert"),
    "train-tokenizer": Verb("train (or resume) a tokenizer; final EMA weights go to OUT/final",
                            "textok.commands.train", "train_tokenizer_args", "cmd_train_tokenizer"),
    "reconstruct": Verb("encode and decode images with a trained tokenizer", "textok.commands.models", "reconstruct_args",
                        "cmd_reconstruct"),
    "eval": Verb("evaluate a tokenizer's reconstructions or generated samples (PSNR/SSIM/LPIPS/rFID, gFID/IS, "
                 "FD-opennsfw)", "textok.commands.evaluation", "eval_args", "cmd_eval"),
    "extract-latents": Verb("encode a dataset once with a tokenizer, for generator training",
                            "textok.commands.generate", "extract_latents_args", "cmd_extract_latents"),
    "train-generator": Verb("train (or resume) a DiT, MaskGIT or VAR on extracted latents; EMA weights go to OUT/final",
                            "textok.commands.train", "train_generator_args", "cmd_train_generator"),
    "sample": Verb("draw samples from a trained generator and decode them with its tokenizer (--npz under "
                   "torchrun: the processes share the work)", "textok.commands.generate", "sample_args", "cmd_sample"),
    "study": Verb("TexTok vs the no-text baseline over token counts and text modes: trains a grid, reports the "
                  "claims", STUDY, "study_args", "cmd_study"),
    "caption": Verb("caption an image folder, tar or shard directory with a local vision-language model (BLIP, LLaVA) "
                    "into captions.jsonl "
                    "(resumable; under torchrun the processes share the work)", "textok.commands.caption",
                    "caption_args", "cmd_caption"),
    "make-shards": Verb("convert an image folder / tar (or uncaptioned shards) + captions into webdataset shards for "
                        "streaming training",
                        "textok.commands.data", "make_shards_args", "cmd_make_shards"),
    "encode-captions": Verb("encode every caption of a data set once into the memory-mapped text-state store",
                            "textok.commands.data", "encode_captions_args", "cmd_encode_captions"),
    "serve": Verb("a local web page: reconstructions with and without text, caption swaps, token pictures, samples",
                  SERVE, "serve_args", "cmd_serve"),
    "bench": Verb("run a benchmark of the source checkout (prints a table, writes JSON to benchmarks/results/)",
                  "textok.commands.bench", "bench_args", "cmd_bench"),
}


THREADS_HELP = ("CPU threads for torch (default: the free physical cores, i.e. the usable cores less the load "
                "average; also TEXTOK_THREADS=N; OMP_NUM_THREADS is respected)")


def build_parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The command line; the ``verbs`` named (default: all) get their arguments, which imports their modules."""
    parser = argparse.ArgumentParser(prog="textok", description="Text-conditioned image tokenization and generation.")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    every_verb = argparse.ArgumentParser(add_help=False)  # --threads after the verb too
    every_verb.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    wanted = set(VERBS if verbs is None else verbs)
    for name, verb in VERBS.items():
        verb_parser = sub.add_parser(name, help=verb.help, description=verb.help, parents=[every_verb])
        if name in wanted:
            verb.function(verb.add_args)(verb_parser)
    return parser


def _verb_of(argv: list[str]) -> list[str]:
    """The verb a command line runs (the first word that names one; none for ``textok --help``), as the list
    :func:`build_parser` takes."""
    return next(([word] for word in argv if word in VERBS), [])


def _raise_interrupted(signum, frame) -> None:  # noqa: ANN001
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Exit status: 0 done, 2 an error stated in one line, 130 / 143 interrupted by Ctrl-C /
    SIGTERM (a training run saves a checkpoint first)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_verb_of(argv))
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
        from .threads import set_threads  # imports torch: only once a verb runs, so that --help stays instant

        set_threads(args.threads)
        verb = VERBS[args.verb]
        result = verb.function(verb.run)(args)
        return int(result or 0)
    except TextokError as err:
        print(f"textok {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system said no: a read-only or missing directory, a full disk, ...
        where = f": {target_of(err.filename)}" if err.filename else ""  # the output, not its temporary name
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


if __name__ == "__main__":  # pragma: no cover  (python -m textok.cli, torchrun -m textok.cli)
    sys.exit(main())
