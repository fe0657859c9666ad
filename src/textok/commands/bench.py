"""``bench``: run a benchmark script of the source checkout (they ship with it, not with the package)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..errors import TextokError

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["train-step", "sampling"], help="benchmarks/train_step.py or benchmarks/sampling.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")


def cmd_bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS / f"{args.which.replace('-', '_')}.py"
    if not script.is_file():
        raise TextokError(f"{script} not found: the benchmarks ship with the source checkout, not the installed package")
    return subprocess.call([sys.executable, str(script), *args.args])
