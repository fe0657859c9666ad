"""Bad inputs, as a user meets them, as a table.

Every row drives the real command line (``textok.cli.main``, the function behind the ``textok`` entry point)
and must end with its exit status and its one clear line (or its expected outcome), with no traceback and
every file that existed before unchanged (the rows that legitimately replace textok's own output name it).
What only a real process shows (SIGTERM / Ctrl-C, run locks, undecodable bytes in argv) runs in
subprocesses at the end, with the Python API's bad inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from textok.cli import main

NO_TEXT = ["model.text_in_encoder=false", "model.text_in_decoder=false"]
TINY_RUN = ["--config", "textok-tiny", "--no-progress", "data.train_size=16", "data.val_size=4", "batch_size=4",
            "sample_every=0", "log_every=1", "optim.warmup_steps=1", *NO_TEXT]
SMALL_DIT = ["--config", "dit-tiny", "--no-progress", "model.width=32", "model.depth=1", "model.heads=2",
             "batch_size=8", "log_every=1"]


# ---- running the CLI and watching the files -------------------------------------------------------
def run_cli(argv: list) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of ``textok ARGV``; an exception escaping it is a traceback (status None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        # warnings reach stderr as they would in a terminal (pytest would otherwise record them)
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            err.write(traceback.format_exc())
            code = None
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def changed_files(before: dict[str, str], after: dict[str, str], allowed: tuple[str, ...]) -> list[str]:
    """Files that existed before and are now different or gone, outside the ``allowed`` prefixes."""
    return [p for p, h in before.items() if after.get(p) != h and not p.startswith(allowed)]


# ---- inputs ----------------------------------------------------------------------------------------
def save_textok(path: Path, *overrides: str) -> Path:
    from textok import TexTok, TexTokConfig

    torch.manual_seed(0)
    TexTok(TexTokConfig.preset("textok-tiny").override(list(overrides))).save_pretrained(path)
    return path


def scene_png(path: Path, index: int = 0) -> Path:
    from textok.data import CaptionedScenes
    from textok.data.images import save_image

    save_image(CaptionedScenes(16, size=index + 1)[index]["image"], path)
    return path


def bomb_png(path: Path) -> Path:
    """A valid PNG header claiming more than twice PIL's pixel limit (the pixel data is never read)."""
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
                     + chunk(b"IEND", b""))
    return path


def gray16_png(path: Path, side: int = 16) -> Path:
    """A 16-bit grayscale PNG: a horizontal ramp over the full 0..65535 range."""
    white = np.iinfo(np.uint16).max
    ramp = np.round(np.linspace(0, white, side)).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (side, 1))).save(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread) -> Path:
    """What the rows share (they must leave it unchanged): tokenizers, a 2-step training run with a checkpoint
    per step, latents, a generator, images good and bad, and a folder of the user's own files."""
    w = tmp_path_factory.mktemp("ws")
    save_textok(w / "tok", "text_in_encoder=false", "text_in_decoder=false")
    save_textok(w / "tok_text")
    scene_png(w / "img.png")
    (w / "garbage.png").write_bytes(b"this is not an image")
    bomb_png(w / "bomb.png")
    gray16_png(w / "gray16.png")
    (w / "user").mkdir()
    (w / "user" / "notes.txt").write_text("the user's own notes\n")
    scene_png(w / "user" / "photo.png", 1)
    for argv in (["train-tokenizer", "--out", w / "run", "--max-steps", "2", "--ckpt-every", "1", *TINY_RUN],
                 ["extract-latents", "--tokenizer", w / "tok", "--num", "16", "--out", w / "lat", "--no-progress"],
                 ["train-generator", "--latents", w / "lat", "--out", w / "gen", "--max-steps", "1", *SMALL_DIT]):
        code, out, err = run_cli(argv)
        assert code == 0, (argv, out, err)
    return w


def copy(w: Path, name: str, d: Path) -> Path:
    shutil.copytree(w / name, d / name)
    return d / name


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    """Damage a tensor's bytes without touching the safetensors header (which still parses)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def data_folder(d: Path, lines: list[bytes | str | dict], good: int = 2, bad: int = 0) -> Path:
    """D/data with ``good`` decodable and ``bad`` garbage images (0.png, 1.png, ...) and a captions.jsonl."""
    root = d / "data"
    root.mkdir()
    for i in range(good):
        scene_png(root / f"{i}.png", i)
    for i in range(good, good + bad):
        (root / f"{i}.png").write_bytes(b"not an image")
    raw = [ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode() for ln in lines]
    (root / "captions.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    return root


def captions_for(n: int) -> list[dict]:
    return [{"file": f"{i}.png", "caption": f"scene number {i}"} for i in range(n)]


def recipe(d: Path, text: str | bytes) -> Path:
    path = d / "recipe.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# ---- the table -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """``argv(ws, d)`` run in case folder ``d`` (after ``setup(ws, d)``) exits with ``code``; ``message`` is
    found in the error line (or, for status 0, in the output); files under ``may_change`` (relative to ``d``)
    are the row's own outputs; ``check(ws, d, output)`` asserts the outcome."""

    id: str
    argv: Callable[[Path, Path], list]
    code: int
    message: str
    setup: Callable[[Path, Path], object] | None = None
    may_change: tuple[str, ...] = ()
    check: Callable[[Path, Path, str], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def reconstruct(model: str = "tok", image: str = "img.png", out: str = "o.png", *extra: str, copied: bool = False):
    """``reconstruct`` with the shared model (or the case's damaged copy), an image, an output in the case folder."""
    return lambda w, d: ["reconstruct", "--model", (d if copied else w) / model, "--image", w / image,
                         "--out", out if out.startswith("/") else d / out, *extra]


def train(*extra, out: str = "run"):
    return lambda w, d: ["train-tokenizer", "--out", d / out, *TINY_RUN, "--max-steps", "3", *extra]


def eval_data(*extra):
    return lambda w, d: ["eval", "reconstruction", "--model", w / "tok", "--data", d / "data", "--num", "2",
                         "--quiet", "--fd-size", "32", *extra]


def sample(*extra):
    return lambda w, d: ["sample", "--generator", w / "gen/final", "--steps", "1", "--n", "1", "--no-progress", *extra]


def _assert(condition: bool) -> None:
    assert condition


def _cache_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def FROM_RECIPE(w: Path, d: Path) -> list:  # noqa: N802 - reads as a table entry
    return ["train-tokenizer", "--config", d / "recipe.yaml", "--out", d / "r"]


def damage_both_checkpoints(w: Path, d: Path) -> None:
    run = copy(w, "run", d)
    for step in sorted((run / "checkpoints").iterdir()):
        truncate(step / "model.safetensors")


def _bigger_than_its_checkpoints(w: Path, d: Path, out: str) -> None:
    steps = sorted(p.name for p in (d / "run/checkpoints").iterdir())
    assert steps[-1] == "step-0000003", steps


def _full_disk(mp: pytest.MonkeyPatch) -> None:
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):  # noqa: ANN001
        buffer = io.BytesIO()
        real(self, buffer, *args, **kwargs)
        Path(fp).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    mp.setattr(Image.Image, "save", save)


def edit_config(w: Path, d: Path, **config: object) -> None:
    """A copy of the shared tokenizer whose config.json says ``config`` (valid JSON, as an edit by hand leaves it)."""
    path = copy(w, "tok", d) / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "config": {**data["config"], **config}}, indent=2) + "\n")


def linked_out(d: Path, link: str, target: Path) -> Path:
    """D/data with two images and a captions.jsonl naming ``link``, a symbolic link to ``target``."""
    root = data_folder(d, [*captions_for(2), {"file": link, "caption": "a linked image"}])
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(target)
    return root


def class_folders(d: Path) -> Path:
    """D/data with class folders (cat/, dog/) of one image each, and no captions.jsonl."""
    for i, cls in enumerate(("cat", "dog")):
        (d / "data" / cls).mkdir(parents=True)
        scene_png(d / "data" / cls / f"{i}.png", i)
    return d / "data"


def data_tar(d: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """D/data.tar: two scene images and a captions.jsonl, then ``members``: (name, bytes) a file, (name, str) a
    symbolic link to that target."""
    def add(tar: tarfile.TarFile, name: str, content: bytes | str) -> None:
        info = tarfile.TarInfo(name)
        if isinstance(content, str):
            info.type, info.linkname = tarfile.SYMTYPE, content
            tar.addfile(info)
        else:
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))

    png = [scene_png(d / f"tar{i}.png", i).read_bytes() for i in range(2)]
    lines = [*captions_for(2), *({"file": n, "caption": "x"} for n, _ in members)]
    with tarfile.open(d / "data.tar", "w") as tar:
        for i, data in enumerate(png):
            add(tar, f"{i}.png", data)
        add(tar, "captions.jsonl", "\n".join(json.dumps(ln) for ln in lines).encode() + b"\n")
        for name, content in members:
            add(tar, name, content)
    return d / "data.tar"


def cut_in_a_member(path: Path) -> None:
    """Truncate a tar in the middle of its last member's bytes (a copy that stopped part-way)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


def nan_samples(w: Path, d: Path) -> None:
    """D/nan.npz: float samples in [-1, 1] with one NaN; D/ref.npz: uint8 reference images."""
    rng = np.random.default_rng(0)
    samples = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    samples[0, 0, 0, 0] = np.nan
    np.savez(d / "nan.npz", samples)
    np.savez(d / "ref.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))


def full_disk_at(mp: pytest.MonkeyPatch, where: str) -> None:
    """Writing a safetensors file whose path contains ``where`` fails as on a full disk, after half of it."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):  # noqa: ANN001
        if where in str(filename):
            Path(filename).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    for module in ("textok.train.state", "textok.hub"):
        mp.setattr(f"{module}.save_file", save_file)


def eval_on(data: str, *extra):
    return lambda w, d: ["eval", "reconstruction", "--model", w / "tok", "--data", d / data, "--num", "3",
                         "--quiet", "--fd-size", "32", *extra]


def make_shards_of(data: str, *extra):
    return lambda w, d: ["make-shards", d / data, "--out", d / "shards", "--no-progress", *extra]


CASES = [
    # -- never delete what textok did not write ----------------------------------------------------
    Case("extract-latents onto a folder of the user's files",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", w / "user", "--no-progress"],
         2, "already holds files that are not a latents directory"),
    Case("extract-latents onto an image file",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", w / "user/photo.png",
                       "--no-progress"], 2, "is a file"),
    Case("extract-latents replaces its own latents",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", d / "lat", "--no-progress"],
         0, r"wrote 4 x", setup=lambda w, d: copy(w, "lat", d), may_change=("lat",),
         check=lambda w, d, out: _assert(json.loads((d / "lat/meta.json").read_text())["count"] == 4)),
    Case("extract-latents clears what a killed extraction into the same --out left",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", d / "lat", "--no-progress"],
         0, r"wrote 4 x", setup=lambda w, d: (d / ".lat.tmp-0123abcd").mkdir() or (d / ".lat.tmp-0123abcd/x").touch(),
         may_change=(".lat.tmp-",)),
    Case("train-tokenizer into a folder of the user's files",
         lambda w, d: ["train-tokenizer", "--out", w / "user", *TINY_RUN], 2, "not a textok run"),
    Case("train-tokenizer --out an existing file", lambda w, d: ["train-tokenizer", "--out", w / "user/photo.png",
                                                                *TINY_RUN], 2, "is a file"),
    Case("reconstruct on a full disk leaves the previous PNG whole", reconstruct(out="o.png"), 2,
         "No space left on device", setup=lambda w, d: shutil.copy(w / "user/photo.png", d / "o.png"),
         patch=_full_disk),
    # -- resume ---------------------------------------------------------------------------------------
    Case("resume with another batch size is refused", train("batch_size=8"), 2, r"batch_size: 4 -> 8",
         setup=lambda w, d: copy(w, "run", d)),
    Case("resume with another seed is refused", train("seed=1"), 2, r"seed: 0 -> 1",
         setup=lambda w, d: copy(w, "run", d)),
    Case("resume with another lr says what changed", train("optim.lr=5e-4"), 0,
         r"resuming with changed settings: .*optim.lr: 0.002 -> 0.0005", setup=lambda w, d: copy(w, "run", d),
         may_change=("run",), check=_bigger_than_its_checkpoints),
    Case("resume below the checkpoint's step is refused",
         lambda w, d: ["train-tokenizer", "--out", d / "run", *TINY_RUN, "--max-steps", "1"], 2,
         r"max_steps: 1 is below the checkpoint's step 2", setup=lambda w, d: copy(w, "run", d)),
    Case("resume with another model config is refused", train("model.num_tokens=8"), 2, r"num_tokens: 4 != 8",
         setup=lambda w, d: copy(w, "run", d)),
    # -- corrupt files ---------------------------------------------------------------------------------
    Case("truncated model.safetensors", reconstruct(copied=True), 2, r"model.safetensors is corrupt",
         setup=lambda w, d: truncate(copy(w, "tok", d) / "model.safetensors")),
    Case("garbage model.safetensors", reconstruct(copied=True), 2, r"model.safetensors is corrupt",
         setup=lambda w, d: (copy(w, "tok", d) / "model.safetensors").write_bytes(b"garbage" * 9)),
    Case("truncated config.json", reconstruct(copied=True), 2, r"config.json is corrupt",
         setup=lambda w, d: truncate(copy(w, "tok", d) / "config.json")),
    Case("config.json holding a list", reconstruct(copied=True), 2, r"config.json is corrupt",
         setup=lambda w, d: (copy(w, "tok", d) / "config.json").write_text("[1, 2]")),
    Case("config.json with a value of the wrong type (edited by hand, SHA256SUMS deleted)", reconstruct(copied=True),
         2, r"image_size='big': expected a value of type int",
         setup=lambda w, d: (edit_config(w, d, image_size="big"), (d / "tok/SHA256SUMS").unlink())),
    Case("latents meta.json that is garbage",
         lambda w, d: ["train-generator", "--latents", d / "lat", "--out", d / "g", "--max-steps", "1", *SMALL_DIT],
         2, r"meta.json \(latents metadata\) is corrupt",
         setup=lambda w, d: (copy(w, "lat", d) / "meta.json").write_text("{garbage")),
    Case("a truncated latents shard",
         lambda w, d: ["train-generator", "--latents", d / "lat", "--out", d / "g", "--max-steps", "1", *SMALL_DIT],
         2, r"shard-00000.safetensors \(latents shard\) is corrupt",
         setup=lambda w, d: truncate(copy(w, "lat", d) / "shard-00000.safetensors")),
    Case("a damaged latest checkpoint: resume falls back to the previous one", train(), 0,
         r"(?s)skipping a damaged checkpoint: .*step-0000002.*resuming from .*step-0000001",
         setup=lambda w, d: truncate(copy(w, "run", d) / "checkpoints/step-0000002/model.safetensors"),
         may_change=("run",), check=_bigger_than_its_checkpoints),
    Case("a flipped bit in the latest checkpoint's weights: its sha256 fails, resume falls back", train(), 0,
         r"(?s)skipping a damaged checkpoint: .*step-0000002 is corrupt \(model.safetensors does not match the "
         r"sha256.*resuming from .*step-0000001",
         setup=lambda w, d: flip_last_byte(copy(w, "run", d) / "checkpoints/step-0000002/model.safetensors"),
         may_change=("run",)),
    Case("a latest checkpoint whose meta.json is garbage: resume falls back", train(), 0,
         r"resuming from .*step-0000001", may_change=("run",),
         setup=lambda w, d: (copy(w, "run", d) / "checkpoints/step-0000002/meta.json").write_text("{")),
    Case("every checkpoint damaged: refused, nothing restarted over them", train(), 2,
         r"no checkpoint in .* can be read", setup=damage_both_checkpoints),
    Case("a corrupt text cache is encoded again",
         lambda w, d: ["train-tokenizer", "--out", d / "t", *TINY_RUN[:-2], "--max-steps", "1",
                       "data.captions_per_image=1", f"text_cache={d / 'cache.safetensors'}"],
         0, r"text cache .*cache.safetensors is corrupt",
         setup=lambda w, d: (d / "cache.safetensors").write_bytes(b"x" * 64),
         may_change=("cache.safetensors",),
         check=lambda w, d, out: _assert(len(_cache_keys(d / "cache.safetensors")) > 0)),
    # -- output paths ----------------------------------------------------------------------------------
    Case("reconstruct --out in folders that do not exist yet", reconstruct(out="new/sub/o.png"), 0, r"wrote .*o.png",
         check=lambda w, d, out: _assert(Image.open(d / "new/sub/o.png").size[0] > 0)),
    Case("reconstruct --out where nothing can be written", reconstruct(out="/proc/textok-nowhere/o.png"), 2,
         r"No such file|Permission denied|Read-only|cannot write"),
    Case("reconstruct --out a directory", lambda w, d: reconstruct()(w, d)[:-1] + [d], 2, "is a directory"),
    Case("reconstruct --out with an unknown extension", reconstruct(out="o.xyz"), 2, r"unknown image extension '.xyz'"),
    Case("reconstruct --out without an extension", reconstruct(out="o"), 2, "no file extension"),
    Case("reconstruct --out under a file", lambda w, d: reconstruct()(w, d)[:-1] + [w / "user/photo.png/o.png"], 2,
         "is a file, not a folder"),
    Case("eval --out a directory", lambda w, d: ["eval", "reconstruction", "--model", w / "tok", "--num", "2",
                                                 "--quiet", "--out", d], 2, "is a directory"),
    Case("sample --out a directory", lambda w, d: sample("--out", d)(w, d), 2, "is a directory"),
    Case("sample --out with an unknown extension", lambda w, d: sample("--out", d / "s.xyz")(w, d), 2,
         "unknown image extension"),
    Case("sample --npz a directory", lambda w, d: sample("--npz", d, "--num", "2")(w, d), 2,
         r"--npz .* is a directory"),
    # -- an output is never one of the inputs, nor inside one -------------------------------------------
    Case("eval --out a model's own config.json",
         lambda w, d: ["eval", "reconstruction", "--model", d / "tok", "--num", "2", "--quiet", "--fd-size", "32",
                       "--out", d / "tok/config.json"], 2, r"--out .*tok/config.json lies inside --model .*tok, which "
         r"this command reads.*choose an --out outside the inputs", setup=lambda w, d: copy(w, "tok", d)),
    Case("eval --save-ref-stats into the samples folder",
         lambda w, d: ["eval", "generation", "--samples", w / "user", "--ref", "scenes", "--save-ref-stats",
                       w / "user/ref.npz"], 2, r"--save-ref-stats .*ref.npz lies inside --samples"),
    Case("reconstruct --out inside the model", lambda w, d: reconstruct()(w, d)[:-1] + [w / "tok/grid.png"], 2,
         r"--out .*tok/grid.png lies inside --model"),
    Case("sample --out inside the generator", lambda w, d: sample("--out", w / "gen/final/s.png")(w, d), 2,
         r"lies inside --generator"),
    Case("sample --npz the same file as --out", lambda w, d: sample("--out", d / "s.png", "--npz", d / "s.png")(w, d),
         2, r"--npz .*s.png is --out .*s.png too; give the two outputs different paths"),
    Case("extract-latents --out inside its tokenizer",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", w / "tok/lat",
                       "--no-progress"], 2, r"lies inside --tokenizer"),
    Case("extract-latents --out holding its tokenizer",
         lambda w, d: ["extract-latents", "--tokenizer", d / "box/tok", "--num", "4", "--out", d / "box",
                       "--no-progress"], 2, r"--out .*box holds --tokenizer .*would be replaced",
         setup=lambda w, d: shutil.copytree(w / "tok", d / "box/tok")),
    Case("train-tokenizer --out inside its data", lambda w, d: ["train-tokenizer", "--out", d / "data/run", *TINY_RUN,
                                                                f"data.source={d / 'data'}"], 2,
         r"lies inside data.source", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("train-generator --out inside its latents",
         lambda w, d: ["train-generator", "--latents", w / "lat", "--out", w / "lat/run", "--max-steps", "1",
                       *SMALL_DIT], 2, r"lies inside --latents"),
    Case("make-shards --out inside its source", lambda w, d: ["make-shards", d / "data", "--out", d / "data/shards"],
         2, r"lies inside SOURCE", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("make-shards --out a folder of the user's files",
         lambda w, d: ["make-shards", d / "data", "--out", w / "user", "--no-progress"], 2,
         r"already holds files that are not a shard directory", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("make-shards replaces its own shards", make_shards_of("data"), 0, r"wrote .*shards/index.json",
         setup=lambda w, d: (data_folder(d, captions_for(2)), run_cli(make_shards_of("data")(w, d))),
         may_change=("shards",)),
    Case("study --out a folder of the user's files", lambda w, d: ["study", "--out", w / "user", "--tokens", "4"], 2,
         r"--out .*user already holds files that are not a textok study"),
    Case("encode-captions --store a folder of the user's files",
         lambda w, d: ["encode-captions", d / "data", "--store", w / "user", "--no-progress"], 2,
         r"--store .*user already holds files that are not a text-state store",
         setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("encode-captions --store inside its source",
         lambda w, d: ["encode-captions", d / "data", "--store", d / "data/store", "--no-progress"], 2,
         r"--store .*store lies inside SOURCE", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("eval --out where the system refuses to write names --out",
         lambda w, d: ["eval", "reconstruction", "--model", w / "tok", "--num", "2", "--quiet", "--out",
                       "/sys/textok-results.json"], 2, r"--out /sys/textok-results.json: cannot write in /sys "
         r"\(.*\); choose another --out"),
    Case("extract-latents --out where the system refuses to write names --out",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--num", "4", "--out", "/sys/textok-lat",
                       "--no-progress"], 2, r"--out /sys/textok-lat: cannot write in /sys"),
    # -- images -----------------------------------------------------------------------------------------
    Case("reconstruct --out one of its input images", lambda w, d: reconstruct()(w, d)[:-1] + [w / "img.png"], 2,
         r"--out .*img.png is --image .*img.png, which this command reads"),
    Case("text_cache= naming a file that is not a cache",
         lambda w, d: ["train-tokenizer", "--out", d / "t", *TINY_RUN[:-2], "--max-steps", "1",
                       f"text_cache={w / 'user/notes.txt'}"], 2, r"notes.txt is not a textok text cache"),
    Case("reconstruct an image that is not one", reconstruct(image="garbage.png"), 2, "cannot be decoded"),
    Case("reconstruct an image that does not exist", reconstruct(image="nope.png"), 2, "does not exist"),
    Case("reconstruct a directory as an image", reconstruct(image="user"), 2, "is a directory"),
    Case("reconstruct a decompression bomb", reconstruct(image="bomb.png"), 2, "decompression bombs"),
    Case("reconstruct a 16-bit PNG", reconstruct(image="gray16.png"), 0, "PSNR"),
    Case("reconstruct with a model folder that does not exist", reconstruct("nope"), 2, "config.json is missing"),
    # -- captions ---------------------------------------------------------------------------------------
    Case("a text tokenizer without --caption", reconstruct("tok_text"), 2, "pass --caption"),
    Case("two captions for one image", reconstruct("tok_text", "img.png", "o.png", "--caption", "a", "b"), 2,
         "got 2 captions for 1 images"),
    Case("a caption that is not UTF-8",
         reconstruct("tok_text", "img.png", "o.png", "--caption", os.fsdecode(b"caf\xe9")),
         2, "caption 0 is not valid UTF-8"),
    Case("an empty caption", reconstruct("tok_text", "img.png", "o.png", "--caption", "  "), 2, "caption 0 is empty"),
    # -- captions.jsonl ---------------------------------------------------------------------------------
    Case("captions.jsonl: a line that is not JSON", eval_data(), 2, "captions line 2 is not a JSON object",
         setup=lambda w, d: data_folder(d, [captions_for(1)[0], "{not json"])),
    Case("captions.jsonl: a JSON list", eval_data(), 2, "captions line 1 is not a JSON object",
         setup=lambda w, d: data_folder(d, ["[1, 2]"])),
    Case("captions.jsonl: a number as the file", eval_data(), 2, r"captions line 1: 'file' must be a path",
         setup=lambda w, d: data_folder(d, [{"file": 3, "caption": "x"}])),
    Case("captions.jsonl: numbers as captions", eval_data(), 2,
         r"captions line 1 \(0.png\): 'captions' must be a list of strings",
         setup=lambda w, d: data_folder(d, [{"file": "0.png", "captions": [1, 2]}])),
    Case("captions.jsonl: a number as the caption", eval_data(), 2, r"'captions' must be a list of strings",
         setup=lambda w, d: data_folder(d, [{"file": "0.png", "caption": 5}])),
    Case("captions.jsonl: a mapping as the label", eval_data(), 2, r"'label' must be a class name or an integer",
         setup=lambda w, d: data_folder(d, [{"file": "0.png", "caption": "x", "label": {"a": 1}}])),
    Case("captions.jsonl: bytes that are not UTF-8", eval_data(), 2, r"line 2 is not UTF-8 text \(byte 0xe9",
         setup=lambda w, d: data_folder(d, [captions_for(1)[0], b'{"file": "1.png", "caption": "caf\xe9"}'])),
    Case("captions.jsonl: a path that leaves the dataset", eval_data(), 2,
         r"file '../outside.png' is outside the dataset",
         setup=lambda w, d: data_folder(d, [{"file": "../outside.png", "caption": "x"}])),
    Case("captions.jsonl: an absolute path", eval_data(), 2, r"file '/etc/hostname' is outside the dataset",
         setup=lambda w, d: data_folder(d, [{"file": "/etc/hostname", "caption": "x"}])),
    Case("captions.jsonl: an image without a caption", eval_data(), 2, r"has no caption",
         setup=lambda w, d: data_folder(d, [{"file": "0.png"}])),
    # -- saved models carry checksums ------------------------------------------------------------------
    Case("a flipped bit in a saved model's weights", reconstruct(copied=True), 2,
         r"tok/model.safetensors is corrupt \(model.safetensors does not match the sha256",
         setup=lambda w, d: flip_last_byte(copy(w, "tok", d) / "model.safetensors")),
    Case("a flipped bit in a generator's weights",
         lambda w, d: ["sample", "--generator", d / "final", "--tokenizer", w / "tok", "--steps", "1", "--n", "1",
                       "--no-progress", "--out", d / "s.png"], 2,
         r"final/model.safetensors is corrupt \(model.safetensors does not match the sha256",
         setup=lambda w, d: flip_last_byte(shutil.copytree(w / "gen/final", d / "final") / "model.safetensors")),
    Case("a saved model's config.json changed after saving", reconstruct(copied=True), 2,
         r"config.json is corrupt \(config.json does not match the sha256.*delete SHA256SUMS",
         setup=lambda w, d: edit_config(w, d, text_max_length=32)),
    Case("a saved model without SHA256SUMS (older or hand-made) still loads", reconstruct(copied=True), 0, "PSNR",
         setup=lambda w, d: (copy(w, "tok", d) / "SHA256SUMS").unlink(), may_change=("o.png",)),
    Case("a garbled SHA256SUMS", reconstruct(copied=True), 2, r"SHA256SUMS is corrupt",
         setup=lambda w, d: (copy(w, "tok", d) / "SHA256SUMS").write_text("not a sum\n")),
    # -- datasets stay inside their root ---------------------------------------------------------------
    Case("captions.jsonl: a symbolic link out of the dataset", eval_data("--num", "3"), 2,
         r"file 'link.png' is outside the dataset \(a symbolic link leads to .*outside.png",
         setup=lambda w, d: linked_out(d, "link.png", scene_png(d / "outside.png"))),
    Case("captions.jsonl: a file under a linked folder out of the dataset", eval_data(), 2,
         r"file 'sub/outside.png' is outside the dataset",
         setup=lambda w, d: (scene_png(d / "outside.png"),
                             data_folder(d, [{"file": "sub/outside.png", "caption": "x"}]),
                             (d / "data/sub").symlink_to(d))),
    Case("a symbolic link within the dataset is read", eval_data("--num", "3"), 0, "PSNR",
         setup=lambda w, d: linked_out(d, "alias.png", Path("0.png")),
         check=lambda w, d, out: _assert("skipped_images" not in out)),
    Case("class folders: a symbolic link out of the dataset", eval_on("data"), 2,
         r"file 'dog/evil.png' is outside the dataset",
         setup=lambda w, d: (class_folders(d) / "dog/evil.png").symlink_to(w / "img.png")),
    Case("a tar member named outside the archive", eval_on("data.tar"), 2,
         r"member '../evil.png' is outside the archive", setup=lambda w, d: data_tar(d, [("../evil.png", b"x")])),
    Case("a tar member linking outside the archive", eval_on("data.tar"), 2,
         r"link 'evil.png' -> '/etc/hostname' is outside the archive",
         setup=lambda w, d: data_tar(d, [("evil.png", "/etc/hostname")])),
    Case("a tar member linking to another member is read", eval_on("data.tar"), 0, r"3 images",
         setup=lambda w, d: data_tar(d, [("sub/alias.png", "../1.png")]),
         check=lambda w, d, out: _assert("skipped_images" not in out)),
    Case("a truncated tar", eval_on("data.tar"), 2, r"data.tar is a truncated or damaged tar archive",
         setup=lambda w, d: cut_in_a_member(data_tar(d, []))),
    Case("make-shards of a truncated tar", make_shards_of("data.tar"), 2, r"truncated or damaged tar archive",
         setup=lambda w, d: cut_in_a_member(data_tar(d, [])),
         check=lambda w, d, out: _assert(not (d / "shards").exists())),
    Case("make-shards of a folder with a link out of it", make_shards_of("data"), 2,
         r"file 'link.png' is outside the dataset",
         setup=lambda w, d: linked_out(d, "link.png", w / "user/photo.png"),
         check=lambda w, d, out: _assert(not (d / "shards").exists())),
    Case("a shard index naming a shard outside its directory",
         lambda w, d: ["eval", "reconstruction", "--model", w / "tok", "--data", d / "shards", "--split", "train",
                       "--num", "1", "--quiet", "--fd-size", "32"], 2,
         r"shard '../elsewhere.tar' is outside the shard directory",
         setup=lambda w, d: (d / "shards").mkdir() or (d / "shards/index.json").write_text(json.dumps(
             {"format": "textok-shards-1", "class_names": [], "splits": {"train": [
                 {"name": "../elsewhere.tar", "count": 1}]}}))),
    # -- the last tracebacks, and the silent ones ------------------------------------------------------
    Case("a caption bank that is not JSON", lambda w, d: ["train-tokenizer", "--out", d / "run", *TINY_RUN,
                                                          "--max-steps", "1", f"data.source={d / 'data'}",
                                                          f"data.caption_bank={d / 'bank.json'}"], 2,
         r"caption bank .*bank.json is corrupt",
         setup=lambda w, d: (class_folders(d), (d / "bank.json").write_text("{garbage"))),
    Case("a caption bank that is a list", lambda w, d: ["train-tokenizer", "--out", d / "run", *TINY_RUN,
                                                        "--max-steps", "1", f"data.source={d / 'data'}",
                                                        f"data.caption_bank={d / 'bank.json'}"], 2,
         r"caption bank .*bank.json must be a JSON object \{class name: \[captions, ...\]\}",
         setup=lambda w, d: (class_folders(d), (d / "bank.json").write_text('["a cat", "a dog"]'))),
    Case("make-shards with a caption bank that is not JSON",
         make_shards_of("data", "--caption-bank", "bank.json"), 2, r"caption bank bank.json is corrupt",
         setup=lambda w, d: (class_folders(d), (d / "bank.json").write_bytes(b"\x00\x01")),
         check=lambda w, d, out: _assert(not (d / "shards").exists())),
    Case("make-shards with a caption bank of strings",
         make_shards_of("data", "--caption-bank", "bank.json"), 2, r"must be a JSON object",
         setup=lambda w, d: (class_folders(d), (d / "bank.json").write_text('{"cat": "a cat", "dog": "a dog"}'))),
    Case("encode-captions: a captions.jsonl line that is not JSON",
         lambda w, d: ["encode-captions", d / "c.jsonl", "--store", d / "store", "--no-progress"], 2,
         r"c.jsonl line 2 is not a JSON object",
         setup=lambda w, d: (d / "c.jsonl").write_text('{"caption": "a cat"}\n{"caption": "a dog\n')),
    Case("encode-captions: numbers as captions",
         lambda w, d: ["encode-captions", d / "c.jsonl", "--store", d / "store", "--no-progress"], 2,
         r"c.jsonl line 1: 'captions' must be a list of strings",
         setup=lambda w, d: (d / "c.jsonl").write_text('{"captions": [1, 2]}\n')),
    Case("encode-captions --max-length 0",
         lambda w, d: ["encode-captions", d / "c.jsonl", "--store", d / "store", "--max-length", "0"], 2,
         r"--max-length 0 must be at least 1", setup=lambda w, d: (d / "c.jsonl").write_text('{"caption": "a"}\n')),
    Case("make-shards --image-size 0", make_shards_of("data", "--image-size", "0"), 2,
         r"--image-size 0 must be at least 1 pixel", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("make-shards --image-size -8", make_shards_of("data", "--image-size", "-8"), 2,
         r"--image-size -8 must be at least 1 pixel", setup=lambda w, d: data_folder(d, captions_for(2))),
    Case("eval generation of samples holding NaN",
         lambda w, d: ["eval", "generation", "--samples", d / "nan.npz", "--ref", d / "ref.npz", "--quiet",
                       "--fd-size", "32"], 2, r"the samples hold 1 NaN or inf values", setup=nan_samples),
    Case("a full disk while saving a checkpoint", train("--ckpt-every", "1"), 2,
         r"no space left on the disk of .*run/checkpoints while writing step-0000003 \(No space left on device\); "
         r"the last checkpoint, .*step-0000002, is intact",
         patch=lambda mp: full_disk_at(mp, "/.step-0000003.tmp-"),
         may_change=("run",), check=lambda w, d, out: _assert(
             sorted(p.name for p in (d / "run/checkpoints").iterdir()) == ["step-0000001", "step-0000002"])),
    Case("a full disk while writing final/", train(), 2,
         r"no space left on the disk of .*run while writing final .*the last checkpoint, .*step-0000003, is intact",
         patch=lambda mp: full_disk_at(mp, "/.final.tmp-"), may_change=("run",),
         check=lambda w, d, out: _assert(not (d / "run/final").exists())),
    Case("captions.jsonl: class names and integer ids in one file", eval_data("--num", "3"), 2,
         r"captions line 2 \(1.png\): label 0 is an integer id, but line 1 gave a class name \('cat'\)",
         setup=lambda w, d: data_folder(d, [{"file": "0.png", "caption": "x", "label": "cat"},
                                            {"file": "1.png", "caption": "y", "label": 0}])),
    Case("captions.jsonl: a listed image that does not exist is counted as missing", eval_data("--num", "3"), 0,
         r"warning: 1 of the 3 images listed for split 'val' of .* do not exist \(first: 'gone.png'\)",
         setup=lambda w, d: data_folder(d, [*captions_for(2), {"file": "gone.png", "caption": "x"}]),
         check=lambda w, d, out: _assert("skipped_images" not in out)),
    Case("make-shards of a folder listing an image that does not exist", make_shards_of("data"), 0,
         r"warning: 1 of the 3 images listed .* do not exist", may_change=("shards",),
         setup=lambda w, d: data_folder(d, [*captions_for(2), {"file": "gone.png", "caption": "x"}])),
    Case("serve --port out of range", lambda w, d: ["serve", "--port", "70000"], 2,
         r"argument --port: '70000' is not a port: give 0 \(any free port\) to 65535"),
    Case("serve --port negative", lambda w, d: ["serve", "--port=-1"], 2, r"'-1' is not a port"),
    Case("train-generator model.num_tokens that the latents decide",
         lambda w, d: ["train-generator", "--latents", w / "lat", "--out", d / "g", "--max-steps", "1", *SMALL_DIT,
                       "model.num_tokens=99"], 2,
         r"model.num_tokens=99 cannot apply: training sets num_tokens to 4 from the latents"),
    # -- recipes and overrides --------------------------------------------------------------------------
    Case("a recipe that does not parse", FROM_RECIPE,
         2, r"recipe.yaml is not valid YAML", setup=lambda w, d: recipe(d, "max_steps: 2\ndata: [1,\n")),
    Case("a recipe with a value of the wrong type",
         FROM_RECIPE, 2,
         r"batch_size='abc': expected a value of type int",
         setup=lambda w, d: recipe(d, "max_steps: 2\nbatch_size: abc\n")),
    Case("the same mistake as an override", train("batch_size=abc"), 2,
         r"batch_size='abc': expected a value of type int"),
    Case("a recipe with a section of the wrong type",
         FROM_RECIPE, 2,
         r"optim=5: expected a mapping", setup=lambda w, d: recipe(d, "max_steps: 2\noptim: 5\n")),
    Case("a recipe that is a list", FROM_RECIPE,
         2, r"must hold a mapping", setup=lambda w, d: recipe(d, "- 1\n- 2\n")),
    Case("a recipe with a !!python tag", FROM_RECIPE,
         2, r"not valid YAML .*no !!python tags",
         setup=lambda w, d: recipe(d, "max_steps: !!python/object/apply:os.system ['touch pwned']\n"),
         check=lambda w, d, out: _assert(not (d / "pwned").exists())),
    Case("a recipe that is not UTF-8", FROM_RECIPE,
         2, r"not UTF-8", setup=lambda w, d: recipe(d, b"max_steps: 2\nmodel: caf\xe9\n")),
    Case("a misspelt key in a recipe", FROM_RECIPE,
         2, r"did you mean 'batch_size'", setup=lambda w, d: recipe(d, "max_steps: 2\nbatchsize: 3\n")),
    Case("--ckpt-every 0", train("--ckpt-every", "0"), 2, r"ckpt_every=0 must be at least 1"),
    Case("log_every=0", train("log_every=0"), 2, r"log_every=0 must be at least 1"),
    Case("keep_last=0", train("keep_last=0"), 2, r"keep_last=0 must be at least 1"),
    Case("sample_every=-1", train("sample_every=-1"), 2, r"sample_every=-1 must be 0 \(never\) or more"),
    Case("batch_size=none", train("batch_size=none"), 2, r"batch_size='none': expected a value of type int"),
    Case("max_steps=inf", train("max_steps=inf"), 2, r"max_steps='inf': expected a value of type int"),
    Case("a tuple that does not parse", train("optim.betas=[0.9,"), 2, r"optim.betas='\[0.9,': expected"),
    Case("train-generator --ckpt-every 0",
         lambda w, d: ["train-generator", "--latents", w / "lat", "--out", d / "g", "--ckpt-every", "0", *SMALL_DIT],
         2, r"ckpt_every=0 must be at least 1"),
    Case("a negative learning rate", train("optim.lr=-1"), 2, r"lr \(-1.0\).* must be >= 0"),
    Case("Adam betas that are not two numbers", train("optim.betas=[0.9]"), 2, r"optim.betas=\[0.9\] must be two"),
    Case("a device that is not one", train("device=bogus"), 2, r"device 'bogus' is not a device"),
    Case("a CUDA device this machine lacks",
         lambda w, d: ["extract-latents", "--tokenizer", w / "tok", "--device", "cuda:99", "--out", d / "l"], 2,
         r"device 'cuda:99': this machine has .*CUDA GPU"),
    Case("an unknown tokenizer preset", lambda w, d: ["train-tokenizer", "--config", "textok-tinyy", "--out", d / "r"],
         2, r"did you mean 'textok-tiny'"),
    # -- undecodable training data ----------------------------------------------------------------------
    Case("a whole batch of undecodable images is skipped and counted",
         lambda w, d: ["train-tokenizer", "--out", d / "run", *TINY_RUN, "--max-steps", "2",
                       f"data.source={d / 'data'}"],
         0, r"skipped \d+ images that could not be decoded", setup=lambda w, d: data_folder(d, captions_for(8), 1, 7),
         may_change=("run",)),
    Case("no image decodes", lambda w, d: ["train-tokenizer", "--out", d / "run", *TINY_RUN, "--max-steps", "2",
                                           f"data.source={d / 'data'}"],
         2, r"could be decoded", setup=lambda w, d: data_folder(d, captions_for(8), 0, 8)),
    # -- generators -------------------------------------------------------------------------------------
    Case("sample with guidance below 1", lambda w, d: sample("--out", d / "s.png", "--cfg", "0.5")(w, d), 2,
         "must be >= 1"),
    Case("DDPM sampling in a single step", lambda w, d: sample("--out", d / "s.png", "--sampler", "ddpm")(w, d), 0,
         "wrote", may_change=("s.png",)),
    Case("sample a class that does not exist", lambda w, d: sample("--out", d / "s.png", "--class", "99")(w, d), 2,
         "out of range"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path
    monkeypatch.chdir(d)  # anything a row writes by accident lands here, where it is seen
    if case.setup is not None:
        case.setup(ws, d)
    before_ws, before_d = snapshot(ws), snapshot(d)
    if case.patch is not None:
        case.patch(monkeypatch)
    code, out, err = run_cli(case.argv(ws, d))
    monkeypatch.undo()
    assert "Traceback" not in out + err, err
    assert code == case.code, (out, err)
    if case.code == 0:
        assert re.search(case.message, out + err), (out, err)
    else:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and re.search(case.message, errors[0]), err
    assert changed_files(before_ws, snapshot(ws), ()) == []
    assert changed_files(before_d, snapshot(d), case.may_change) == []
    assert not [p for p in d.rglob("*") if ".tmp-" in p.name]  # no temporary file left behind
    if case.check is not None:
        case.check(ws, d, out)


# ---- what only a real process shows -----------------------------------------------------------------
def textok_process(*argv, **kwargs) -> subprocess.Popen:
    """``python -m textok.cli ARGV`` (the command a user types, in a process of its own), with this process's
    thread count: bit-exact comparisons hold for one thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [a if isinstance(a, bytes) else str(a) for a in argv]
    return subprocess.Popen([sys.executable, "-m", "textok.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **kwargs)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"exited before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# A constant learning rate after warm-up, so that stopping and resuming with another max_steps keeps the schedule.
FLAT_LR = ["optim.min_lr_ratio=1.0", "ckpt_every=100000"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_its_number(sig: int, tmp_path: Path) -> None:
    """kill / timeout / SLURM / docker stop (SIGTERM) is handled like Ctrl-C: save, say so, exit 143 (130), so
    that `train && extract-latents` stops; the run then resumes bit-exactly."""
    out = tmp_path / "run"
    p = textok_process("train-tokenizer", "--out", out, *TINY_RUN, "--max-steps", "100000", *FLAT_LR)
    wait_for(lambda: (out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 2, p,
             "two logged steps")
    p.send_signal(sig)
    stdout, stderr = (s.decode() for s in p.communicate(timeout=300))
    assert p.returncode == 128 + sig, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert f"interrupted by {signal.Signals(sig).name}" in stderr
    step = int(re.search(r"interrupted: saved step (\d+)", stdout).group(1))
    assert [c.name for c in (out / "checkpoints").iterdir()] == [f"step-{step:07d}"]
    if sig != signal.SIGTERM:
        return
    more = ["--max-steps", str(step + 2), *FLAT_LR]
    assert run_cli(["train-tokenizer", "--out", out, *TINY_RUN, *more])[0] == 0
    assert run_cli(["train-tokenizer", "--out", tmp_path / "straight", *TINY_RUN, *more])[0] == 0
    assert snapshot(out / "final") == snapshot(tmp_path / "straight/final")  # bit-identical weights


def test_a_second_run_on_the_same_out_is_refused_while_the_first_is_alive(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom textok.train.rundir import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train-tokenizer", "--out", out, *TINY_RUN, "--max-steps", "1"]
        code, stdout, stderr = run_cli(argv)
        assert code == 2 and "Traceback" not in stderr
        assert re.search(rf"in use by another textok run \(process {holder.pid} on ", stderr), stderr
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()  # dies holding the lock: its record stays in the lock file
        holder.wait()
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert f"taking over the lock of process {holder.pid}" in stdout


def test_caption_bytes_that_are_not_utf8_in_a_real_argv(ws: Path, tmp_path: Path) -> None:
    p = textok_process("reconstruct", "--model", ws / "tok_text", "--image", ws / "img.png", "--caption",
                       b"caf\xe9", "--out", tmp_path / "o.png")
    stdout, stderr = (s.decode() for s in p.communicate(timeout=300))
    assert p.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("textok reconstruct: error: caption 0 is not valid UTF-8")
    assert not (tmp_path / "o.png").exists()


def test_undecodable_batches_keep_resume_exact(tmp_path: Path) -> None:
    """A micro-batch with no decodable image gets a stand-in that depends only on its position, so N + N steps
    still equal 2N steps bit for bit."""
    data = data_folder(tmp_path, captions_for(8), 2, 6)
    common = [*TINY_RUN, f"data.source={data}", *FLAT_LR]
    assert run_cli(["train-tokenizer", "--out", tmp_path / "a", *common, "--max-steps", "4"])[0] == 0
    assert run_cli(["train-tokenizer", "--out", tmp_path / "b", *common, "--max-steps", "2"])[0] == 0
    code, stdout, _ = run_cli(["train-tokenizer", "--out", tmp_path / "b", *common, "--max-steps", "4"])
    assert code == 0 and "resuming from" in stdout
    assert snapshot(tmp_path / "a/final") == snapshot(tmp_path / "b/final")
    skipped = [json.loads(line)["skipped_images"] for line in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    batch = int(TINY_RUN[TINY_RUN.index("batch_size=4")].split("=")[1])
    assert max(skipped) >= batch  # a whole micro-batch was undecodable at least once


# ---- the Python API ---------------------------------------------------------------------------------
def _tiny(text: bool = False):
    from textok import TexTok, TexTokConfig

    torch.manual_seed(0)
    cfg = TexTokConfig.preset("textok-tiny")
    return TexTok(cfg if text else cfg.override(["text_in_encoder=false", "text_in_decoder=false"])).eval()


def _pixels(value: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    size = _tiny().config.image_size
    return torch.full((1, 3, size, size), value).to(dtype)


def _tokens(value: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cfg = _tiny().config
    return torch.full((1, cfg.num_tokens, cfg.token_channels), value).to(dtype)


API_CASES = [
    ("encode uint8 pixels", lambda w, d: _tiny().encode(_pixels(dtype=torch.uint8)), "not float"),
    ("encode NaN pixels", lambda w, d: _tiny().encode(_pixels(float("nan"))), "NaN or inf"),
    ("encode inf pixels", lambda w, d: _tiny().encode(_pixels(float("inf"))), "NaN or inf"),
    ("encode a numpy array", lambda w, d: _tiny().encode(_pixels().numpy()), "must be a float tensor"),
    ("encode the wrong size", lambda w, d: _tiny().encode(torch.zeros(1, 3, 8, 8)), "this model takes"),
    ("reconstruct NaN pixels", lambda w, d: _tiny()(_pixels(float("nan"))), "NaN or inf"),
    ("decode NaN tokens", lambda w, d: _tiny().decode(_tokens(float("nan"))), "tokens contain NaN"),
    ("decode integer tokens", lambda w, d: _tiny().decode(_tokens(dtype=torch.int64)), "not float"),
    ("decode tokens of the wrong shape", lambda w, d: _tiny().decode(torch.zeros(1, 3)), "this model decodes"),
    ("one string as the captions", lambda w, d: _tiny(text=True).encode(_pixels(), "a caption"), "not a single string"),
    ("save_pretrained over the user's folder", lambda w, d: _tiny().save_pretrained(w / "user"),
     "already holds files that textok did not write"),
    ("save_pretrained over a file", lambda w, d: _tiny().save_pretrained(w / "user/photo.png"), "is a file"),
    ("from_pretrained of a truncated model", lambda w, d: type(_tiny()).from_pretrained(
        (truncate(copy(w, "tok", d) / "model.safetensors"), d / "tok")[1]), "model.safetensors is corrupt"),
    ("from_pretrained of a model with a flipped bit", lambda w, d: type(_tiny()).from_pretrained(
        (flip_last_byte(copy(w, "tok", d) / "model.safetensors"), d / "tok")[1]), "does not match the sha256"),
    ("a config value of the wrong type", lambda w, d: type(_tiny().config).from_dict({"image_size": [16]}),
     r"image_size=\[16\]: expected a value of type int"),
    ("none for a value that cannot be none", lambda w, d: _tiny().config.override(["num_tokens=none"]),
     r"num_tokens='none': expected a value of type int"),
    ("a dataset path leaving its root", lambda w, d: __import__("textok.data.factory", fromlist=["x"]).build_dataset(
        str(data_folder(d, [{"file": "../x.png", "caption": "x"}])), "train", 16), "outside the dataset"),
    ("a ViT of width 0", lambda w, d: _tiny().config.override(["encoder.width=0"]), "a ViT needs width >= 1"),
    ("a negative number of scenes", lambda w, d: __import__("textok.data", fromlist=["x"]).CaptionedScenes(
        16, size=-1), "is negative"),
    ("a latents folder that is not one", lambda w, d: __import__("textok.generate", fromlist=["x"]).LatentDataset(
        w / "user"), "is not a latents directory"),
]


@pytest.mark.parametrize("name, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input(name: str, call, message: str, ws: Path, tmp_path: Path) -> None:
    from textok.errors import TextokError

    before = snapshot(ws)
    with pytest.raises(TextokError, match=message):
        call(ws, tmp_path)
    assert changed_files(before, snapshot(ws), ()) == []


def test_other_float_precisions_are_computed_in_the_model_s() -> None:
    model = _tiny()
    reference = model.encode(_pixels(0.5))
    for dtype in (torch.float64, torch.float16):
        assert torch.equal(model.encode(_pixels(0.5, dtype)), reference)  # 0.5 is exact in every precision
    assert model.decode(_tokens(0.5, torch.float64)).dtype == reference.dtype


def test_pixels_that_look_like_0_255_are_warned_about() -> None:
    white = float(np.iinfo(np.uint8).max)
    with pytest.warns(UserWarning, match=r"look like 0-255 pixels"):
        _tiny().encode(_pixels(white))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tiny().encode(_pixels(1.0))  # [-1, 1] is quiet


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path: Path) -> None:
    from textok.data.images import load_image

    side = 16
    x = load_image(str(gray16_png(tmp_path / "g.png", side)), side)
    ramp = torch.linspace(-1, 1, side)
    # the ramp over 0..65535 decodes to a ramp over [-1, 1] (convert("RGB") would clip it to almost all white)
    assert (x[0, 0] - ramp).abs().max() <= 1 / np.iinfo(np.uint8).max
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray -> RGB


# ---- the pieces behind the rows ---------------------------------------------------------------------
def test_stale_saves_are_cleaned_and_an_interrupted_replace_is_undone(tmp_path: Path) -> None:
    from textok.io import remove_stale

    (tmp_path / ".step-0000004.tmp-0123abcd").mkdir()  # a save killed while writing
    (tmp_path / ".final.old-89abcdef").mkdir()  # killed between "old -> trash" and "new -> final"
    (tmp_path / ".final.old-89abcdef/config.json").write_text("{}")
    (tmp_path / ".log.jsonl.tmp-00ff00ff").write_text("half")  # a file write killed
    (tmp_path / ".hidden-user-file").write_text("mine")
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".log.jsonl.tmp-00ff00ff", ".step-0000004.tmp-0123abcd"]
    assert (tmp_path / "final/config.json").is_file()  # the previous version is back
    assert (tmp_path / ".hidden-user-file").read_text() == "mine"


def test_atomic_file_keeps_the_old_content_when_a_write_fails(tmp_path: Path) -> None:
    from textok.io import atomic_file

    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(OSError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_text_cache_keeps_what_an_interrupted_encode_did(tmp_path: Path) -> None:
    """Captions are saved as they are encoded: a run stopped part-way (here by Ctrl-C) keeps them."""
    from textok.text.cache import TextEmbeddingCache
    from textok.text.embeddings import TextEmbeddings

    class Encoder:
        name, dim, calls = "toy", 4, 0

        def encode(self, captions):
            Encoder.calls += 1
            if Encoder.calls == 3:
                raise KeyboardInterrupt
            n = len(captions)
            return TextEmbeddings(torch.ones(n, 2, self.dim), torch.ones(n, 2, dtype=torch.bool))

    batch = 2
    cache = TextEmbeddingCache(Encoder(), batch_size=batch)
    with pytest.raises(KeyboardInterrupt):
        cache.warm([f"caption {i}" for i in range(4 * batch)], save_to=tmp_path / "c.safetensors", save_every_s=0)
    fresh = TextEmbeddingCache(Encoder(), batch_size=batch)
    assert fresh.load(tmp_path / "c.safetensors") == 2 * batch  # the two batches encoded before the interrupt


def test_a_model_preset_as_the_training_config_trains_with_a_recipe_of_its_size() -> None:
    from textok.models.registry import resolve_tokenizer_config
    from textok.train.config import CPU_MODEL_MAX_SIZE, CPU_RECIPE, RECIPES, TrainConfig, load_train_config

    tiny = load_train_config("textok-tiny")
    assert resolve_tokenizer_config("textok-tiny")[1].image_size <= CPU_MODEL_MAX_SIZE
    assert tiny == TrainConfig.from_file(RECIPES / f"{CPU_RECIPE}.yaml").override({"model": "textok-tiny"})
    assert tiny.loss.perceptual == "none" and tiny.loss.adversarial.weight == 0  # no 224-px open_nsfw on a CPU
    assert 0 < tiny.data.train_size and 0 < tiny.data.captions_per_image  # a subset of the scenes and captions
    big = load_train_config("textok-b-256-32")
    assert resolve_tokenizer_config("textok-b-256-32")[1].image_size > CPU_MODEL_MAX_SIZE
    assert big == TrainConfig(model="textok-b-256-32")  # the paper's recipe


def test_a_saved_model_s_sums_are_checked_by_sha256sum_too(tmp_path: Path) -> None:
    """SHA256SUMS lists every file save_pretrained wrote, in the format `sha256sum -c` reads."""
    model = save_textok(tmp_path / "m", "text_in_encoder=false", "text_in_decoder=false")
    listed = sorted(line.split("  ", 1)[1] for line in (model / "SHA256SUMS").read_text().splitlines())
    assert listed == sorted(p.name for p in model.iterdir() if p.name != "SHA256SUMS")
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=model).returncode == 0
        flip_last_byte(model / "model.safetensors")
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=model,
                              capture_output=True).returncode != 0


def test_class_names_get_the_same_ids_in_every_split(tmp_path: Path) -> None:
    """Names are numbered over the whole captions.jsonl, so 'cat' is one id in train and in val even when the val
    rows come first and name the classes in another order."""
    from textok.data.folder import ImageCaptionFolder

    rows = [{"file": "0.png", "caption": "x", "label": "dog", "split": "val"},
            {"file": "1.png", "caption": "y", "label": "cat", "split": "val"},
            {"file": "2.png", "caption": "z", "label": "cat", "split": "train"},
            {"file": "3.png", "caption": "w", "label": "dog", "split": "train"}]
    root = data_folder(tmp_path, rows, good=4)
    train, val = (ImageCaptionFolder(root, split) for split in ("train", "val"))
    ids = lambda data: {data.class_names[r["label"]]: r["label"] for r in data.records}  # noqa: E731
    assert ids(train) == ids(val) == {"dog": 0, "cat": 1}
    assert train.class_names == val.class_names
