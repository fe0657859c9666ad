"""The README stays a newcomer's page and the docs stay navigable: short, every relative link resolves, every
``textok VERB`` in a command example is a verb the CLI knows, and nothing points outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from textok.cli import VERBS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
VERB_CALL = re.compile(r"(?:^|[\s;&|(/])(?:textok|-m textok\.cli)\s+([a-z][a-z-]*)")


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in the repository (no scheme, not a bare in-page anchor)."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def command_verbs(text: str) -> list[str]:
    """The verb of every ``textok VERB`` (or ``python -m textok.cli VERB``) in the page's shell blocks."""
    verbs = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in body.splitlines():
            code = line.split("#", 1)[0]
            verbs += VERB_CALL.findall(code)
    return verbs


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_puts_the_two_commands_first():
    text = README.read_text(encoding="utf-8")
    first_section = text.split("\n## ", 2)[1]
    assert first_section.startswith("The two commands")
    assert "make demo" in first_section and "make test" in first_section


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    text = page.read_text(encoding="utf-8")
    missing = [t for t in relative_links(text) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_parser_sees_links():
    text = "see [a](docs/A.md#x), ![p](../b/c.png) and [web](https://x.org), [here](#top)"
    assert relative_links(text) == ["docs/A.md", "../b/c.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_examples_name_known_verbs(page: Path):
    verbs = command_verbs(page.read_text(encoding="utf-8"))
    unknown = sorted(set(verbs) - set(VERBS))
    assert not unknown, f"{page.relative_to(ROOT)} runs unknown textok verbs: {unknown}"


def test_readme_shows_commands_and_lists_every_verb():
    text = README.read_text(encoding="utf-8")
    assert command_verbs(text), "README.md has no textok command example"
    missing = [verb for verb in VERBS if f"`{verb}`" not in text]
    assert not missing, f"README.md's CLI table lacks: {missing}"


def test_verb_parser_reads_shell_blocks_only():
    text = "```bash\ntextok train-tokenizer --out x   # then textok nope\ntorchrun -m textok.cli sample\n```\n" \
           "textok prose-is-not-a-command\n```python\ntextok = 1\n```\n"
    assert command_verbs(text) == ["train-tokenizer", "sample"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_nothing_points_outside_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    outside = ("../" + "shared", "DESIGN" + ".md")  # spelled in parts so that this file does not name them either
    assert not any(name in text for name in outside)
