"""Every command block of README.md and docs/*.md works as written: each ``textok`` command parses with the real
parser, each ``torchrun`` line with torchrun's own parser (an option of ours that torchrun takes as an
abbreviation of one of its own fails here), each ``make`` target and script exists, and every path a command
reads was written by an earlier command of the same page or is named below as the reader's own. Pages in
:data:`RUN` are then run from top to bottom at tiny size in a temporary directory: their shell commands through
the CLI, their Python blocks with ``exec``, with the explicit substitutions of :data:`TINY` (each must still
match the page); what cannot run on a CPU test is in :data:`PARSE_ONLY` with the reason."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from torch.distributed.run import get_args_parser as torchrun_parser

from textok.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = {p.relative_to(ROOT).as_posix(): p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# What the reader brings: environment variables the pages use without setting them, and paths on their machine.
READER_ENV = {"TEXTOK_DATA": "/reader/data", "OUT": "/reader/out", "NODE_RANK": "0", "MASTER": "10.0.0.1"}
READER_PATHS = {
    "README.md": ["a.png"],  # "--image a.png": an image of the reader's
    "docs/DATA.md": ["/data/imagenet", "/data/captions.jsonl", "/data/other-webdataset-shards", "/models/t5-xl",
                     "/data/imagenet-wds", "/models/blip"],
    "docs/REPRODUCE.md": ["/data/imagenet", "/models/"],  # the page's variables: ImageNet and downloaded weights
    "docs/RESULTS.md": ["/reader/data/"],
    "docs/TRAINING.md": ["a.png", "/reader/data/", "/path/to/", "/nfs/in-shards",
                         "/nfs/runs/gen/final",  # a generator trained as in the first block, on the nodes' shared disk
                         "runs/demo/"],  # "textok serve ... # after `make demo`"
    "docs/GPU.md": [],
}
# Files that scripts and make targets write (their commands are not textok's, so the parser cannot say).
SCRIPT_WRITES = {"benchmarks/gpu_pack.py": [".gpu-pack"]}

# Commands that are only parsed, and why (matched by the start of the command as the page writes it).
PARSE_ONLY = {
    "make demo": "the main job (minutes); tests/test_demo.py runs it at tiny size",
    "make test": "the test suite itself",
    "make gpu-smoke": "tests/test_gpu_suite.py runs it",
    "python benchmarks/gpu_pack.py": "needs the Flowers-102 data set",
    "python3 benchmarks/gpu_suite.py": "needs a GPU",
    "textok serve": "a server that runs until stopped; tests/test_serve.py starts it",
    ".venv/bin/textok serve": "a server that runs until stopped; tests/test_serve.py starts it",
    "textok study": "a grid of training runs; tests/test_study.py runs the study at tiny size",
    "textok train-tokenizer --config textok-s-64-32": "needs Flickr8k ($TEXTOK_DATA)",
    "textok train-tokenizer --config titok-stage": "needs MaskGIT-VQGAN weights; test_titok_two_stage.py runs it "
                                                  "with random weights of the same layout",
    "torchrun --nnodes": "several nodes",
    "torchrun --nproc_per_node 8 -m textok.cli train-generator": "8 GPUs (FSDP); test_generator_fsdp.py runs it on 2 "
                                                                 "CPU processes",
}
# Pages that run (DATA.md on a tiny image folder and a random 1-layer T5 instead of ImageNet and T5-XL); the others
# are only parsed: ImageNet, VLM and T5 weights, real data sets, GPUs, servers (REPRODUCE.md's chain runs at toy
# size in test_pipeline_e2e.py).
RUN = ["README.md", "docs/TRAINING.md", "docs/IMAGEFOLDER.md", "docs/LIBRARY.md", "docs/DATA.md"]
# torchrun lines that run here as one process (the page says the result is the same file)
ONE_PROCESS = ["torchrun --nproc_per_node 8 -m textok.cli sample --generator runs/gen/final"]

TRAIN_TINY = "--max-steps 2 batch_size=4 data.train_size=8 data.val_size=4 log_every=1"
TOKENIZER_CHAIN = [  # the README's and TRAINING.md's chain, tiny
    ("--out runs/tok ", f"--out runs/tok {TRAIN_TINY} "),
    ("--data scenes --num 500", "--data scenes --num 4"),
    ("--data scenes --out runs/lat", "--data scenes --out runs/lat --num 32"),
    ("--max-steps 2000", "--max-steps 2 batch_size=4"),
    ("--n 16 --steps 50", "--n 2 --steps 2"),
]
TINY: dict[str, list[tuple[str, str]]] = {
    "README.md": [*TOKENIZER_CHAIN, ('"textok-b-256-32")', '"textok-tiny")'), ("256, 256)", "16, 16)")],
    "docs/TRAINING.md": [
        *TOKENIZER_CHAIN,
        ("--config textok-tiny --out runs/tiny", f"--config textok-tiny --out runs/tiny {TRAIN_TINY}"),
        ("--out runs/if ", f"--out runs/if {TRAIN_TINY} "),
        ("--out runs/if-codes ", "--out runs/if-codes --num 8 "),
        ("--out runs/if-var ", "--out runs/if-var --max-steps 2 batch_size=4 "),
        ("--n 8 --cfg 4.25", "--n 1 --cfg 4.25"),
        ("--num-samples 50000", "--num-samples 4"),
        ("--samples s.npz --ref scenes", "--samples s.npz --ref scenes --ref-num 8 --fd-size 32"),
    ],
    "docs/IMAGEFOLDER.md": [
        ("data.train_size=2000 max_steps=3000", "data.train_size=8 data.val_size=4 max_steps=2 batch_size=4"),
        ("--out runs/if-codes", "--out runs/if-codes --num 8"),
        ("batch_size=64 optim.lr=1e-3 max_steps=1000", "batch_size=4 optim.lr=1e-3 max_steps=2"),
        ("--n 8 --out grid.png", "--n 1 --out grid.png"),
        ("--num-samples 5000", "--num-samples 4"),
    ],
    "docs/DATA.md": [("/data/", "data/"), ("/models/t5-xl", "{tiny_t5}"),  # the reader's data, a tiny T5
                     ("/models/blip", "models/blip"),  # a tiny random BLIP (reader_data writes it)
                     ("--config textok-b-256-32 --out runs/in", f"--config textok-tiny --out runs/in {TRAIN_TINY}"),
                     ("data.workers=8", "data.workers=0")],
    "docs/LIBRARY.md": [('"textok-b-256-32")', '"textok-tiny")'), ("256, 256)", "16, 16)"),
                        ('"titok-b-64"', '"titok-tiny"'), ('"imagefolder-b-256"', '"imagefolder-tiny"'),
                        ('"dit-b"', '"dit-tiny"'), ('"maskgit-b"', '"maskgit-tiny"')],
}
# What a page assumes was run before it (the models of `make demo` and `make demo-gen`), run here at tiny size.
BEFORE = {"docs/LIBRARY.md": [["demo", "--quick", "--out", "runs/demo"],
                              ["demo-gen", "--quick", "--tokenizer", "runs/demo/textok/final", "--out", "runs/demo-gen"]]}


def reader_data() -> None:
    """DATA.md's inputs, tiny, in the working directory: an image folder with a captions.jsonl beside it, a
    webdataset shard written by some other tool (no index), uncaptioned ImageNet-style shards ({key}.jpg +
    {key}.cls) with their LOC_synset_mapping.txt, and a tiny random BLIP."""
    import json
    import tarfile

    from textok.data import CaptionedScenes
    from vlm_models import make_blip

    scenes = CaptionedScenes(32, "train", size=8)
    folder = Path("data/imagenet/n01")
    folder.mkdir(parents=True)
    lines = []
    for i in range(8):
        item = scenes[i]
        pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"n01/{i}.png", "caption": item["captions"][0], "label": i % 2,
                                 "split": "train" if i < 6 else "val"}))
    Path("data/captions.jsonl").write_text("\n".join(lines) + "\n")
    other = Path("data/other-webdataset-shards")
    other.mkdir()
    with tarfile.open(other / "train-000000.tar", "w") as tar:
        for i in range(2):
            for ext in ("png", "json"):
                data = (folder / f"{i}.png").read_bytes() if ext == "png" else json.dumps(
                    {"captions": [f"scene {i}"], "label": 0}).encode()
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    wds = Path("data/imagenet-wds")
    wds.mkdir()
    (wds / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    for t in range(2):
        with tarfile.open(wds / f"imagenet-train-{t:06d}.tar", "w") as tar:
            for i in range(3 * t, 3 * t + 3):
                for name, data in ((f"n0{i % 2 + 1}_{i}.jpg", (folder / f"{i}.png").read_bytes()),
                                   (f"n0{i % 2 + 1}_{i}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    make_blip(Path("models/blip"))


SETUP = {"docs/DATA.md": reader_data}


@dataclass
class Command:
    text: str  # as the page writes it (continuations joined, comment removed)
    argv: list[str]  # variables expanded, environment assignments removed
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Block:
    lang: str
    body: str
    commands: list[Command] = field(default_factory=list)


def expand(text: str, variables: dict[str, str]) -> str:
    def value(m: re.Match) -> str:
        name = m[1] or m[2]
        if name in variables:
            return variables[name]
        if name in READER_ENV:
            return READER_ENV[name]
        raise AssertionError(f"${name} is neither set on the page nor a variable the reader sets: {text}")
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value, text)


def page_blocks(page: str, text: str | None = None) -> list[Block]:
    """The page's shell and Python blocks in order, shell lines split into commands (``&&`` and ``;`` too)."""
    text = PAGES[page].read_text(encoding="utf-8") if text is None else text
    blocks, variables = [], {}
    for lang, body in FENCE.findall(text):
        block = Block(lang, body)
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                code = re.sub(r"(^|\s)#.*$", "", line).strip()
                for part in filter(None, (p.strip() for p in re.split(r"&&|;", code))):
                    argv = shlex.split(expand(part, variables))
                    env = {}
                    if argv[0] == "export":
                        argv = argv[1:]
                    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                        key, value = argv.pop(0).split("=", 1)
                        env[key] = value
                    if argv:
                        block.commands.append(Command(part, argv, env))
                    else:
                        variables.update(env)
        blocks.append(block)
    return blocks


def torchrun_script_args(argv: list[str]) -> list[str]:
    """The textok arguments of a torchrun line, as torchrun itself parses it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = torchrun_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"torchrun refuses {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")
    assert args.module and args.training_script == "textok.cli", shlex.join(argv)
    return ["textok", *args.training_script_args]


def parse_textok(argv: list[str]) -> argparse.Namespace:
    """textok's own parsing of a command (as `main` does it); an unknown option or a bad value fails."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = build_parser().parse_known_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"textok refuses {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")
    assert all("=" in e and not e.startswith("-") for e in extra), f"unknown arguments {extra}: {shlex.join(argv)}"
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    return dict(o.split("=", 1) for o in getattr(args, "overrides", None) or [])


def textok_paths(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(paths the command reads, paths it writes); 'scenes' (built in) and '-' (in place) are not paths."""
    o = _overrides(args)
    reads = [o.get("data.source"), o.get("init_from"), o.get("model.vqgan_weights"), o.get("text_store")]
    for encoder in (o.get("model.text_encoder"), getattr(args, "encoder", None)):
        if encoder and encoder.startswith("t5:"):
            reads.append(encoder[3:])
    for name in ("model", "image", "data", "samples", "ref", "inception_weights", "vgg16_weights", "captions_file",
                 "caption_bank", "tokenizer", "latents", "generator", "source", "vlm", "captions",
                 "init_from_study", "eval_data"):
        value = getattr(args, name, None)
        reads += value if isinstance(value, list) else [value]
    writes = [getattr(args, name, None) for name in ("out", "npz", "store", "save_ref_stats", "ref_stats")]
    if args.verb in ("reconstruct", "info", "serve"):
        writes = [args.out] if args.verb == "reconstruct" else []
    skip = {None, "", "scenes", "-"}
    return [r for r in reads if r not in skip], [w for w in writes if w not in skip]


def make_writes(target: str) -> list[str]:
    """The ``--out`` folders of the textok commands in a Makefile target's recipe."""
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)*)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, f"the Makefile has no target {target}"
    return re.findall(r"textok \S+.*?--out (\S+)", recipe[1])


def parse_only_reason(command: Command) -> str | None:
    text = re.sub(r"^([A-Z_][A-Z0-9_]*=\S+\s+)*", "", command.text)  # without environment assignments
    return next((why for start, why in PARSE_ONLY.items() if text.startswith(start)), None)


def covered(path: str, provided: list[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == os.path.normpath(p) or path.startswith(p if p.endswith("/") else p.rstrip("/") + "/")
               for p in provided)


def check_page(page: str, text: str | None = None, provided: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """Parse every command of a page and check where its inputs come from; the textok argv of each command and
    the reason it is only parsed ('' when it runs), in order."""
    written: list[str] = []
    provided = READER_PATHS.get(page, []) if provided is None else provided
    plan = []
    for block in page_blocks(page, text):
        for command in block.commands:
            argv = command.argv
            reason = parse_only_reason(command)
            if argv[0] == "make":
                written += [w for target in argv[1:] for w in make_writes(target)]
                assert reason is not None, f"{page}: `{command.text}` must be listed in PARSE_ONLY"
                plan.append((command.text, argv, reason))
                continue
            if argv[0] in ("python", "python3"):
                script = ROOT / argv[1]
                assert script.is_file(), f"{page}: {argv[1]} does not exist"
                source = script.read_text()
                assert all(f'"{a}"' in source for a in argv[2:] if a.startswith("--")), f"{page}: {command.text}"
                written += SCRIPT_WRITES.get(argv[1], [])
                assert reason is not None, f"{page}: `{command.text}` must be listed in PARSE_ONLY"
                plan.append((command.text, argv, reason))
                continue
            if argv[0] == "torchrun":
                argv = torchrun_script_args(argv)
                if any(command.text.startswith(s) for s in ONE_PROCESS):
                    reason = ""
            assert argv[0] in ("textok", ".venv/bin/textok"), f"{page}: not a command this test knows: {command.text}"
            args = parse_textok(argv)
            reads, writes = textok_paths(args)
            missing = [r for r in reads if not covered(r, written + provided)]
            assert not missing, (f"{page}: `{command.text}` reads {missing}, which no earlier command of the page "
                                 "writes and the page does not ask the reader for")
            written += writes
            plan.append((command.text, ["textok", *argv[1:]], reason or ""))
    return plan


@pytest.mark.parametrize("page", PAGES)
def test_every_command_parses_and_reads_what_exists(page: str) -> None:
    check_page(page)
    langs = {block.lang for block in page_blocks(page)}
    assert langs <= {"bash", "python", ""}, f"{page}: mark shell blocks `bash` so that they are checked ({langs})"
    assert "python" not in langs or page in RUN, f"{page} has a Python block: add the page to RUN"


def tiny_text(page: str, text: str | None = None, check: bool = True, **values: str) -> str:
    """The page (or ``text``) with its :data:`TINY` substitutions."""
    text = PAGES[page].read_text(encoding="utf-8") if text is None else text
    for old, new in TINY.get(page, []):
        assert old in text or not check, f"{page} no longer holds {old!r}: update TINY in {Path(__file__).name}"
        text = text.replace(old, new.format(**values) if "{" in new else new)
    return text


@pytest.mark.parametrize("page", RUN)
def test_page_runs_at_tiny_size(page: str, tmp_path: Path, monkeypatch, one_thread, request) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEXTOK_CACHE", str(tmp_path / "cache"))
    if page in SETUP:
        SETUP[page]()
    for argv in BEFORE.get(page, []):
        assert main(argv) == 0, argv
    if "a.png" in READER_PATHS.get(page, []):  # the image the reader brings
        Image.new("RGB", (40, 30), (200, 30, 30)).save("a.png")
    values = {"tiny_t5": str(request.getfixturevalue("tiny_t5_dir"))} if page == "docs/DATA.md" else {}
    text = tiny_text(page, **values)
    provided = [tiny_text(page, path, check=False, **values) for path in READER_PATHS.get(page, [])]
    plan = iter(check_page(page, text, provided))
    ran = 0
    for i, block in enumerate(page_blocks(page, text)):
        if block.lang == "python":
            exec(compile(block.body, f"{page} (Python block {i})", "exec"), {"__name__": "__doc__"})
            ran += 1
            continue
        for _ in block.commands:
            shown, argv, reason = next(plan)
            if reason:
                continue
            assert main(argv[1:]) == 0, f"{page}: `{shown}` failed"
            ran += 1
    assert ran, f"{page} has nothing that runs"


def test_the_checks_catch_what_they_should() -> None:
    with pytest.raises(AssertionError, match="torchrun refuses"):
        torchrun_script_args(shlex.split("torchrun --nproc_per_node 8 -m textok.cli sample --generator g --num 5"))
    with pytest.raises(AssertionError, match="reads"):
        check_page("README.md", "```bash\ntextok sample --generator runs/nowhere/final --out s.png\n```\n")
    with pytest.raises(AssertionError, match="textok refuses"):
        check_page("README.md", "```bash\ntextok sample --generator-typo g\n```\n")
    plan = check_page("README.md", "```bash\nX=runs/a; textok train-tokenizer --config demo --out $X\n"
                                   "textok extract-latents --tokenizer runs/a/final --out runs/l   # comment\n```\n")
    assert [p[1][1] for p in plan] == ["train-tokenizer", "extract-latents"] and plan[0][1][-1] == "runs/a"
