"""docs/REPRODUCE.md as written: every command parses with textok's own parser and loads its configuration (a flag,
preset or override that does not exist fails here), the chain has every step, and the throughputs it computes
with are the ones in benchmarks/results. The chain itself runs at toy size in test_pipeline_e2e.py.

A dry run, by design: the commands name ImageNet-scale data and models; what is substituted is only the shell
variables (each replaced by the path the doc assigns it, which need not exist)."""

from __future__ import annotations

import json
import re
import shlex
import string
from pathlib import Path

import pytest

from textok.cli import build_parser
from textok.commands.train import with_flags
from textok.data.captioning import PROMPT_FIELDS
from textok.models.registry import resolve_tokenizer_config
from textok.train.config import load_generator_config, load_train_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REPRODUCE.md"
CHAIN = ["caption", "make-shards", "encode-captions", "train-tokenizer", "eval", "extract-latents", "train-generator",
         "sample", "eval"]


def doc_commands() -> tuple[dict[str, str], list[list[str]]]:
    """(the variables the doc assigns, every textok command as argv after the verb's program) in page order."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    variables: dict[str, str] = {}
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            argv = shlex.split(re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: variables[m[1]], line))
            if argv[0] == "torchrun":
                assert argv[1:3] == ["--nproc_per_node", "8"] and argv[3:5] == ["-m", "textok.cli"], line
                argv = ["textok", *argv[5:]]
            assert argv[0] == "textok", f"not a textok command: {line}"
            commands.append(argv[1:])
    return variables, commands


def test_the_doc_runs_the_whole_chain_in_order():
    variables, commands = doc_commands()
    assert [c[0] for c in commands] == CHAIN
    assert set(variables) == {"DATA", "VLM", "T5", "INCEPTION", "REF", "RUNS"}


@pytest.mark.parametrize("index", range(len(CHAIN)))
def test_each_command_parses_and_its_configuration_loads(index):
    argv = doc_commands()[1][index]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # an unknown flag or a bad value exits here
    args.overrides = getattr(args, "overrides", []) + extra
    assert all("=" in e for e in extra), extra
    if args.verb == "train-tokenizer":
        cfg = load_train_config(args.config, with_flags(args, "max_steps", "ckpt_every"))
        _, model = resolve_tokenizer_config(cfg.model, cfg.model_overrides)  # every model.KEY override applied
        assert (model.image_size, model.patch_size, model.num_tokens, model.token_channels) == (256, 16, 64, 8)
        assert model.text_encoder.startswith("t5:") and model.text_dim == 2048 and cfg.max_steps == 250_000
    elif args.verb == "train-generator":
        cfg = load_generator_config(args.config, [("latents", args.latents), *with_flags(args, "max_steps")])
        assert cfg.kind == "dit" and cfg.model == "dit-xl" and cfg.max_steps == 350 * 1_281_167 // 256 + 1
    elif args.verb == "caption":
        for template in args.prompt:
            assert {f for _, f, _, _ in string.Formatter().parse(template) if f} <= set(PROMPT_FIELDS)


def test_the_costs_quote_the_measured_throughputs():
    rows = {r["row"]: r["images_per_s"] for r in json.loads(
        (ROOT / "benchmarks/results/gpu-suite-h200-run1/gpu_suite.json").read_text())["phases"]["b"]["rows"]}
    text = DOC.read_text()
    quoted = re.search(r"Measured throughputs.*?\n\n(\|.*?)\n\n", text, flags=re.S)[1]
    numbers = [float(n.replace(",", "")) for n in re.findall(r"\| ([\d,]+\.\d) \|", quoted)]
    assert len(numbers) == 6 and all(any(abs(n - v) < 0.05 for v in rows.values()) for n in numbers)
    assert "H200" in text and "factor 1.0" in text  # the card the numbers came from, and how they are scaled
