"""The verb table names modules and functions instead of importing them: `textok --help` lists every verb without
loading torch, `textok VERB --help` shows that verb's own options, and every row resolves."""

from __future__ import annotations

import subprocess
import sys

from textok.cli import VERBS, build_parser

HELP = """
import contextlib, io, sys
from textok.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(out.getvalue())
print("torch loaded:", "torch" in sys.modules)
"""


def _help(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", HELP, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_verb_without_loading_torch():
    out = _help("--help")
    assert all(name in out for name in VERBS)
    assert "torch loaded: False" in out


def test_a_verbs_help_shows_its_options():
    out = _help("sample", "--help")
    assert "--top-k" in out and "--generator" in out


def test_every_row_names_real_functions():
    for name, verb in VERBS.items():
        assert callable(verb.function(verb.add_args)) and callable(verb.function(verb.run)), name
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == set(VERBS)
    assert {o for a in sub.choices["train-generator"]._actions for o in a.option_strings} >= {"--kind", "--latents"}
