"""`textok caption`: a real (tiny, random) BLIP and LLaVA caption an ImageNet-layout folder into captions.jsonl;
a kill loses and duplicates nothing; two processes write the file one process writes; bad inputs are one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from test_bad_inputs import changed_files, run_cli, snapshot
from textok.cli import main
from textok.data.folder import ImageCaptionFolder
from textok.text.captioner import VLMCaptioner
from vlm_models import image_folder, make_blip, make_llava, silence_blip

FAST = ["--max-new-tokens", "6", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vlm")
    return {"blip": make_blip(d / "blip"), "llava": make_llava(d / "llava"),
            "silent": silence_blip(make_blip(d / "silent"))}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_an_imagenet_layout_folder_gets_captions_the_folder_reader_reads(family, vlms, tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"n01": 3, "n02": 2}, split="train")
    image_folder(data, {"n01": 1, "n02": 1}, split="val", seed=1)
    (data / "classes.txt").write_text("n01 dog, hound\nn02 cat\n")  # LOC_synset_mapping.txt's layout
    prompt = "a {class_name} photo" if family == "blip" else "what is the {class_name} doing"
    assert main(["caption", str(data), "--vlm", str(vlms[family]), "--prompt", prompt, "--prompt", "this is",
                 "--captions-per-image", "3", "--batch-size", "2", *FAST]) == 0
    rows = _rows(data / "captions.jsonl")
    images = sorted(str(p.relative_to(data)) for p in data.rglob("*.jpg"))
    assert [r["file"] for r in rows] == images  # every image once, in path order
    assert all(len(r["captions"]) == 3 and all(c.strip() for c in r["captions"]) for r in rows)
    assert [r["label"] for r in rows] == [f.split("/")[1] for f in images]
    if family == "blip":  # BLIP continues its prompt: the class name from classes.txt went in, prompts alternate
        for r in rows:
            name = {"n01": "dog", "n02": "cat"}[r["label"]]
            assert [c.split()[:3] for c in r["captions"][::2]] == [["a", name, "photo"]] * 2
            assert r["captions"][1].split()[:2] == ["this", "is"]
    folder = ImageCaptionFolder(data, "train", 16)  # the captions.jsonl path of make-shards and training
    assert folder.class_names == ["n01", "n02"] and [r["label"] for r in folder.records] == [0, 0, 0, 1, 1]
    assert folder.records[0]["captions"] == rows[0]["captions"]
    out = capsys.readouterr().out
    assert "most frequent captions" in out and out.splitlines()[2].split()[:2] == ["7", "21"]  # images, captions
    assert not list(data.glob(".captions.jsonl.caption"))  # the work folder is gone after the merge


def test_the_llava_prompt_goes_through_its_chat_template(vlms):
    cap = VLMCaptioner(vlms["llava"], max_new_tokens=2)
    assert cap.chat_text("what is the dog") == "USER: <image> what is the dog ASSISTANT :"
    from PIL import Image

    img = Image.new("RGB", (20, 30), (200, 10, 10))
    a = cap.caption([img, img], ["what is the dog", "a"], seed=3)
    assert a == cap.caption([img, img], ["what is the dog", "a"], seed=3)  # one seed, one answer
    assert len(a) == 2 and all(isinstance(c, str) for c in a)


def test_a_kill_at_any_moment_loses_and_duplicates_nothing(vlms, tmp_path):
    """SIGKILL while captioning, a torn line at the end of the part file, then the same command again: every image
    once, the captions written before the kill kept as they were, the file the same as an uninterrupted run's."""
    data = image_folder(tmp_path / "data", {"a": 20, "b": 20}, size=16)
    args = ["caption", str(data), "--vlm", str(vlms["blip"]), "--batch-size", "1", "--captions-per-image", "2", *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); "
                             "from textok.cli import main; sys.exit(main(sys.argv[1:]))", *args], env=env)
    part = data / ".captions.jsonl.caption" / "part-00000.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if part.is_file() and part.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    before = [json.loads(line) for line in part.read_bytes().splitlines() if line.endswith(b"}")]
    assert 3 <= len(before) < 40 and not (data / "captions.jsonl").exists()
    with open(part, "ab") as f:  # a write cut short by the kill
        f.write(b'{"file": "b/b_019.jpg", "captions": ["half a li')
    assert main(args) == 0
    rows = _rows(data / "captions.jsonl")
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.jpg"))
    assert [r["file"] for r in rows] == files  # none lost, none twice
    by_file = {r["file"]: r["captions"] for r in rows}
    assert all(by_file[r["file"]] == r["captions"] for r in before)  # what was done stays as it was
    fresh = image_folder(tmp_path / "fresh", {"a": 20, "b": 20}, size=16)
    assert main(["caption", str(fresh), *args[2:]]) == 0
    assert (fresh / "captions.jsonl").read_text() == (data / "captions.jsonl").read_text()


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert main(argv) == 0


def run_in_two_processes(argv: list[str]) -> None:
    """``textok ARGV`` as two torchrun-style processes (ranks 0 and 1 on a free local port)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, argv), nprocs=2, start_method="spawn")


@pytest.mark.slow
def test_two_processes_write_the_file_one_process_writes(vlms, tmp_path):
    data = image_folder(tmp_path / "data", {"a": 4, "b": 3})
    (data / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    args = ["caption", str(data), "--vlm", str(vlms["blip"]), "--batch-size", "2", "--captions-per-image", "2", *FAST]
    assert main(args + ["--out", str(tmp_path / "one.jsonl")]) == 0
    run_in_two_processes(args + ["--out", str(tmp_path / "two.jsonl")])
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert one == two and len(one.splitlines()) == 7  # the broken image is left out of both
    assert not list(tmp_path.glob(".two.jsonl.caption"))


# ---- bad inputs, as a table (the style of test_bad_inputs.py) ---------------------------------------------
@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[dict, Path], list]
    code: int
    message: str
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], None] | None = None


def caption(*extra, vlm: str = "blip", data: str = "data"):
    return lambda v, d: ["caption", d / data, "--vlm", v[vlm] if vlm in v else d / vlm, *FAST, *extra]


def _folder(d: Path, **classes: int) -> None:
    image_folder(d / "data", classes or {"n01": 2, "n02": 1}, size=16)


def _no_images_folder(d: Path) -> None:
    _folder(d)
    (d / "data" / "n03").mkdir()
    (d / "data" / "n03" / "README.txt").write_text("images went missing\n")


def _t5_dir(d: Path) -> None:
    _folder(d)
    (d / "t5").mkdir()
    (d / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))


def _broken_image(d: Path) -> None:
    _folder(d)
    (d / "data" / "n02" / "broken.jpg").write_bytes(b"not a jpeg")


def _loose_image(d: Path) -> None:
    _folder(d)
    shutil.copy(d / "data" / "n01" / "n01_000.jpg", d / "data" / "loose.jpg")


def _user_captions(d: Path) -> None:
    _folder(d)
    (d / "data" / "captions.jsonl").write_text('{"file": "n01/n01_000.jpg", "caption": "my own words"}\n')


def _check_failed_named(d: Path, out: str) -> None:
    assert "1 images have no captions" in out and "n02/broken.jpg: cannot be decoded" in out
    assert [r["file"] for r in _rows(d / "data" / "captions.jsonl")] == ["n01/n01_000.jpg", "n01/n01_001.jpg",
                                                                          "n02/n02_000.jpg"]


def _check_work_kept(d: Path, out: str) -> None:
    assert (d / "data" / ".captions.jsonl.caption" / "settings.json").is_file()
    assert not (d / "data" / "captions.jsonl").exists()


CASES = [
    Case("a VLM directory that does not exist", caption(vlm="nowhere"), 2, "does not exist", _folder),
    Case("a directory that is no model", caption(vlm="data"), 2, "holds no config.json", _folder),
    Case("a model family that is not supported", caption(vlm="t5"), 2, "'t5' model, which `textok caption` does not "
         "support; use one of: blip", _t5_dir),
    Case("an unreadable image is named and counted, the others captioned", caption(), 0, "n02/broken.jpg",
         _broken_image, _check_failed_named),
    Case("a VLM that writes empty captions stops with the work kept", caption(vlm="silent"), 2,
         "empty caption for n01/n01_000.jpg", _folder, _check_work_kept),
    Case("empty captions left out with --on-empty skip", caption("--on-empty", "skip", "--batch-size", "2",
                                                                 vlm="silent"), 2, "no image could be captioned",
         _folder),
    Case("a template field that does not exist", caption("--prompt", "a {label} photo"), 2,
         "uses the field {label}, which does not exist", _folder),
    Case("a template with a class for an image outside class folders", caption("--prompt", "a {class_name}"), 2,
         "loose.jpg is not in a class folder", _loose_image),
    Case("a class folder with no images", caption(), 2, "n03 holds no images", _no_images_folder),
    Case("a label map that does not cover every folder",
         lambda v, d: caption("--class-names", d / "map.txt")(v, d), 2,
         "does not name the class folder 'n02'", lambda d: (_folder(d), (d / "map.txt").write_text("n01 dog\n"))),
    Case("the user's captions.jsonl is not overwritten", caption(), 2, "captions.jsonl already exists",
         _user_captions),
    Case("a tar without --out", caption(data="data.tar"), 2, "give --out", lambda d: (d / "data.tar").write_bytes(b"")),
    Case("greedy decoding asked for more captions than prompts", caption("--greedy", "--captions-per-image", "2"), 2,
         "need as many --prompt", _folder),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_caption_input(case: Case, vlms, tmp_path: Path) -> None:
    if case.setup:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(case.argv(vlms, tmp_path))
    assert code == case.code, (out, err)
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("textok caption: error:"), err
        assert case.message in lines[0], lines[0]
    else:
        assert case.message in out
    assert changed_files(before, snapshot(tmp_path), ()) == []  # nothing that existed is changed or removed
    if case.check:
        case.check(tmp_path, out)
