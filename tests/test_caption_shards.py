"""Uncaptioned webdataset shards to captioned ones: `textok caption SHARD_DIR` (a tiny random BLIP) names each image
<tar name>/<key> with its shard's label, resumes and splits the work like a folder; `make-shards SHARD_DIR` writes
captioned shards (seeded shuffle read by offset) that training streams; bad inputs are one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_bad_inputs import changed_files, run_cli, snapshot
from test_caption import run_in_two_processes
from textok.cli import main
from textok.data.captioning import caption_dataset
from textok.data.shards import ShardSet
from textok.distributed import DistInfo
from textok.text.captioner import VLMCaptioner
from vlm_models import make_blip

FAST = ["--max-new-tokens", "6", "--no-progress", "--device", "cpu"]


def _jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def json_layout(root: Path) -> Path:
    """textok's own layout before captioning: train-00000{0,1}.tar + val-000000.tar of {key}.jpg + {key}.json
    (label, template captions) and index.json with the class names."""
    root.mkdir(parents=True)
    splits: dict[str, list] = {}
    n = 0
    for split, tars, per in (("train", 2, 3), ("val", 1, 2)):
        for t in range(tars):
            members = []
            for _ in range(per):
                meta = {"captions": ["a photo."], "label": n % 2}
                members += [(f"{n:09d}.jpg", _jpeg(n)), (f"{n:09d}.json", json.dumps(meta).encode())]
                n += 1
            _tar(root / f"{split}-{t:06d}.tar", members)
            splits.setdefault(split, []).append({"name": f"{split}-{t:06d}.tar", "count": per})
    (root / "index.json").write_text(json.dumps({"format": "textok-shards-1", "class_names": ["n01", "n02"],
                                                 "splits": splits}))
    return root


def cls_layout(root: Path, tars: int = 3, per: int = 3) -> Path:
    """ImageNet's webdataset layout: {key}.jpg + {key}.cls (an integer id), no index, no split prefix; the class
    names in classes.txt (LOC_synset_mapping.txt's lines, in id order)."""
    root.mkdir(parents=True)
    for t in range(tars):
        members = []
        for i in range(per):
            key = f"n0{(t * per + i) % 2 + 1}_{t}{i}"
            members += [(f"{key}.cls", str((t * per + i) % 2).encode()), (f"{key}.jpg", _jpeg(100 + t * per + i))]
        _tar(root / f"imagenet-{t:06d}.tar", members)
    (root / "classes.txt").write_text("n01 dog, hound\nn02 cat\n")
    return root


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return make_blip(tmp_path_factory.mktemp("vlm") / "blip")


def test_json_layout_shards_get_captions_keyed_by_tar_and_key(blip, tmp_path, capsys):
    shards = json_layout(tmp_path / "shards")
    (tmp_path / "names.json").write_text(json.dumps({"n02": "cat", "n01": "dog"}))  # not in id order
    assert cli("caption", shards, "--vlm", blip, "--prompt", "a {class_name} photo", "--prompt", "this is",
               "--class-names", tmp_path / "names.json", "--captions-per-image", "2", "--batch-size", "2", *FAST) == 0
    rows = _rows(shards / "captions.jsonl")  # the default --out: inside the shard directory, as for a folder
    files = [f"train-000000.tar/{n:09d}" for n in range(3)] + [f"train-000001.tar/{n:09d}" for n in range(3, 6)] + \
        [f"val-000000.tar/{n:09d}" for n in range(6, 8)]
    assert [r["file"] for r in rows] == files and [r["label"] for r in rows] == [n % 2 for n in range(8)]
    for r in rows:  # label -> index.json's class names -> the map -> the prompt (BLIP continues it)
        assert r["captions"][0].split()[:3] == ["a", ["dog", "cat"][r["label"]], "photo"]
        assert r["captions"][1].split()[:2] == ["this", "is"]
    assert "wrote" in capsys.readouterr().out and not list(shards.glob(".captions.jsonl.caption"))
    assert cli("caption", shards, "--vlm", blip, "--splits", "val", "--out", tmp_path / "val.jsonl", *FAST) == 0
    assert [r["file"] for r in _rows(tmp_path / "val.jsonl")] == files[6:]


def test_cls_layout_labels_name_classes_through_the_map(blip, tmp_path):
    shards = cls_layout(tmp_path / "shards")
    assert cli("caption", shards, "--vlm", blip, "--prompt", "a {class_name} photo", "--batch-size", "4",
               *FAST) == 0
    rows = _rows(shards / "captions.jsonl")
    assert [r["file"] for r in rows][:3] == ["imagenet-000000.tar/n01_00", "imagenet-000000.tar/n02_01",
                                             "imagenet-000000.tar/n01_02"]
    assert len(rows) == 9 and [r["label"] for r in rows] == [i % 2 for i in range(9)]
    for r in rows:  # id n -> the map's n-th line -> its first name
        assert r["captions"][0].split()[:3] == ["a", ["dog", "cat"][r["label"]], "photo"]


def test_an_undecodable_image_is_named_not_fatal(blip, tmp_path, capsys):
    shards = cls_layout(tmp_path / "shards", tars=1)
    _tar(shards / "imagenet-000001.tar", [("bad.cls", b"1"), ("bad.jpg", b"not a jpeg"), ("good.cls", b"0"),
                                          ("good.jpg", _jpeg(7))])
    assert cli("caption", shards, "--vlm", blip, *FAST) == 0
    assert "imagenet-000001.tar/bad: cannot be decoded" in capsys.readouterr().out
    rows = _rows(shards / "captions.jsonl")
    assert len(rows) == 4 and rows[-1]["file"] == "imagenet-000001.tar/good"
    _captions(shards / "captions.jsonl", rows + [{"file": "imagenet-000001.tar/bad", "captions": ["a picture"]}])
    assert cli("make-shards", shards, "--out", tmp_path / "new", "--image-size", "16", "--no-progress") == 0
    assert "left out 1 images that could not be decoded" in capsys.readouterr().out
    assert len(ShardSet(tmp_path / "new", "train")) == 4


class Interrupted(Exception):
    pass


class StopAfter:
    """A captioner that is killed after ``n`` calls: the batches before it are on disk, the one in flight is not."""

    def __init__(self, captioner: VLMCaptioner, n: int) -> None:
        self.captioner, self.left = captioner, n

    def caption(self, *args, **kw):
        if self.left == 0:
            raise Interrupted
        self.left -= 1
        return self.captioner.caption(*args, **kw)


def test_resume_and_ranks_write_the_file_one_uninterrupted_run_writes(blip, tmp_path):
    shards = cls_layout(tmp_path / "shards")
    captioner = VLMCaptioner(blip, max_new_tokens=6)
    kw = dict(captions_per_image=2, batch_size=2, progress=False)
    caption_dataset(shards, tmp_path / "one.jsonl", captioner, ["a photography of"], **kw)
    one = (tmp_path / "one.jsonl").read_text()
    with pytest.raises(Interrupted):
        caption_dataset(shards, tmp_path / "resumed.jsonl", StopAfter(captioner, 5), ["a photography of"], **kw)
    part = tmp_path / ".resumed.jsonl.caption" / "part-00000.jsonl"
    assert part.read_text().count("\n") == 4 and not (tmp_path / "resumed.jsonl").exists()  # 2 batches of 2
    with open(part, "ab") as f:  # a write cut short
        f.write(b'{"file": "imagenet-000001.tar/n02_10", "captions": ["half')
    caption_dataset(shards, tmp_path / "resumed.jsonl", captioner, ["a photography of"], **kw)
    assert (tmp_path / "resumed.jsonl").read_text() == one
    # two ranks (as under torchrun, without the process group): each captions its batches, rank 0 merges
    assert caption_dataset(shards, tmp_path / "two.jsonl", captioner, ["a photography of"], info=DistInfo(1, 2),
                           **kw) is None
    assert not (tmp_path / "two.jsonl").exists()
    rank1 = {r["file"] for r in _rows(tmp_path / ".two.jsonl.caption" / "part-00001.jsonl")}
    assert len(rank1) == 4  # batches 1 and 3 of 5
    report = caption_dataset(shards, tmp_path / "two.jsonl", captioner, ["a photography of"], info=DistInfo(0, 2), **kw)
    assert report["images"] == 9 and (tmp_path / "two.jsonl").read_text() == one


@pytest.mark.slow
def test_two_torchrun_processes_write_the_file_one_process_writes(blip, tmp_path):
    shards = json_layout(tmp_path / "shards")
    args = ["caption", str(shards), "--vlm", str(blip), "--batch-size", "2", "--captions-per-image", "2", *FAST]
    assert main(args + ["--out", str(tmp_path / "one.jsonl")]) == 0
    run_in_two_processes(args + ["--out", str(tmp_path / "two.jsonl")])
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "two.jsonl").read_text() == one and len(one.splitlines()) == 8


def _captions(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("layout", [json_layout, cls_layout])
def test_make_shards_from_shards_writes_captioned_shards_training_reads(layout, tmp_path, capsys):
    shards = layout(tmp_path / "shards")
    sources = sorted(shards.glob("*.tar"))
    keys = []
    for tar in sources:
        with tarfile.open(tar) as t:
            keys += [f"{tar.name}/{m.name.rsplit('.', 1)[0]}" for m in t if m.name.endswith(".jpg")]
    rows = [{"file": k, "captions": [f"caption {i}", f"other {i}"]} for i, k in enumerate(keys)]
    stray = {"file": "gone-000000.tar/x", "captions": ["an image no shard holds"]}
    _captions(shards / "captions.jsonl", rows[1:] + [stray])  # the first image has no caption, one caption no image
    with pytest.warns(UserWarning, match=f"1 of the {len(rows)} captions .* name no sample .*gone-000000.tar/x"):
        assert cli("make-shards", shards, "--out", tmp_path / "new", "--shard-size", "2", "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"left out 1 images without a caption (first: {keys[0]})" in out
    by_file = {r["file"]: r for r in rows}
    seen = []
    for split in ("train", "val") if layout is json_layout else ("train",):
        data = ShardSet(tmp_path / "new", split, image_size=16)
        for shard in data.shards:
            with tarfile.open(shard.path) as t:
                for m in t:
                    if m.name.endswith(".json"):
                        meta = json.loads(t.extractfile(m).read())
                        assert meta["captions"] == by_file[meta["file"]]["captions"]
                        seen.append(meta["file"])
                        key = meta["file"].split("/")[1]  # n01_.. / n02_.. (.cls), or the number n (label n % 2)
                        label = int(key[2]) - 1 if layout is cls_layout else int(key) % 2
                        assert meta["label"] == label
        items = [it for it in data.samples() if it is not None]  # what training decodes
        assert all(it["image"].shape == (3, 16, 16) for it in items)
        assert {tuple(it["captions"]) for it in items} <= {tuple(r["captions"]) for r in rows}
    assert sorted(seen) == sorted(keys[1:])
    assert seen != keys[1:]  # shuffled (seeded)...
    with pytest.warns(UserWarning):
        assert cli("make-shards", shards, "--out", tmp_path / "again", "--shard-size", "2", "--no-progress") == 0
    for tar in (tmp_path / "new").glob("*.tar"):  # ... the same for the same seed
        assert tar.read_bytes() == (tmp_path / "again" / tar.name).read_bytes()
    index = json.loads((tmp_path / "new" / "index.json").read_text())
    assert index["class_names"] == (["n01", "n02"] if layout is json_layout else [])
    batch = next(ShardSet(tmp_path / "new", "train", image_size=16).stream(2, shuffle_buffer=4).batches(0))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["skipped"] == 0
    assert all(caps in [r["captions"] for r in rows[1:]] for caps in batch["captions"])


# ---- bad inputs: one line, nothing of the user's changed --------------------------------------------------
def _empty(d: Path) -> None:
    (d / "shards").mkdir()


def _not_a_tar(d: Path) -> None:
    cls_layout(d / "shards", tars=1)
    (d / "shards" / "notes-000001.tar").write_bytes(b"this is not a tar archive" * 40)


def _no_images(d: Path) -> None:
    cls_layout(d / "shards", tars=1)
    _tar(d / "shards" / "readme.tar", [("README.txt", b"hello")])


def _index_outside(d: Path) -> None:
    json_layout(d / "shards")
    (d / "shards" / "val-000000.tar").rename(d / "outside.tar")
    index = json.loads((d / "shards" / "index.json").read_text())
    index["splits"]["val"][0]["name"] = "../outside.tar"
    (d / "shards" / "index.json").write_text(json.dumps(index))


def _foreign_captions(d: Path) -> None:
    cls_layout(d / "shards", tars=1)
    _captions(d / "captions.jsonl", [{"file": "n01/n01_000.jpg", "captions": ["a folder's caption"]}])


CASES = [
    ("caption of an empty directory", lambda v, d: ["caption", d / "shards", "--vlm", v, *FAST], _empty,
     "holds no images"),
    ("caption of a shard directory with a file that is not a tar", lambda v, d: ["caption", d / "shards", "--vlm", v,
                                                                                 *FAST], _not_a_tar,
     "notes-000001.tar is not a readable tar"),
    ("caption of a tar without images", lambda v, d: ["caption", d / "shards", "--vlm", v, *FAST], _no_images,
     "readme.tar is not a webdataset shard"),
    ("caption of a shard index naming a shard outside its directory",
     lambda v, d: ["caption", d / "shards", "--vlm", v, *FAST], _index_outside, "is outside the shard directory"),
    ("make-shards of shards without captions", lambda v, d: ["make-shards", d / "shards", "--out", d / "new"],
     lambda d: cls_layout(d / "shards", tars=1), "caption the shards first"),
    ("make-shards with captions that name no sample", lambda v, d: ["make-shards", d / "shards", "--out", d / "new",
                                                                    "--captions", d / "captions.jsonl"],
     _foreign_captions, "none of the 1 captions in"),
    ("make-shards of shards with a caption bank", lambda v, d: ["make-shards", d / "shards", "--out", d / "new",
                                                                "--caption-bank", d / "shards" / "classes.txt"],
     lambda d: cls_layout(d / "shards", tars=1), "--caption-bank gives class folders"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_shard_input(case, blip, tmp_path):
    _, argv, setup, message = case
    setup(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv(blip, tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], (code, out, err)
    assert lines[0].startswith(("textok caption: error:", "textok make-shards: error:"))
    assert changed_files(before, snapshot(tmp_path), ()) == [] and not (tmp_path / "new").exists()
