import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from conftest import real_data
from textok.data import CaptionedScenes, ImageCaptionFolder, collate, load_image
from textok.data.scenes import SHAPES
from textok.errors import TextokError


def test_scenes_are_deterministic_per_seed():
    a, b = CaptionedScenes(32, size=8, seed=3), CaptionedScenes(32, size=8, seed=3, cache=False)
    c = CaptionedScenes(32, size=8, seed=4)
    for i in range(8):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["captions"] == b[i]["captions"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))
    assert not torch.equal(a[0]["image"], CaptionedScenes(32, split="val", size=1, seed=3)[0]["image"])


def test_scene_items_and_captions_state_what_is_there():
    d = CaptionedScenes(48, size=20)
    for i in range(20):
        item = d[i]
        assert item["image"].shape == (3, 48, 48)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        scene = d.scene(i)
        assert item["label"] == SHAPES.index(scene.objects[0].shape)
        assert len(item["captions"]) == 5 and len(set(item["captions"])) == 5
        for caption in item["captions"]:
            for obj in scene.objects:
                assert obj.shape in caption and obj.color in caption
            assert scene.bg_colors[0] in caption


def test_scene_caption_bank_covers_classes():
    bank = CaptionedScenes(16, size=200).caption_bank()
    assert set(bank) == set(range(len(SHAPES))) and all(bank[k] for k in bank)


def _write_tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_with_jsonl_captions_modes_and_corrupt_file(tmp_path):
    rows = [{"file": "train/a.png", "captions": ["a red one", "red"]}, {"file": "train/b.png", "caption": "gray"},
            {"file": "train/c.png", "caption": "a transparent one"}, {"file": "train/bad.png", "caption": "broken"},
            {"file": "dev/d.png", "caption": "held out"}]
    files = {"train/a.png": _png((255, 0, 0)), "train/b.png": _png(128, mode="L"),
             "train/c.png": _png((0, 0, 255, 0), mode="RGBA"), "train/bad.png": b"not an image",
             "dev/d.png": _png((0, 255, 0)), "captions.jsonl": "\n".join(map(json.dumps, rows)).encode()}
    _write_tar(tmp_path / "d.tar", files)
    train = ImageCaptionFolder(tmp_path / "d.tar", split="train", image_size=16)
    assert len(train) == 4 and len(ImageCaptionFolder(tmp_path / "d.tar", split="val", image_size=16)) == 1
    batch = collate([train[i] for i in range(4)])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["skipped"] == 1
    assert batch["captions"][0] == ["a red one", "red"]
    torch.testing.assert_close(batch["image"][0][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(batch["image"][1][:, 8, 8], torch.full((3,), 128 / 127.5 - 1))  # gray -> RGB
    torch.testing.assert_close(batch["image"][2][:, 8, 8], torch.ones(3))  # transparent -> white


def test_class_folders_with_caption_bank(tmp_path):
    for split in ("train", "val"):
        for cls, color in (("cats", (200, 100, 0)), ("dogs", (0, 100, 200))):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), color).save(tmp_path / split / cls / "x.jpg")
    bank = {"cats": ["a cat sleeping"], "dogs": ["a dog running", "a happy dog"]}
    ds = ImageCaptionFolder(tmp_path, split="val", image_size=8, caption_bank=bank)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 2
    assert ds[1]["captions"] == bank["dogs"] and ds[1]["label"] == 1
    with pytest.raises(TextokError, match="no captions for class 'dogs'"):
        ImageCaptionFolder(tmp_path, split="val", image_size=8, caption_bank={"cats": ["x"]})
    templated = ImageCaptionFolder(tmp_path, split="train", image_size=8)
    assert templated[0]["captions"][0] == "a photo of a cats."


def test_missing_caption_and_missing_data_are_clear(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": ""}) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(TextokError, match="has no caption"):
        ImageCaptionFolder(tmp_path, image_size=8)
    with pytest.raises(TextokError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nope", image_size=8)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(TextokError, match="cannot be decoded"):
        load_image(str(tmp_path / "junk.png"), 8)


@pytest.mark.skipif(real_data("flickr8k-128.tar") is None, reason="flickr8k-128.tar is not in $TEXTOK_DATA")
def test_real_flickr8k_has_five_captions():
    ds = ImageCaptionFolder(real_data("flickr8k-128.tar"), split="dev", image_size=32, limit=10)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and len(item["captions"]) == 5


def test_mismatched_captions_give_each_image_the_next_ones_caption():
    from textok.data.factory import MismatchedCaptions, build_dataset

    scenes = build_dataset("scenes", "val", 16, size=5)
    view = MismatchedCaptions(scenes, num=3)
    assert len(view) == 3
    for i in range(3):
        assert torch.equal(view[i]["image"], scenes[i]["image"])
        assert view[i]["captions"] == scenes[(i + 1) % 3]["captions"] != scenes[i]["captions"]
    with pytest.raises(IndexError):
        view[3]


def _grouped_folder(root, classes: int, per_class: int, labelled: bool = True):
    """A val split stored class by class (like Flowers-102): per_class photos of each class in a row."""
    (root / "val").mkdir(parents=True)
    rows = []
    for c in range(classes):
        for k in range(per_class):
            name = f"val/{c}_{k}.png"
            Image.new("RGB", (8, 8), (20 * c, 10 * k, 0)).save(root / name)
            row = {"file": name, "captions": [f"class {c} photo {k}"]}
            if labelled:
                row["label"] = c
            rows.append(row)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return ImageCaptionFolder(root, split="val", image_size=8)


def test_other_swap_takes_a_caption_of_another_class_where_next_mostly_stays_in_the_class(tmp_path):
    from textok.data.factory import MismatchedCaptions

    ds = _grouped_folder(tmp_path / "set", classes=4, per_class=6)
    label = {ds.captions_of(i)[0]: ds.label_of(i) for i in range(len(ds))}
    nxt, other = MismatchedCaptions(ds), MismatchedCaptions(ds, swap="other", seed=3)
    same_next = sum(label[nxt[i]["captions"][0]] == ds.label_of(i) for i in range(len(ds)))
    assert same_next == 20  # 5 of each 6 neighbours share the class: the next-image swap is easy
    assert other.kind == "another class"
    for i in range(len(ds)):
        assert torch.equal(other[i]["image"], ds[i]["image"])
        assert label[other[i]["captions"][0]] != ds.label_of(i)
    # deterministic for a seed, and the partners are drawn, not a fixed shift
    again = MismatchedCaptions(ds, swap="other", seed=3)
    assert other.partners == again.partners
    assert len({(p - i) % len(ds) for i, p in enumerate(other.partners)}) > 2
    # within the first num items only
    head = MismatchedCaptions(ds, num=12, swap="other")
    assert all(p < 12 and ds.label_of(p) != ds.label_of(i) for i, p in enumerate(head.partners))


def test_other_swap_without_classes_takes_a_far_image(tmp_path):
    from textok.data.factory import MismatchedCaptions, swap_partners

    ds = _grouped_folder(tmp_path / "set", classes=4, per_class=6, labelled=False)
    other = MismatchedCaptions(ds, swap="other")
    assert other.kind == "a far, random image"
    n = len(ds)
    for i, p in enumerate(other.partners):
        gap = min((p - i) % n, (i - p) % n)
        assert gap >= n // 4
    for num in (2, 3, 5, 100):
        partners = swap_partners(num, None, seed=1)
        assert all(p != i and 0 <= p < num for i, p in enumerate(partners))
    with pytest.raises(TextokError, match="unknown caption swap"):
        MismatchedCaptions(ds, swap="random")


def test_scenes_have_classes_for_the_other_swap():
    from textok.data.factory import MismatchedCaptions, build_dataset

    scenes = build_dataset("scenes", "val", 16, size=30)
    other = MismatchedCaptions(scenes, swap="other")
    assert other.kind == "another class"
    assert all(scenes.label_of(p) != scenes.label_of(i) for i, p in enumerate(other.partners))


def test_decode_once_gives_the_same_items_and_keeps_bad_ones_out(tmp_path):
    from textok.data.factory import DecodedOnce, build_dataset

    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(5):
        name = f"train/{i}.jpg"
        if i == 2:
            (root / name).write_bytes(b"not an image")
        else:
            Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(root / name, quality=90)
        rows.append({"file": name, "captions": [f"caption {i}", f"other {i}"], "label": i % 2})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = build_dataset(str(root), "train", 16, captions_per_image=1)
    once = build_dataset(str(root), "train", 16, captions_per_image=1, decode_once=True)
    assert isinstance(once, DecodedOnce) and once.pixels.dtype == torch.uint8  # 8-bit JPEG pixels: lossless
    assert len(once) == len(plain) == 5 and once[2] is None and plain[2] is None
    for i in (0, 1, 3, 4):
        a, b = plain[i], once[i]
        assert torch.equal(a["image"], b["image"]) and a["captions"] == b["captions"] == [f"caption {i}"]
        assert a["label"] == b["label"] and a["index"] == b["index"]
    assert once.caption_bank() == plain.caption_bank() and once.captions_of(3) == plain.captions_of(3)
    assert collate([once[i] for i in range(5)])["skipped"] == 1


def test_integer_labels_name_every_class_the_same_in_every_split(tmp_path):
    """Flowers-102 labels are ids 0..101: the classes (and so class-conditional generation and the per-class
    caption banks) count every id in the file, even one that a split lacks."""
    root = tmp_path / "set"
    rows = []
    for split, label in (("train", 0), ("train", 2), ("val", 1)):
        name = f"{split}/{label}.jpg"
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy()).save(root / name)
        rows.append({"file": name, "captions": [f"flower {label}"], "label": label})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = (ImageCaptionFolder(str(root), split=s, image_size=8) for s in ("train", "val"))
    assert train.class_names == val.class_names == ["0", "1", "2"]
    assert sorted(train[i]["label"] for i in range(len(train))) == [0, 2] and val[0]["label"] == 1


def test_data_names_are_found_in_textok_data_and_a_missing_variable_is_named(tmp_path, monkeypatch, capsys):
    from textok.cli import main
    from textok.data.factory import DATA_ENV, build_dataset, resolve_source

    root = tmp_path / "data"
    _grouped_folder(root / "tiny", classes=2, per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_source("data/tiny") == "data/tiny"  # relative to the working directory
    assert resolve_source("scenes") == "scenes"
    with pytest.raises(TextokError, match=f"{DATA_ENV} is not set") as err:
        resolve_source("tiny")
    assert "\n" not in str(err.value)
    monkeypatch.setenv(DATA_ENV, str(root))
    assert resolve_source("tiny") == str(root / "tiny")
    assert len(build_dataset("tiny", "val", 8)) == 4
    with pytest.raises(TextokError, match=f"nor in {DATA_ENV}="):
        resolve_source("absent.tar")
    with pytest.raises(TextokError, match="not found"):
        resolve_source(str(tmp_path / "absent.tar"))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(TextokError, match=f"{DATA_ENV}=.* is not a folder"):
        resolve_source("tiny")
    # the shipped study recipes name their data set; without the variable the study says which variable to set
    monkeypatch.delenv(DATA_ENV)
    assert main(["study", "--recipe", "study-flowers", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert DATA_ENV in err and "flowers102-128.tar" in err and "Traceback" not in err


@pytest.mark.skipif(real_data("flowers102-128.tar") is None, reason="flowers102-128.tar is not in $TEXTOK_DATA")
def test_real_flowers_next_photo_is_mostly_the_same_species_and_the_other_swap_never():
    from textok.data.factory import MismatchedCaptions, build_dataset

    dev = build_dataset(str(real_data("flowers102-128.tar")), "val", 32, captions_per_image=5)
    n = len(dev)
    same = sum(dev.label_of(i) == dev.label_of((i + 1) % n) for i in range(n)) / n
    assert same > 0.8  # stored species by species
    other = MismatchedCaptions(dev, swap="other")
    assert other.kind == "another class"
    assert all(dev.label_of(p) != dev.label_of(i) for i, p in enumerate(other.partners))
