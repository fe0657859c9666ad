"""Streaming shards: make-shards, reading order (ranks, workers, windows), exact resume, bad shards."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from textok.cli import main
from textok.data.factory import build_dataset
from textok.data.shards import ShardSet, is_shard_dir
from textok.errors import TextokError


def _image_folder(root, n=40, splits=("train",)):
    rows = []
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{split}/{i:03d}.jpg" if split else f"{i:03d}.jpg"
            Image.new("RGB", (24, 20), (i * 6 % 256, 40, 200)).save(root / name, quality=90)
            rows.append({"file": name, "captions": [f"{split} image {i}", f"picture {i}"], "label": f"c{i % 3}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    _image_folder(base / "src", n=48, splits=("train", "val"))
    rc = main(["make-shards", str(base / "src"), "--out", str(base / "sh"), "--shard-size", "6", "--no-progress"])
    assert rc == 0
    return base / "sh"


def test_make_shards_writes_webdataset_members_and_an_index(shard_dir, tmp_path):
    assert is_shard_dir(shard_dir)
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["class_names"] == ["c0", "c1", "c2"]
    assert [e["count"] for e in index["splits"]["train"]] == [6] * 8 and len(index["splits"]["val"]) == 8
    with tarfile.open(shard_dir / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[1]).read())
    assert names[:2] == ["000000000.jpg", "000000000.json"]  # {key}.jpg + {key}.json
    assert meta["captions"][0].startswith("train image") and meta["label"] in (0, 1, 2)
    files = []
    for entry in index["splits"]["train"]:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            files += [json.loads(tar.extractfile(m).read())["file"] for m in tar if m.name.endswith(".json")]
    assert sorted(files) == [f"train/{i:03d}.jpg" for i in range(48)] and files != sorted(files)  # shuffled
    # a source without splits is written once (as train), not once per split name
    _image_folder(tmp_path / "flat", n=5, splits=("",))
    rc = main(["make-shards", str(tmp_path / "flat"), "--out", str(tmp_path / "o"), "--no-progress", "--image-size", "8"])
    assert rc == 0 and list(json.loads((tmp_path / "o/index.json").read_text())["splits"]) == ["train"]
    item = ShardSet(tmp_path / "o", "train", 8).take(1)[0]
    assert item["image"].shape == (3, 8, 8)


def test_one_epoch_reads_every_sample_once_and_ranks_and_workers_are_disjoint(shard_dir):
    shards = ShardSet(shard_dir, "train", 8)
    seen = {}
    for rank in range(2):
        stream = shards.stream(4, rank=rank, world=2, workers=2, seed=1, shuffle_buffer=5)
        assert stream.batches_per_epoch() == 6  # 4 shards per rank, 2 per stream: 12 samples = 3 batches x 2 streams
        batches = [next(b) for b in [stream.batches(0)] for _ in range(6)]
        seen[rank] = torch.cat([b["index"] for b in batches]).tolist()
        per_stream = [set(sum((batches[k]["index"].tolist() for k in range(s, 6, 2)), [])) for s in range(2)]
        assert not per_stream[0] & per_stream[1]
        shard_of = lambda i: i // 6  # noqa: E731 (6 samples per shard)
        assert not {shard_of(i) for i in per_stream[0]} & {shard_of(i) for i in per_stream[1]}
    assert len(seen[0]) == len(set(seen[0])) == 24 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(48))
    # a fresh window order every epoch, and a batch mixes shards (window of 5 spans shard borders)
    stream = shards.stream(4, seed=1, shuffle_buffer=5)
    first = [next(b)["index"].tolist() for b in [stream.batches(0)] for _ in range(24)]
    assert first[:12] != first[12:] and sorted(sum(first[:12], [])) == list(range(48))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_any_position_reads_what_the_uninterrupted_stream_read(shard_dir, workers):
    shards = ShardSet(shard_dir, "train", 8)
    make = lambda: shards.stream(3, rank=1, world=2, workers=workers, seed=3, shuffle_buffer=7)  # noqa: E731
    full = make().batches(0)
    ref = [next(full) for _ in range(20)]  # crosses an epoch border
    for start in (1, 5, 13):
        again = make().batches(start)
        for k in range(start, start + 4):
            b = next(again)
            assert b["index"].tolist() == ref[k]["index"].tolist() and torch.equal(b["image"], ref[k]["image"])
            assert b["captions"] == ref[k]["captions"]


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpg(seed):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 20 % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_truncated_shard_and_member_without_caption_are_skipped_counted_and_named(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    cap = lambda i: json.dumps({"captions": [f"c {i}"], "label": 0}).encode()  # noqa: E731
    _write_tar(d / "train-000000.tar", [m for i in range(4) for m in ((f"{i:03d}.jpg", _jpg(i)), (f"{i:03d}.json", cap(i)))])
    # a member without its caption (key 005 has no .json) and one with an empty caption list
    _write_tar(d / "train-000001.tar", [("004.jpg", _jpg(4)), ("004.json", cap(4)), ("005.jpg", _jpg(5)),
                                        ("006.jpg", _jpg(6)), ("006.json", b'{"captions": []}'),
                                        ("007.jpg", _jpg(7)), ("007.json", cap(7))])
    _write_tar(d / "train-000002.tar", [m for i in range(8, 12) for m in ((f"{i:03d}.jpg", _jpg(i)), (f"{i:03d}.json", cap(i)))])
    data = (d / "train-000002.tar").read_bytes()
    (d / "train-000002.tar").write_bytes(data[: 512 * 7])  # cut in the middle of the second sample's image
    rc = main(["make-shards", str(d), "--out", "-", "--index-only"])
    index = json.loads((d / "index.json").read_text())
    assert rc == 0 and [e["count"] for e in index["splits"]["train"]] == [4, 4, 1]
    index["splits"]["train"][2]["count"] = 4  # as make-shards wrote it, before the copy was cut short
    (d / "index.json").write_text(json.dumps(index))
    stream = ShardSet(d, "train", 8).stream(12, shuffle_buffer=12)
    batch = next(stream.batches(0))
    assert batch["skipped"] == 5 and len(batch["captions"]) == 7
    problems = " | ".join(batch["problems"])
    assert "train-000001.tar: skipped 2 samples (no caption: 2)" in problems
    assert "train-000002.tar: skipped 3 samples (truncated after 1 of 4 samples" in problems


def test_build_dataset_and_clear_errors(shard_dir, tmp_path):
    train = build_dataset(str(shard_dir), "train", 8, captions_per_image=1)
    assert isinstance(train, ShardSet) and len(train) == 48
    head = build_dataset(str(shard_dir), "val", 8, size=5, decode_once=True)
    assert len(head) == 5 and head[0]["image"].shape == (3, 8, 8)
    with pytest.raises(TextokError, match="keeps every image in memory"):
        build_dataset(str(shard_dir), "train", 8, decode_once=True)
    with pytest.raises(TextokError, match="has no 'test' split"):
        build_dataset(str(shard_dir), "test", 8)
    with pytest.raises(TextokError, match="fewer than ranks x reading streams = 4 x 4"):
        train.stream(2, world=4, workers=4)
    with pytest.raises(TextokError, match="fewer than one batch of 50"):
        train.stream(50).batches_per_epoch()
